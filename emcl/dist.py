"""Distributed helpers: process-group setup, gathers with and without gradient, seeding.

Every function works in a plain single process (no torchrun, no process group) as a no-op, so training
and evaluation code can call them unconditionally. Backend: NCCL for CUDA devices, gloo for CPU.

Gradient of the all-gather (docs/reference.md, 'EMCL-Net': several ranks).
Setting: W ranks, rank r embeds its rows x_r = f_θ(input_r); every rank gathers X = [x_0; ...; x_{W-1}]
and computes the *same* loss L(X) on the full batch; DDP then averages the parameter gradients over ranks.
The single-process gradient of L on the full batch is dL/dθ = Σ_r (∂L/∂x_r)(∂x_r/∂θ).

* ``reduce_grads=False`` (the reference's custom AllGather): rank r keeps only ∂L/∂x_r for its slice, so
  its θ-gradient is (∂L/∂x_r)(∂x_r/∂θ) and DDP's average gives (1/W)·dL/dθ: the gradient is scaled by
  1/W (with Adam this mostly cancels, but not under gradient clipping, weight-decay balance or eps).
* ``reduce_grads=True`` (default, ours): the backward sums the slice gradients of all ranks,
  Σ_s ∂L_s/∂x_r = W·∂L/∂x_r, so after DDP's average the gradient equals dL/dθ exactly.
  ``torch.distributed.nn.functional.all_gather`` has the same semantics (its backward is a
  reduce-scatter with SUM); we use our own small autograd.Function so both behaviours are explicit.

Every rank must run the backward through each gathered tensor (the backward is a collective).
"""

from __future__ import annotations

import datetime as _dt
import os
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "DistInfo",
    "init_distributed",
    "is_dist",
    "get_rank",
    "get_world_size",
    "is_main",
    "barrier",
    "cleanup",
    "all_gather_with_grad",
    "gather_tensors_no_grad",
    "all_gather_object_list",
    "reduce_mean",
    "seed_everything",
]

_MAX_DIMS = 8


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size, rank on its node, its device.

    Multi-node runs: ``rank`` / ``is_main`` are global (one process in the whole job), ``local_rank`` is
    the process's index on its own node and only chooses the GPU. Everything done once per run (log
    file, config, checkpoints, metrics, building a frame cache or synthetic data on shared storage)
    belongs to ``is_main``; ``is_local_main`` (one process per node) is only for node-local scratch.
    Several nodes writing the same output folder need it on a shared file system (every rank reads the
    selected checkpoint back from it).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool

    @property
    def is_local_main(self) -> bool:
        """True on the first process of each node (node-local work only; see the class docstring)."""
        return self.local_rank == 0


