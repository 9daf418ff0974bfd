"""Non-finite checks of the run loop: a NaN or infinite loss, gradient norm or weight is an error
(:class:`NonFiniteError`), never a result; the run stops before saving that state."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import torch

from emcl.errors import UserError

__all__ = ["NonFiniteError", "check_finite_steps", "check_finite_weights", "nonfinite_tensors"]


class NonFiniteError(UserError):
    """The loss or the gradient norm became NaN or infinite: the run stops before saving that state."""


def nonfinite_tensors(tensors: torch.nn.Module | Mapping[str, Any], limit: int = 10) -> list[str]:
    """Names of (at most ``limit``) floating-point parameters, buffers or state-dict entries holding a
    NaN or infinite value."""
    items = tensors.state_dict().items() if isinstance(tensors, torch.nn.Module) else tensors.items()
    bad = []
    for name, t in items:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.append(str(name))
            if len(bad) >= limit:
                break
    return bad


def check_finite_steps(first_bad: torch.Tensor, epoch: int, cfg: argparse.Namespace) -> None:
    """Stop if a step of this epoch had a non-finite loss or gradient norm (one host sync).

    ``first_bad``: the first such step (1-based, counted over the run), -1 while there is none."""
    bad = int(first_bad)
    if bad >= 0:
        raise NonFiniteError(
            f"non-finite loss or gradient at epoch {epoch + 1}, step {bad} (--lr {cfg.lr:g}); the run "
            f"stopped before saving that state. Lower --lr, check {_temp(cfg)}the inputs"
        )


def _temp(cfg: argparse.Namespace) -> str:
    """The frame-pooling temperature is worth checking only in a task that has one (not MMT)."""
    return "--temp and " if hasattr(cfg, "temp") else ""


def check_finite_weights(model: torch.nn.Module, epoch: int, step: int, cfg: argparse.Namespace) -> None:
    """Stop if the weights hold a NaN or infinite value after an epoch (e.g. an update that overflowed)."""
    bad_weights = nonfinite_tensors(model)
    if bad_weights:
        raise NonFiniteError(
            f"non-finite weights after epoch {epoch + 1}, step {step} ({', '.join(bad_weights)}); the "
            f"run stopped before saving that state. Lower --lr (now {cfg.lr:g})"
        )
