"""Mixed precision: bf16 autocast with fp32 master weights on CUDA, fp32 on CPU unless asked."""

from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device | str, precision: str = "auto"):
    """Context for the forward pass. ``auto``: bf16 on CUDA, fp32 elsewhere; ``bf16`` / ``fp32`` force it.

    Parameters stay fp32 (the optimiser's master copy); only activations and matmuls run in bf16.
    """
    device = torch.device(device)
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
