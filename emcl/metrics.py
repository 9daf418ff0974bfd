"""Retrieval metrics for text-video similarity matrices (docs/reference.md, 'Evaluation protocol').

Conventions used throughout:

* A similarity matrix ``sim_tv`` is ``[T, V]``: one row per caption (text), one column per video.
  ``caption_video[t]`` is the index of the video caption ``t`` describes; 1:1 datasets use
  ``caption_video = arange(T)`` with ``T == V``.
* Ranks are 1-based. The rank of the ground truth is ``1 + (number of candidates with a strictly
  higher score)`` ("optimistic" ties). The reference ranks by ``argsort``/sorted position, which breaks
  ties arbitrarily; with real-valued scores ties are rare and both agree. Because optimistic ties reward a
  degenerate model (a constant matrix scores R@1 = 100), ``ties="pessimistic"`` is offered as a check:
  it counts every other candidate with an equal score as ranked above the ground truth.
  ``ties="average"`` gives the mean of the tied positions (fractional ranks), as the reference's MMT
  evaluation does.
* R@k are percentages, MdR is the median rank (mean of the two middle ranks for an even count, as
  ``numpy.median``), MnR the mean rank.
* Video→text with several captions per video (MSVD, MSR-VTT full) follows the reference by default
  (docs/reference.md, 'Evaluation protocol'): each video ranks the V caption *groups*, a group scoring
  its best caption (``v2t``).
  Ranking each video against all T captions is a different, harder protocol; :func:`evaluate_similarity`
  reports it beside, labelled ``v2t_captions`` (and ``v2t_captions_dsl``), never in place of ``v2t``.
* NaN scores are an error (a NaN compares false with everything and would silently rank first);
  ``±inf`` is allowed in the raw metrics (e.g. a masked pair), but not in DSL.

All functions are vectorised torch code and run on the device of the input (CPU or CUDA); only the final
metric values are moved to the host.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "RANK_KEYS",
    "DIRECTIONS",
    "CAPTION_DIRECTIONS",
    "gt_ranks",
    "t2v_ranks",
    "v2t_ranks",
    "metrics_from_ranks",
    "retrieval_metrics",
    "t2v_metrics",
    "v2t_metrics",
    "dsl",
    "dsl_t2v",
    "dsl_v2t",
    "evaluate_similarity",
    "format_table",
    "qa_accuracy",
    "format_qa_table",
]

RANK_KEYS = ("R1", "R5", "R10", "R50", "MdR", "MnR")
DIRECTIONS = ("t2v", "v2t", "t2v_dsl", "v2t_dsl")
#: Rows added for multi-caption data: video→text ranked against all captions (not the paper's protocol).
CAPTION_DIRECTIONS = ("v2t_captions", "v2t_captions_dsl")
_CAPTION_NOTE = (
    "v2t: each video ranks the videos' best captions (V x V, the reference's protocol); v2t_captions: "
    "each video ranks all captions (rank of its best own caption; harder, not the paper's protocol)"
)
_TIES = ("optimistic", "pessimistic", "average")


def _check_sim(sim: Tensor, name: str = "sim", allow_inf: bool = True) -> Tensor:
    """Validate a 2-D score matrix; upcast half precision so comparisons and softmax are exact enough."""
    if not isinstance(sim, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(sim).__name__}")
    if sim.dim() != 2:
        raise ValueError(f"{name} must be 2-D [queries, candidates], got shape {tuple(sim.shape)}")
    if sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(sim.shape)}")
    if sim.is_complex():
        raise TypeError(f"{name} must be real, got {sim.dtype}")
    if not sim.is_floating_point() or sim.dtype in (torch.float16, torch.bfloat16):
        sim = sim.float()
    bad = torch.isnan(sim) if allow_inf else ~torch.isfinite(sim)
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        what = "NaN" if allow_inf else "non-finite"
        raise ValueError(
            f"{name} has {int(bad.sum())} {what} score(s), first at [row {row}, column {col}] "
            f"(value {float(sim[row, col])}); refusing to rank"
        )
    return sim.detach()


def _check_index(idx: Tensor | None, length: int, upper: int, name: str, device: torch.device) -> Tensor:
    """Validate a LongTensor of ``length`` entries in ``[0, upper)``."""
    if idx is None:
        raise ValueError(f"{name} is required")
    idx = torch.as_tensor(idx)
    if idx.dim() != 1 or idx.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length}], got {tuple(idx.shape)}")
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {idx.dtype}")
    idx = idx.to(device=device, dtype=torch.long)
    bad = (idx < 0) | (idx >= upper)
    if bool(bad.any()):
        pos = int(bad.nonzero()[0])
        raise ValueError(f"{name}[{pos}] = {int(idx[pos])} is outside [0, {upper})")
    return idx


def _check_ties(ties: str) -> None:
    if ties not in _TIES:
        raise ValueError(f"ties must be one of {_TIES}, got {ties!r}")


def _check_sim_and_gt(
    sim: Tensor, gt: Tensor | None, sim_name: str, gt_name: str
) -> tuple[Tensor, Tensor]:
    """``sim`` checked (:func:`_check_sim`) and the ground-truth column of each of its rows, checked;
    ``gt=None`` means the diagonal, which needs a square matrix."""
    sim = _check_sim(sim, sim_name)
    q, c = sim.shape
    if gt is None:
        if q != c:
            raise ValueError(f"{gt_name} is needed for a non-square similarity matrix of shape {(q, c)}")
        gt = torch.arange(q, device=sim.device)
    return sim, _check_index(gt, q, c, gt_name, sim.device)


def gt_ranks(sim: Tensor, gt: Tensor | None = None, ties: str = "optimistic") -> Tensor:
    """1-based rank of the ground-truth column of each row of ``sim`` [Q, C].

    ``gt[q]`` is the ground-truth column of query ``q`` (default: the diagonal, which needs Q == C).
    Rank = 1 + number of candidates with a strictly higher score (``ties="optimistic"``), or additionally
    + number of other candidates with an equal score (``ties="pessimistic"``), or the mean of those two
    (``ties="average"``, a float tensor). Returns LongTensor[Q] otherwise.
    """
    _check_ties(ties)
    sim, gt = _check_sim_and_gt(sim, gt, "sim", "gt")
    target = sim.gather(1, gt[:, None])
    return _rank_of(sim, target, dim=1, ties=ties)


def _rank_of(sim: Tensor, target: Tensor, dim: int, ties: str) -> Tensor:
    """1-based rank of ``target`` among ``sim`` along ``dim`` (``target`` is one of them)."""
    above = (sim > target).sum(dim=dim)
    if ties == "optimistic":
        return above + 1
    equal = (sim == target).sum(dim=dim)  # the ground truth itself included
    if ties == "pessimistic":
        return above + equal
    return above.double() + (equal.double() + 1) / 2  # average: the mean of the tied positions


def t2v_ranks(sim_tv: Tensor, caption_video: Tensor | None = None, ties: str = "optimistic") -> Tensor:
    """Text→video ranks: each caption (row) ranks all V videos; LongTensor[T]."""
    return gt_ranks(sim_tv, caption_video, ties=ties)


def v2t_ranks(sim_tv: Tensor, caption_video: Tensor | None = None, ties: str = "optimistic",
              candidates: str = "videos") -> Tensor:
    """Video→text ranks for ``sim_tv`` [T, V]; LongTensor[V].

    ``candidates="videos"`` (default): the reference's multi-caption protocol (docs/reference.md,
    'Evaluation protocol'; ``tensor_video_to_text_sim``): the captions of each video are first collapsed
    to their maximum score, giving a V x V matrix, so video ``v`` ranks V caption *groups*, not T
    captions (R@1: its own group's best caption beats every other video's best caption).

    ``candidates="captions"``: video ``v`` ranks all T captions (its column) and its rank is the best
    (minimum) rank among its own captions. Since a rank only grows as the score falls, that equals the
    rank of its highest-scoring caption: 1 + #captions scoring strictly above it. Ranks can only be
    higher (worse) than with ``"videos"``. Both are identical for 1:1 data.

    Every video needs at least one caption.
    """
    _check_ties(ties)
    if candidates not in ("captions", "videos"):
        raise ValueError(f"candidates must be 'captions' or 'videos', got {candidates!r}")
    sim_tv, cv = _check_sim_and_gt(sim_tv, caption_video, "sim_tv", "caption_video")
    t, v = sim_tv.shape
    counts = torch.bincount(cv, minlength=v)
    if bool((counts == 0).any()):
        missing = (counts == 0).nonzero().flatten()
        raise ValueError(
            f"{missing.numel()} video(s) have no caption (first: video index {int(missing[0])}); "
            "drop them from the similarity matrix before ranking video→text"
        )
    if candidates == "videos":
        # group_sim[g, v] = max over captions t of video g of sim_tv[t, v]
        group_sim = torch.full((v, v), float("-inf"), dtype=sim_tv.dtype, device=sim_tv.device)
        group_sim = group_sim.scatter_reduce(0, cv[:, None].expand(t, v), sim_tv, reduce="amax")
        return gt_ranks(group_sim.T, None, ties=ties)
    own = sim_tv.gather(1, cv[:, None]).squeeze(1)  # score of each caption with its own video
    best = torch.full((v,), float("-inf"), dtype=sim_tv.dtype, device=sim_tv.device)
    best = best.scatter_reduce(0, cv, own, reduce="amax")  # best own-caption score per video
    return _rank_of(sim_tv, best[None, :], dim=0, ties=ties)


def metrics_from_ranks(ranks: Tensor) -> dict[str, float]:
    """R@1/5/10/50 (percent), MdR and MnR from 1-based ranks."""
    if ranks.dim() != 1 or ranks.numel() == 0:
        raise ValueError(f"ranks must be a non-empty 1-D tensor, got shape {tuple(ranks.shape)}")
    if bool((ranks < 1).any()):
        raise ValueError("ranks must be 1-based (>= 1)")
    r = ranks.detach().to(torch.float64)
    s, _ = torch.sort(r)
    n = s.numel()
    median = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    values = torch.stack(
        [(r <= k).to(torch.float64).mean() * 100 for k in (1, 5, 10, 50)] + [median, r.mean()]
    )
    return dict(zip(RANK_KEYS, (float(x) for x in values.tolist())))


def retrieval_metrics(sim: Tensor, gt: Tensor | None = None, ties: str = "optimistic") -> dict[str, float]:
    """Metrics for queries = rows of ``sim`` [Q, C], ground truth ``gt`` [Q] (default: diagonal).

    Keys R1, R5, R10, R50 (percent), MdR, MnR (1-based ranks), all Python floats.
    """
    return metrics_from_ranks(gt_ranks(sim, gt, ties=ties))


def t2v_metrics(sim_tv: Tensor, caption_video: Tensor | None = None, ties: str = "optimistic") -> dict:
    """Text→video metrics for ``sim_tv`` [T, V]: every caption is a query."""
    return metrics_from_ranks(t2v_ranks(sim_tv, caption_video, ties=ties))


def v2t_metrics(sim_tv: Tensor, caption_video: Tensor | None = None, ties: str = "optimistic",
                candidates: str = "videos") -> dict:
    """Video→text metrics for ``sim_tv`` [T, V]: every video is a query, see :func:`v2t_ranks`."""
    return metrics_from_ranks(v2t_ranks(sim_tv, caption_video, ties=ties, candidates=candidates))


def dsl(sim: Tensor, dim: int, temperature: float = 0.01) -> Tensor:
    """Dual softmax / inverted softmax prior: ``S * softmax(S / temperature, dim) * S.shape[dim]``.

    ``dim`` must be the *query* dimension of the direction being evaluated: the softmax normalises each
    candidate's scores across all queries, down-weighting candidates that many queries like ("hubs").
    The result keeps the orientation of ``sim``. The factor n does not change any ranking (it is one
    constant); it is kept so the scores stay on the scale of the input.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    sim = _check_sim(sim, "sim", allow_inf=False)
    if dim not in (0, 1, -1, -2):
        raise ValueError(f"dim must be 0 or 1 for a 2-D matrix, got {dim}")
    n = sim.shape[dim]
    return sim * torch.softmax(sim / temperature, dim=dim) * n


