"""Contrastive losses shared by the retrieval and QA tasks."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def symmetric_ce(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on a square logit matrix with the matched pairs on the diagonal.

    ``0.5 * (CE(logits) + CE(logits^T))``, computed in float32 whatever the autocast dtype.
    """
    if logits.dim() != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"symmetric_ce needs a square (B, B) logit matrix, got {tuple(logits.shape)}")
    logits = logits.float()
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def positive_targets(ids: torch.Tensor) -> torch.Tensor:
    """(B, B) float32 targets: row i spreads its mass evenly over the pairs j with ``ids[j] == ids[i]``.

    The matrix is symmetric (it is also the target of every column), and the identity when all ids
    differ.
    """
    if ids.dim() != 1 or ids.is_floating_point():
        raise ValueError(f"ids must be a 1-D integer tensor, got {tuple(ids.shape)} {ids.dtype}")
    same = (ids[:, None] == ids[None, :]).float()
    return same / same.sum(dim=1, keepdim=True)


def multi_positive_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where every pair of the batch with the same id is a positive.

    ``logits`` (B, B): text of pair i against video of pair j; ``ids`` (B,): the video of each pair (its
    index in the split). Captions of the same video in one batch are then positives for each other's
    video instead of negatives: text i's target is spread evenly over the columns of its video (and video
    j's over the rows of its texts), ``0.5 * (CE(logits, P) + CE(logits^T, P))`` with soft targets
    ``P = positive_targets(ids)``. Equals :func:`symmetric_ce` when all ids differ. Float32 throughout.
    """
    if logits.dim() != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"multi_positive_ce needs a square (B, B) logit matrix, got {tuple(logits.shape)}")
    if ids.shape != logits.shape[:1]:
        raise ValueError(f"ids has shape {tuple(ids.shape)}, expected ({logits.shape[0]},) for the batch")
    logits = logits.float()
    target = positive_targets(ids.to(logits.device))
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def hinge_topk(sim: torch.Tensor, margin: float = 0.05, topk: int = 1) -> torch.Tensor:
    """MMT's ranking loss: ``max(0, margin - S_ii + S_neg)`` over the ``topk`` hardest negatives of each
    row (text->video) and each column (video->text), averaged over 2B x k terms, in float32.

    As the reference, the diagonal is masked out of the negatives, and ``topk`` counts it when it is as
    large as the batch: k = 32 with batch 32 is 31 real negatives plus one zero term. ``k = min(topk, B)``.
    """
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"hinge_topk needs a square (B, B) similarity matrix, got {tuple(sim.shape)}")
    sim = sim.float()
    b = sim.shape[0]
    k = min(topk, b)
    pos = sim.diagonal()[:, None]
    eye = torch.eye(b, dtype=torch.bool, device=sim.device)
    neg = sim.masked_fill(eye, -1e8)
    an = torch.cat([neg.topk(k, dim=1).values, neg.t().topk(k, dim=1).values])  # (2B, k)
    return F.relu(margin - pos.repeat(2, 1) + an).mean()
