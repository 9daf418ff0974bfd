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
