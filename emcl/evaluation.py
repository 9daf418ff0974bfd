"""The one evaluation path: encode a split once, then score it under every policy.

Every task (EMCL-Net, joint training, QA), the inference module and search encode through
:func:`encode_split`, and the retrieval tasks score through :func:`evaluate_policies`:

- ``encode_split(loader, fn, n, device, precision)``: the loader's batches go to the device (copied ahead
  on a side stream on CUDA), ``fn(batch)`` runs under the run's autocast, and its outputs are put back in
  dataset order on every rank (each rank encodes its own share of the split). Floating outputs come back
  in float32: everything after the encoders (pooling, EM, residual, normalise, cosine) runs in float32.
- ``evaluate_policies(score_rows, policies, metrics)``: for each policy, this rank's rows of the score
  matrix (:mod:`emcl.scoring` blocks them), gathered, then ranked (:mod:`emcl.metrics`); the time of each.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from emcl import dist
from emcl.amp import autocast
from emcl.batches import pad_rows, prefetch_to_device

__all__ = ["encode_split", "evaluate_policies"]


@torch.no_grad()
def encode_split(
    loader: Iterable[dict[str, Any]],
    fn: Callable[[dict[str, Any]], Tensor | Sequence[Tensor]],
    n: int,
    device: torch.device,
    precision: str = "auto",
    index_key: str = "index",
    pad_to: int | None = None,
    fill: float = 0,
) -> tuple[Tensor, ...]:
    """``fn`` over every batch of this rank's ``loader``, gathered from every rank into ``n`` rows in
    dataset order (``batch[index_key]`` says where each row goes; rows no rank computed hold ``fill``).

    ``fn`` returns a tensor or a tuple of tensors, one row per sample; floating ones are returned as
    float32. ``pad_to``: a short last batch is padded to this many rows (a compiled encoder then sees one
    shape) and the padding rows dropped from the outputs.
    """
    parts: list[list[Tensor]] = []
    index: list[Tensor] = []
    for batch in prefetch_to_device(loader, device):
        rows = len(batch[index_key])
        if pad_to is not None:
            batch, rows = pad_rows(batch, pad_to)
        with autocast(device, precision):
            out = fn(batch)
        out = (out,) if isinstance(out, Tensor) else tuple(out)
        if not parts:
            parts = [[] for _ in out]
        for slot, t in zip(parts, out):
            slot.append(t[:rows].float() if t.is_floating_point() else t[:rows])
        index.append(batch[index_key][:rows])
    parts, idx = _local(parts, index, device)
    idx = dist.gather_tensors_no_grad(idx)  # one gather of the indices serves every output
    return tuple(dist.gather_in_order(p, idx, n, fill=fill) for p in parts)


def _local(
    parts: list[list[Tensor]], index: list[Tensor], device: torch.device
) -> tuple[list[Tensor], Tensor]:
    """This rank's outputs concatenated; a rank that got no batch takes the outputs' shapes from another."""
    shapes = [(tuple(p[0].shape[1:]), p[0].dtype) for p in parts] if parts else None
    if dist.get_world_size() > 1:
        shapes = next((s for s in dist.all_gather_object_list(shapes) if s is not None), None)
    if shapes is None:
        raise ValueError("encode_split: the split is empty on every rank")
    if not parts:
        empty = [torch.empty((0, *shape), dtype=dtype, device=device) for shape, dtype in shapes]
        return empty, torch.empty(0, dtype=torch.long, device=device)
    return [torch.cat(p) for p in parts], torch.cat(index).to(device)


def evaluate_policies(
    score_rows: Callable[[str], Tensor], policies: Sequence[str], metrics: Callable[[Tensor], dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, float]]:
    """Every policy scored from the same features: ``score_rows(policy)`` gives this rank's rows of the
    score matrix, which are gathered and ranked by ``metrics``. Returns (results by policy, seconds by
    policy)."""
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for policy in policies:
        t0 = time.perf_counter()
        sim = dist.gather_tensors_no_grad(score_rows(policy))
        results[policy] = metrics(sim)
        seconds[policy] = round(time.perf_counter() - t0, 3)
    return results, seconds