def _env_int(name: str, default: int | None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        if default is None:
            raise RuntimeError(f"environment variable {name} is required when WORLD_SIZE > 1 (use torchrun)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def init_distributed(
    device: str | torch.device | None = None,
    *,
    init_method: str | None = None,
    timeout_s: float = 1800.0,
) -> DistInfo:
    """Set up this process from torchrun's RANK / WORLD_SIZE / LOCAL_RANK (defaults 0 / 1 / 0).

    RANK is global (across nodes), LOCAL_RANK the index on this node: the rank decides rank-0 work
    (``DistInfo.is_main``), the local rank only the GPU. ``device`` None → CUDA if available, else CPU.
    With a CUDA device and WORLD_SIZE > 1 the process uses ``cuda:LOCAL_RANK`` (an explicit index in
    ``device`` is ignored then). With WORLD_SIZE > 1 the process group is created (NCCL for CUDA, gloo
    for CPU) from ``init_method`` (default ``env://``, i.e. MASTER_ADDR / MASTER_PORT, which torchrun's
    rendezvous sets on every node); an already initialised group is reused. WORLD_SIZE 1 creates no group.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world_size}")
    rank = _env_int("RANK", 0 if world_size == 1 else None)
    local_rank = _env_int("LOCAL_RANK", rank if world_size == 1 else None)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size})")
    if local_rank < 0:
        raise ValueError(f"LOCAL_RANK={local_rank} is negative")

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {str(device)!r} requested but CUDA is not available")
        if world_size > 1 or dev.index is None:
            dev = torch.device("cuda", local_rank)  # the GPU follows the node-local rank, never RANK
        if dev.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"cuda:{dev.index} requested (LOCAL_RANK={local_rank}) but only "
                f"{torch.cuda.device_count()} CUDA device(s) are visible"
            )
        torch.cuda.set_device(dev)

    if world_size > 1 and not dist.is_initialized():
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this torch build")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            init_method=init_method or "env://",
            rank=rank,
            world_size=world_size,
            timeout=_dt.timedelta(seconds=timeout_s),
        )
    if is_dist() and (dist.get_rank() != rank or dist.get_world_size() != world_size):
        raise RuntimeError(
            f"existing process group (rank {dist.get_rank()}, world {dist.get_world_size()}) disagrees with "
            f"RANK={rank} WORLD_SIZE={world_size}"
        )
    return DistInfo(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=dev,
        is_main=rank == 0,
    )


def is_dist() -> bool:
    """True when a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank, 0 without a process group."""
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    """World size, 1 without a process group."""
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return get_rank() == 0


def _comm_device() -> torch.device:
    """Device that collectives of the current backend take tensors on."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for all ranks; no-op in a single process."""
    if get_world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def cleanup() -> None:
    """Destroy the process group if one exists."""
    if is_dist():
        dist.destroy_process_group()


class _AllGatherGrad(torch.autograd.Function):
    """Concatenate tensors from all ranks along dim 0; see the module docstring for backward.

    ``sizes`` (the length of every rank's tensor) allows ranks to differ in length: each pads to the
    longest for the collective and the padding is cut out again. ``None`` means equal lengths.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, reduce_grads: bool, sizes: list[int] | None) -> Tensor:  # type: ignore[override]
        world, rank = dist.get_world_size(), dist.get_rank()
        x = x.contiguous()
        n = x.shape[0]
        sizes = sizes or [n] * world
        longest = max(sizes)
        padded = x if n == longest else torch.cat([x, x.new_zeros((longest - n, *x.shape[1:]))])
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        ctx.reduce_grads = reduce_grads
        ctx.start, ctx.n = sum(sizes[:rank]), n
        return torch.cat([p[:k] for p, k in zip(parts, sizes)], dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        if ctx.reduce_grads:
            grad = grad.contiguous().clone()
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.start + ctx.n], None, None


def all_gather_with_grad(x: Tensor, reduce_grads: bool = True, variable: bool = False) -> Tensor:
    """Concatenate ``x`` from all ranks along dim 0, in rank order.

    Gradient reaches only the local slice. ``reduce_grads=True`` sums that slice's gradient over ranks
    (correct full-batch gradient after DDP's averaging); ``False`` reproduces the reference (1/W scale).
    ``variable=True`` lets the ranks' lengths differ (e.g. after skipping unreadable videos); it costs one
    extra small collective and a host sync to learn the lengths. Identity in a single process.
    """
    if get_world_size() == 1:
        return x
    if x.dim() == 0:
        raise ValueError("all_gather_with_grad needs a tensor with a batch dimension, got a scalar")
    sizes = None
    if variable:
        n = torch.tensor([x.shape[0]], dtype=torch.long, device=_comm_device())
        counts = [torch.empty_like(n) for _ in range(get_world_size())]
        dist.all_gather(counts, n)
        sizes = [int(c) for c in torch.cat(counts).tolist()]
    return _AllGatherGrad.apply(x, reduce_grads, sizes)


def _gather_shapes(x: Tensor, device: torch.device) -> list[tuple[int, ...]]:
    if x.dim() > _MAX_DIMS:
        raise ValueError(f"gather_tensors_no_grad supports at most {_MAX_DIMS} dims, got {x.dim()}")
    meta = torch.full((1 + _MAX_DIMS,), -1, dtype=torch.long, device=device)
    meta[0] = x.dim()
    if x.dim():
        meta[1 : 1 + x.dim()] = torch.tensor(x.shape, dtype=torch.long)
    metas = [torch.empty_like(meta) for _ in range(get_world_size())]
    dist.all_gather(metas, meta)
    shapes = []
    for m in metas:
        m = m.tolist()
        shapes.append(tuple(m[1 : 1 + m[0]]))
    return shapes


@torch.no_grad()
def gather_tensors_no_grad(x: Tensor) -> Tensor:
    """Concatenate tensors of different lengths (dim 0) from all ranks, in rank order; for evaluation.

    Trailing dims and dtype must agree across ranks (checked: every rank raises the same error). Each
    rank's tensor is padded to the longest, gathered, then trimmed. Note that a DistributedSampler hands
    out indices ``rank::W`` and pads with repeats: gather the dataset indices too and reorder/deduplicate
    with them. Returns ``x`` itself (detached) in a single process; the result lives on ``x``'s device.
    """
    x = x.detach()
    if get_world_size() == 1:
        return x
    if x.dim() == 0:
        raise ValueError("gather_tensors_no_grad needs a tensor with a batch dimension, got a scalar")
    device = _comm_device()
    shapes = _gather_shapes(x, device)
    dtypes = all_gather_object_list(str(x.dtype))
    if len(set(dtypes)) != 1:
        raise ValueError(f"gather_tensors_no_grad: ranks disagree on dtype: {dtypes}")
    tails = {s[1:] for s in shapes}
    if len(tails) != 1 or len({len(s) for s in shapes}) != 1:
        raise ValueError(f"gather_tensors_no_grad: ranks disagree on trailing shape: {shapes}")
    lengths = [s[0] for s in shapes]
    longest = max(lengths)
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=device)
    padded[: x.shape[0]] = x.to(device)
    parts = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(parts, padded)
    out = torch.cat([p[:n] for p, n in zip(parts, lengths)], dim=0)
    return out.to(x.device)


@torch.no_grad()
def gather_in_order(x: Tensor, idx: Tensor, n: int, fill: float = 0) -> Tensor:
    """Evaluation rows computed on every rank, put back in dataset order.

    ``x``: this rank's rows; ``idx``: the dataset index of every row of every rank, already gathered
    (``gather_tensors_no_grad`` of the ranks' indices, in rank order, so one gather serves several
    tensors). Returns an (n, ...) tensor on every rank; rows no rank computed hold ``fill``.
    """
    x = gather_tensors_no_grad(x)
    out = torch.full((n, *x.shape[1:]), fill, dtype=x.dtype, device=x.device)
    out[idx] = x
    return out


def all_gather_object_list(obj: Any) -> list[Any]:
    """Gather one picklable object per rank into a list in rank order; ``[obj]`` in a single process."""
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def reduce_mean(x: Tensor | float) -> Tensor | float:
    """Mean of a logging value over ranks (tensor in → detached tensor out, number in → float out)."""
    is_tensor = isinstance(x, Tensor)
    if get_world_size() == 1:
        return x.detach() if is_tensor else float(x)
    t = x.detach() if is_tensor else torch.tensor(float(x))
    orig_device, orig_dtype = t.device, t.dtype
    t = t.to(device=_comm_device(), dtype=torch.float64)  # exact sum, and gloo lacks some low dtypes
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t = t / get_world_size()
    if not is_tensor:
        return float(t)
    return t.to(orig_device, orig_dtype if orig_dtype.is_floating_point else torch.float64)


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python, numpy and torch (CPU and CUDA) with ``seed + rank``; returns that seed.

    Different ranks get different streams (e.g. dropout, augmentation); the same rank and seed repeat.
    """
    value = int(seed) + int(rank)
    random.seed(value)
    try:
        import numpy as np

        np.random.seed(value % 2**32)
    except ImportError:  # numpy is optional here
        pass
    torch.manual_seed(value)
    torch.cuda.manual_seed_all(value)
    return value
