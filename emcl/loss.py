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