def dsl_t2v(sim_tv: Tensor, temperature: float = 0.01) -> Tensor:
    """DSL scores for text→video, same [T, V] orientation as the input.

    Queries are texts (rows), so the softmax runs over dim 0: each video column is normalised across all
    texts (n = T). This is the reference's ``sim * softmax(sim / t2v_temp, dim=0) * len(sim)``.
    Rank the result with :func:`t2v_metrics`.
    """
    return dsl(sim_tv, dim=0, temperature=temperature)


def dsl_v2t(sim_tv: Tensor, temperature: float = 0.01) -> Tensor:
    """DSL scores for video→text, same [T, V] orientation as the input.

    Queries are videos (columns), so the softmax runs over dim 1: each caption row is normalised across
    all videos (n = V). This is the reference's ``sim * softmax(sim / v2t_temp, dim=1) * len(sim)``
    (its constant is T instead of V, which changes no rank). Rank the result with :func:`v2t_metrics`.
    """
    return dsl(sim_tv, dim=1, temperature=temperature)


def evaluate_similarity(
    sim_tv: Tensor,
    caption_video: Tensor | None = None,
    *,
    temperature: float = 0.01,
    ties: str = "optimistic",
    v2t_candidates: str = "videos",
) -> dict[str, dict[str, float]]:
    """The result rows for ``sim_tv`` [T, V]: raw t2v, raw v2t, and the DSL rows computed separately.

    Returns ``{"t2v": ..., "v2t": ..., "t2v_dsl": ..., "v2t_dsl": ...}``, each a dict with RANK_KEYS.
    ``v2t`` follows ``v2t_candidates`` (default ``"videos"``, the reference's protocol, see
    :func:`v2t_ranks`). With several captions per video (T > V) two labelled rows are added beside:
    ``v2t_captions`` and ``v2t_captions_dsl``, each video ranked against all T captions.
    ``caption_video`` defaults to the diagonal (1:1 data). DSL needs finite scores.
    """
    sim_tv = _check_sim(sim_tv, "sim_tv")
    v2t_dsl_scores = dsl_v2t(sim_tv, temperature)
    out = {
        "t2v": t2v_metrics(sim_tv, caption_video, ties=ties),
        "v2t": v2t_metrics(sim_tv, caption_video, ties=ties, candidates=v2t_candidates),
        "t2v_dsl": t2v_metrics(dsl_t2v(sim_tv, temperature), caption_video, ties=ties),
        "v2t_dsl": v2t_metrics(v2t_dsl_scores, caption_video, ties=ties, candidates=v2t_candidates),
    }
    if sim_tv.shape[0] > sim_tv.shape[1]:  # every video has a caption, so some video has several
        out["v2t_captions"] = v2t_metrics(sim_tv, caption_video, ties=ties, candidates="captions")
        out["v2t_captions_dsl"] = v2t_metrics(v2t_dsl_scores, caption_video, ties=ties, candidates="captions")
    return out


