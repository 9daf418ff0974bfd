"""Full text x video score matrices from cached features, under the three evaluation policies.

``score_fn(t, f, mask)`` maps texts (..., A, D) and videos (..., B, *rest) with masks (..., B, *rest')
(or ``None``) to scores (..., A, B) and must broadcast over leading block dimensions (EMCL-Net's
``scores`` does, with per-frame features (B, T, D); pooled video vectors are (B, D) with no mask).
Every call runs in float32 with autocast off (docs/reference.md, 'Precision'): bf16 there moves scores
enough to swap near-tied candidates, and is no faster.

- ``paper``: the reference's policy. EM runs separately on every block of ``block`` texts x ``block``
  videos (in their given order), so a score depends on which texts and videos share its block.
  All blocks of the same shape run in one batched call, not a Python loop.
- ``query``: EM runs once per text query over that text and all videos. Scores do not depend on the
  order of texts or videos nor on any blocking.
- ``none``: no EMCL at evaluation (pass a ``score_fn`` without it); scores are pairwise.

:func:`embedding_score_matrix` is the same three policies for models whose EM transforms the text and
video embeddings of a set jointly and then scores pairs independently (MMT, per modality): there the
reference's ``paper`` blocks are 32 *matched* pairs in list order, each text and video keeping the
embedding of its own block (:func:`paper_block_embeddings`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from emcl.em import em_reconstruct

EvalBlock = Literal["paper", "query", "none"]
EVAL_POLICIES: tuple[EvalBlock, ...] = ("paper", "query", "none")
ScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _fp32(x: torch.Tensor | None) -> torch.Tensor | None:
    return x.float() if x is not None and x.is_floating_point() else x


def _call(score_fn: ScoreFn, t: torch.Tensor, f: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``score_fn`` on float32 inputs with autocast off, whatever context the caller runs in."""
    with torch.autocast(t.device.type, enabled=False):
        return score_fn(_fp32(t), _fp32(f), mask).float()


def _blocks(x: torch.Tensor | None, stop: int, n: int, width: int) -> torch.Tensor | None:
    return None if x is None else x[:stop].unflatten(0, (n, width))


def _tail(x: torch.Tensor | None, start: int) -> torch.Tensor | None:
    return None if x is None else x[start:][None]


