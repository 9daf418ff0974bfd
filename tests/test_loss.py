"""Contrastive losses: symmetric InfoNCE and the multi-positive variant (--multi_positive)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from emcl.loss import multi_positive_ce, positive_targets, symmetric_ce


def test_multi_positive_equals_symmetric_ce_when_all_videos_differ():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 7, generator=g) * 10
    ids = torch.tensor([4, 0, 9, 2, 7, 1, 3])
    assert torch.allclose(multi_positive_ce(logits, ids), symmetric_ce(logits), atol=1e-6)
    assert torch.equal(positive_targets(ids), torch.eye(7))
    half = logits.bfloat16()  # float32 inside, like symmetric_ce
    assert multi_positive_ce(half, ids).dtype == torch.float32


def test_target_mass_is_spread_over_the_captions_of_the_same_video():
    # pairs 0, 2, 3 show video 5; pairs 1 and 4 show video 8; pair 5 video 1
    ids = torch.tensor([5, 8, 5, 5, 8, 1])
    p = positive_targets(ids)
    third, half = 1 / 3, 1 / 2
    want = torch.tensor(
        [
            [third, 0, third, third, 0, 0],
            [0, half, 0, 0, half, 0],
            [third, 0, third, third, 0, 0],
            [third, 0, third, third, 0, 0],
            [0, half, 0, 0, half, 0],
            [0, 0, 0, 0, 0, 1],
        ]
    )
    assert torch.allclose(p, want) and torch.allclose(p.sum(1), torch.ones(6)) and torch.equal(p, p.T)

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 6, generator=g, requires_grad=True)
    loss = multi_positive_ce(logits, ids)
    # by hand: mean over rows of -sum_j P_ij log softmax_j, both directions
    t2v = -(want * F.log_softmax(logits, dim=1)).sum(1).mean()
    v2t = -(want * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    assert torch.allclose(loss, 0.5 * (t2v + v2t), atol=1e-6)
    # gradient: d/dlogits = 0.5/B * [(softmax_rows - P) + (softmax_cols - P^T)^T]
    (grad,) = torch.autograd.grad(loss, logits)
    sm_r, sm_c = F.softmax(logits, dim=1), F.softmax(logits, dim=0)
    assert torch.allclose(grad, 0.5 / 6 * ((sm_r - want) + (sm_c - want)), atol=1e-6)
    # the other pairs of a video are no longer negatives: a text that scores another pair of its own
    # video above its own pair is penalised less than by plain InfoNCE
    tied = torch.where(want > 0, 5.0, 0.0)
    prefers_other = tied - 2 * torch.eye(6) * (want < 1)
    assert multi_positive_ce(prefers_other, ids) < symmetric_ce(prefers_other) - 0.5
    # the minimum of the soft-target loss: softmax equal to the targets
    best = torch.log(want.clamp_min(1e-12))
    assert multi_positive_ce(best, ids) < multi_positive_ce(tied, ids)


def test_multi_positive_rejects_bad_shapes():
    with pytest.raises(ValueError, match="square"):
        multi_positive_ce(torch.zeros(3, 4), torch.arange(3))
    with pytest.raises(ValueError, match="ids"):
        multi_positive_ce(torch.zeros(3, 3), torch.arange(4))
    with pytest.raises(ValueError, match="integer"):
        positive_targets(torch.zeros(3))
