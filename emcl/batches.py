"""Moving loader batches to the device without stalls, for feature extraction and training loops.

``to_device(batch, device)``: every tensor of a batch dict to ``device`` with ``non_blocking=True``; from
pinned host memory (``build_loader`` pins on CUDA machines) such copies are asynchronous, so the step
does not wait for them and no host sync happens.

``prefetch_to_device(loader, device)``: iterates a loader with the next batch's copies already issued on
a side CUDA stream while the current batch computes; on the CPU it is ``to_device`` per batch.

``pad_rows(batch, size)``: pads a short last batch to the loader's batch size by repeating its last row,
so a compiled encoder sees one shape during extraction (no recompile for the remainder batch); the
caller keeps the first ``n`` rows of the outputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = ["pad_rows", "prefetch_to_device", "to_device"]


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` (a tensor, or a dict / list / tuple of them, nested) with its tensors on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in batch):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def prefetch_to_device(loader: Iterable[Any], device: torch.device | str) -> Iterator[Any]:
    """Batches of ``loader`` with tensors on ``device``; on CUDA the next batch is copied on a side stream
    while the caller computes on the current one (the tensors are then handed to the compute stream with
    ``record_stream`` so the caching allocator does not reuse them early)."""
    device = torch.device(device)
    if device.type != "cuda":
        for batch in loader:
            yield to_device(batch, device)
        return
    stream = torch.cuda.Stream(device)
    it = iter(loader)

    def issue() -> Any:
        try:
            host = next(it)
        except StopIteration:
            return StopIteration
        with torch.cuda.stream(stream):
            return to_device(host, device)

    nxt = issue()
    while nxt is not StopIteration:
        torch.cuda.current_stream(device).wait_stream(stream)
        batch = nxt
        _record(batch, torch.cuda.current_stream(device))
        nxt = issue()
        yield batch


def _record(batch: Any, stream: torch.cuda.Stream) -> None:
    if isinstance(batch, torch.Tensor):
        if batch.device.type == "cuda":
            batch.record_stream(stream)
    elif isinstance(batch, dict):
        for v in batch.values():
            _record(v, stream)
    elif isinstance(batch, (list, tuple)):
        for v in batch:
            _record(v, stream)


def pad_rows(batch: dict[str, Any], size: int) -> tuple[dict[str, Any], int]:
    """Pad every tensor of ``batch`` along dim 0 to ``size`` rows by repeating its last row.

    Returns ``(padded batch, n)`` with ``n`` the number of real rows (outputs ``[:n]`` are the real
    ones). Tensors of another length (e.g. scalars) and non-tensors are left as they are.
    """
    rows = {v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if len(rows) != 1:
        raise ValueError(f"pad_rows: batch tensors disagree on their number of rows: {sorted(rows)}")
    n = rows.pop()
    if n > size:
        raise ValueError(f"pad_rows: batch has {n} rows, more than size {size}")
    if n == size or n == 0:
        return batch, n
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
            v = torch.cat([v, v[-1:].expand(size - n, *v.shape[1:])])
        out[k] = v
    return out, n