def _lead(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x[None]


def _paper_rows(
    score_fn: ScoreFn, t: torch.Tensor, f: torch.Tensor, mask: torch.Tensor | None, block: int, chunk: int
) -> torch.Tensor:
    """Scores of the texts ``t`` (a whole number of text blocks, plus one remainder) vs all videos."""
    a, v = t.shape[0], f.shape[0]
    out = t.new_empty(a, v, dtype=torch.float32)
    nv_full = v // block
    video_groups = []  # (start, stacked f, stacked mask, number of blocks, block width)
    if nv_full:
        video_groups.append(
            (
                0,
                f[: nv_full * block].unflatten(0, (nv_full, block)),
                _blocks(mask, nv_full * block, nv_full, block),
                nv_full,
                block,
            )
        )
    if v % block:
        s = nv_full * block
        video_groups.append((s, f[s:][None], _tail(mask, s), 1, v - s))
    na_full = a // block
    text_groups = []
    if na_full:
        text_groups.append((0, t[: na_full * block].unflatten(0, (na_full, block)), na_full, block))
    if a % block:
        s = na_full * block
        text_groups.append((s, t[s:][None], 1, a - s))
    for t0, tb, nt, bt in text_groups:
        for i in range(0, nt, chunk):
            tc = tb[i : i + chunk]  # (c, bt, D)
            for v0, fb, mb, nv, bv in video_groups:
                s = _call(score_fn, tc[:, None], fb[None], _lead(mb))  # (c, nv, bt, bv)
                rows = slice(t0 + i * bt, t0 + (i + tc.shape[0]) * bt)
                out[rows, v0 : v0 + nv * bv] = s.permute(0, 2, 1, 3).reshape(-1, nv * bv)
    return out


def rank_rows(a: int, block: int, rank: int, world_size: int) -> tuple[int, int]:
    """This rank's contiguous span [lo, hi) of ``a`` rows, dealt in whole ``block``-sized blocks."""
    n_blocks = -(-a // block)
    per_rank = -(-n_blocks // world_size)
    return min(a, rank * per_rank * block), min(a, (rank + 1) * per_rank * block)


def score_matrix(
    score_fn: ScoreFn, t: torch.Tensor, f: torch.Tensor, mask: torch.Tensor | None,
    mode: EvalBlock = "query", block: int = 32, chunk: int | None = None, rank: int = 0, world_size: int = 1,
) -> torch.Tensor:  # fmt: skip
    """The (A, V) float32 score matrix, or this rank's share of its rows when ``world_size > 1``.

    Rows are dealt to ranks in contiguous spans of whole ``block``-sized text blocks, so concatenating
    every rank's rows in rank order gives the full matrix, identical to a single-process run.
    ``chunk`` bounds memory: text blocks (paper; default 4, i.e. 4 x V/32 EM problems per call) or
    queries (query, none; default 16) scored per call.
    """
    lo, hi = rank_rows(t.shape[0], block, rank, world_size)
    t = t[lo:hi]
    if mode == "paper":
        return _paper_rows(score_fn, t, f, mask, block, chunk or 4)
    chunk = chunk or 16
    if mode not in ("query", "none"):
        raise ValueError(f"eval_block must be paper, query or none, got {mode!r}")
    rows = []
    for i in range(0, t.shape[0], chunk):
        tc = t[i : i + chunk]
        # each query is its own block: (c, 1, D) against all videos (1, V, T, D)
        rows.append(_call(score_fn, tc[:, None], f[None], _lead(mask))[:, 0])
    return torch.cat(rows) if rows else t.new_empty(0, f.shape[0], dtype=torch.float32)


def _broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """Broadcast shape of two leading shapes (``torch.broadcast_shapes`` imports torch._refs: 2-4 s)."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    if any(x != y and 1 not in (x, y) for x, y in zip(a, b)):
        raise ValueError(f"leading shapes {a} and {b} do not broadcast")
    return tuple(max(x, y) if 1 in (x, y) else x for x, y in zip(a, b))


def pooled_emcl_scores(
    t: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    mu: torch.Tensor | None = None,
    stage_num: int = 10,
    lamd: float = 0.1,
    beta: float = 4.0,
) -> torch.Tensor:
    """Dot products (..., A, B) of texts ``t`` (..., A, D) and pooled videos ``v`` (..., B, D) after EMCL.

    The inference module's form (docs/reference.md, 'EMCL as an inference module'): EM runs on
    ``X = [the B video rows; the A text rows]`` of each leading block, ``Y = X + beta * R`` is *not*
    renormalised, and the score is ``y_t . y_v``. With ``mu``
    None the EM step is skipped and the scores are plain dot products of the inputs, computed along the
    same path (so ``beta = 0`` gives exactly the same numbers). A ``score_fn`` for :func:`score_matrix`
    (bind the keywords with ``functools.partial``); the leading dims of ``t`` and ``v`` broadcast.
    """
    if mask is not None:
        raise ValueError("pooled video vectors take no frame mask (pass mask=None)")
    lead = _broadcast(tuple(t.shape[:-2]), tuple(v.shape[:-2]))
    a, b, d = t.shape[-2], v.shape[-2], t.shape[-1]
    x = torch.cat([v.expand(*lead, b, d), t.expand(*lead, a, d)], dim=-2)
    if mu is not None:
        r, _ = em_reconstruct(x, mu, stage_num, lamd)
        x = x + beta * r
    return torch.matmul(x[..., b:, :], x[..., :b, :].transpose(-1, -2))


# ------------------------------------------------------------------ the embedding form (MMT, per modality)
EmFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
PairFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _em_call(em_fn: EmFn, t: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.autocast(t.device.type, enabled=False):
        tt, vv = em_fn(t.float(), v.float())
        return tt.float(), vv.float()


def _pair_call(pair_fn: PairFn, t: torch.Tensor, v: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    with torch.autocast(t.device.type, enabled=False):
        return pair_fn(t.float(), v.float(), _fp32(extra)).float()


def _index(x: torch.Tensor | None, i) -> torch.Tensor | None:
    return None if x is None else x[i]


def paper_block_embeddings(
    em_fn: EmFn, t: torch.Tensor, v: torch.Tensor, block: int = 32, chunk: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference MMT's test-time EM: text ``i`` and video ``i`` are a matched pair; EM runs on each
    block of ``block`` consecutive pairs (``[videos; texts]`` of the block), and every text and video keeps
    the embedding of its own block (1000 pairs = 31 x 32 + 8). Transductive: each query meets its own
    positive inside EM. Full blocks run batched, ``chunk`` blocks per call."""
    a = t.shape[0]
    if v.shape[0] != a:
        raise ValueError(f"paper-mode EM needs matched pairs in list order: {a} texts, {v.shape[0]} videos")
    t_out, v_out = torch.empty_like(t, dtype=torch.float32), torch.empty_like(v, dtype=torch.float32)
    full = a // block * block
    for s in range(0, full, chunk * block):
        e = min(full, s + chunk * block)
        tb, vb = _em_call(em_fn, t[s:e].unflatten(0, (-1, block)), v[s:e].unflatten(0, (-1, block)))
        t_out[s:e], v_out[s:e] = tb.flatten(0, 1), vb.flatten(0, 1)
    if full < a:
        tb, vb = _em_call(em_fn, t[full:][None], v[full:][None])
        t_out[full:], v_out[full:] = tb[0], vb[0]
    return t_out, v_out


def embedding_score_matrix(
    em_fn: EmFn, pair_fn: PairFn, t: torch.Tensor, v: torch.Tensor, extra: torch.Tensor | None = None,
    mode: EvalBlock = "query", block: int = 32, chunk: int | None = None, rank: int = 0, world_size: int = 1,
) -> torch.Tensor:  # fmt: skip
    """The (A, V) score matrix (or this rank's rows) for models whose EM transforms text and video
    embeddings jointly and then scores pairs independently, e.g. MMT per modality.

    ``em_fn(t (..., A, *), v (..., B, *))`` returns the transformed embeddings (EM on each leading block);
    ``pair_fn(t (..., A, *), v (..., B, *), extra (..., A, *))`` scores all pairs (``extra``: per-text
    data that EM does not touch, e.g. MMT's modality weights). Policies:

    - ``paper``: :func:`paper_block_embeddings` (matched pairs, blocks of ``block``, list order).
    - ``query``: EM once per text query over [all videos; that query]; scores depend on no blocking
      or order. ``chunk`` queries per call (default 8).
    - ``none``: ``pair_fn`` on the embeddings as they are (no EM).
    """
    lo, hi = rank_rows(t.shape[0], block, rank, world_size)
    if mode in ("paper", "none"):
        tt, vv = paper_block_embeddings(em_fn, t, v, block) if mode == "paper" else (t, v)
        spans = [(i, min(hi, i + 256)) for i in range(lo, hi, 256)]
        rows = [_pair_call(pair_fn, tt[i:j], vv, _index(extra, slice(i, j))) for i, j in spans]
    elif mode == "query":
        chunk = chunk or 8
        rows = []
        for i in range(lo, hi, chunk):
            j = min(hi, i + chunk)
            tq, vq = _em_call(em_fn, t[i:j, None], v[None].expand(j - i, *v.shape))  # (c, 1, *), (c, V, *)
            ex = None if extra is None else extra[i:j, None]
            rows.append(_pair_call(pair_fn, tq, vq, ex)[:, 0])
    else:
        raise ValueError(f"eval_block must be paper, query or none, got {mode!r}")
    return torch.cat(rows) if rows else t.new_empty(0, v.shape[0], dtype=torch.float32)
