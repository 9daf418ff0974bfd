"""Non-finite checks of the run loop (emcl.train.finite)."""

from __future__ import annotations

import argparse

import pytest
import torch

from emcl.train.finite import NonFiniteError, check_finite_steps, check_finite_weights, nonfinite_tensors


def test_nonfinite_tensors():
    m = torch.nn.Linear(2, 2)
    assert nonfinite_tensors(m) == []
    with torch.no_grad():
        m.bias[0] = float("inf")
    assert nonfinite_tensors(m) == ["bias"]
    assert nonfinite_tensors({"a": torch.tensor([1, 2]), "b": torch.tensor([float("nan")])}) == ["b"]


def test_check_finite_steps_and_weights_name_the_epoch_and_step():
    cfg = argparse.Namespace(lr=1e-3)
    check_finite_steps(torch.tensor(-1), 0, cfg)
    msg = r"non-finite loss or gradient at epoch 2, step 7 \(--lr 0\.001\); the run stopped"
    with pytest.raises(NonFiniteError, match=msg):
        check_finite_steps(torch.tensor(7), 1, cfg)
    m = torch.nn.Linear(2, 2)
    check_finite_weights(m, 0, 3, cfg)
    with torch.no_grad():
        m.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"non-finite weights after epoch 1, step 3 \(weight\)"):
        check_finite_weights(m, 0, 3, cfg)