def format_table(results: dict[str, dict[str, float]]) -> str:
    """Fixed-width table: one line per direction (t2v, v2t, t2v_dsl, v2t_dsl first, then v2t_captions,
    v2t_captions_dsl, then any others), and a line under it saying what v2t and v2t_captions rank when
    the caption rows are there.

    A missing metric prints as ``-``; entries that are not metric rows (e.g. ``eval_block``,
    ``policies``) are ignored.
    """
    known = DIRECTIONS + CAPTION_DIRECTIONS
    results = {k: v for k, v in results.items() if isinstance(v, dict) and _is_row(v)}
    order = [d for d in known if d in results] + [d for d in results if d not in known]
    width = max([len("direction")] + [len(d) for d in order])
    lines = [f"{'direction':<{width}}" + "".join(f"{k:>8}" for k in RANK_KEYS)]
    lines.append("-" * len(lines[0]))
    for name in order:
        row = results[name]
        cells = []
        for k in RANK_KEYS:
            val = row.get(k)
            cells.append(f"{'-':>8}" if val is None else f"{float(val):>8.1f}")
        lines.append(f"{name:<{width}}" + "".join(cells))
    if any(d in results for d in CAPTION_DIRECTIONS):
        lines.append(_CAPTION_NOTE)
    return "\n".join(lines)


