"""Full text x video score matrices from cached features, under the three evaluation policies.

``score_fn(t, f, mask)`` maps texts (..., A, D) and videos (..., B, *rest) with masks (..., B, *rest')
(or ``None``) to scores (..., A, B) and must broadcast over leading block dimensions (EMCL-Net's
``scores`` does, with per-frame features (B, T, D); pooled video vectors are (B, D) with no mask).
Every call runs in float32 with autocast off (SPEC §1, precision): bf16 there moves scores enough to
swap near-tied candidates, and is no faster.

- ``paper``: the reference's policy. EM runs separately on every block of ``block`` texts x ``block``
  videos (in their given order), so a score depends on which texts and videos share its block.
  All blocks of the same shape run in one batched call, not a Python loop.
- ``query``: EM runs once per text query over that text and all videos. Scores do not depend on the
  order of texts or videos nor on any blocking.
- ``none``: no EMCL at evaluation (pass a ``score_fn`` without it); scores are pairwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from emcl.em import em_reconstruct

EvalBlock = Literal["paper", "query", "none"]
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


def score_matrix(
    score_fn: ScoreFn,
    t: torch.Tensor,
    f: torch.Tensor,
    mask: torch.Tensor | None,
    mode: EvalBlock = "query",
    block: int = 32,
    chunk: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """The (A, V) float32 score matrix, or this rank's share of its rows when ``world_size > 1``.

    Rows are dealt to ranks in contiguous spans of whole ``block``-sized text blocks, so concatenating
    every rank's rows in rank order gives the full matrix, identical to a single-process run.
    ``chunk`` bounds memory: text blocks (paper; default 4, i.e. 4 x V/32 EM problems per call) or
    queries (query, none; default 16) scored per call.
    """
    a = t.shape[0]
    n_blocks = -(-a // block)
    per_rank = -(-n_blocks // world_size)
    lo, hi = min(a, rank * per_rank * block), min(a, (rank + 1) * per_rank * block)
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

    The inference module's form (SPEC §4): EM runs on ``X = [the B video rows; the A text rows]`` of each
    leading block, ``Y = X + beta * R`` is *not* renormalised, and the score is ``y_t . y_v``. With ``mu``
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