def _is_row(row: dict) -> bool:
    """A metric row: a dict with at least one of RANK_KEYS (not e.g. a nested ``policies`` dict)."""
    return any(k in row for k in RANK_KEYS)


# --- question answering (docs/reference.md, 'EMCL-QA') ----------------------------------------------------
QA_TYPE_ORDER = ("what", "who", "how", "when", "where")


def _percent(num: int, den: int) -> float | None:
    return 100.0 * num / den if den else None


def qa_accuracy(
    predictions: Sequence[int] | Tensor,
    answers: Sequence[str],
    answer_types: Sequence[str],
    ans2label: Mapping[str, int],
) -> dict:
    """Accuracy of predicted answer ids, overall and per answer type, in percent.

    A question whose ground-truth answer is not in ``ans2label`` (out of vocabulary, OOV) can never be
    answered by a classifier over the vocabulary: the headline ``accuracy`` counts it as wrong (over all
    questions); ``accuracy_filtered`` drops it, as the reference's test loader does, and ``oov_count`` says
    how many were dropped. A split (or type) with no in-vocabulary question has ``accuracy_filtered``
    None. Types are listed in MSRVTT-QA's order (what, who, how, when, where), then any others sorted.
    """
    preds = predictions.tolist() if isinstance(predictions, Tensor) else list(predictions)
    if not len(preds) == len(answers) == len(answer_types):
        raise ValueError(
            f"qa_accuracy: {len(preds)} predictions, {len(answers)} answers and {len(answer_types)} types"
        )
    if not preds:
        raise ValueError("qa_accuracy: no questions")
    stats: dict[str, list[int]] = {}  # type -> [questions, oov, correct]
    for pred, answer, atype in zip(preds, answers, answer_types):
        s = stats.setdefault(atype, [0, 0, 0])
        s[0] += 1
        label = ans2label.get(answer)
        if label is None:
            s[1] += 1
        elif int(pred) == label:
            s[2] += 1

    def row(n: int, oov: int, correct: int) -> dict:
        return {
            "accuracy": _percent(correct, n),
            "accuracy_filtered": _percent(correct, n - oov),
            "num_questions": n,
            "oov_count": oov,
            "correct": correct,
        }

    order = [t for t in QA_TYPE_ORDER if t in stats] + sorted(t for t in stats if t not in QA_TYPE_ORDER)
    total = [sum(s[i] for s in stats.values()) for i in range(3)]
    return {**row(*total), "per_type": {t: row(*stats[t]) for t in order}}


def format_qa_table(results: dict) -> str:
    """Fixed-width table of :func:`qa_accuracy` results: one line per answer type, then ``all``."""

    def cell(x: float | None) -> str:
        return f"{'-':>10}" if x is None else f"{x:>10.2f}"

    lines = [f"{'type':<8}{'questions':>10}{'oov':>8}{'accuracy':>10}{'filtered':>10}"]
    lines.append("-" * len(lines[0]))
    rows = list(results.get("per_type", {}).items()) + [("all", results)]
    for name, r in rows:
        lines.append(
            f"{name:<8}{r['num_questions']:>10}{r['oov_count']:>8}"
            + cell(r["accuracy"])
            + cell(r["accuracy_filtered"])
        )
    return "\n".join(lines)
