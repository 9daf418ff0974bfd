"""Frame normalisation done on the device, so frames can travel through the data loader as uint8."""

from __future__ import annotations

import functools

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@functools.lru_cache(maxsize=16)
def _affine(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``scale, shift`` with ``x * scale + shift == (x / 255 - mean) / std``, made once per
    device and dtype (no host-to-device copy per batch)."""
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float64)
    std = torch.tensor(CLIP_STD, dtype=torch.float64)
    scale, shift = 1.0 / (255.0 * std), -mean / std
    return scale.view(3, 1, 1).to(device, dtype), shift.view(3, 1, 1).to(device, dtype)


def normalize_frames(
    frames: torch.Tensor, dtype: torch.dtype = torch.float32, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Map uint8 RGB frames ``(..., 3, H, W)`` to CLIP's input space: ``(x / 255 - mean) / std``.

    Works on the tensor's own device in ``dtype`` (bf16 under autocast halves the memory of the biggest
    activation of a step) with one fused multiply-add. With ``mask`` (the frame dims of ``frames``,
    1 on real frames) padded frames become exact zeros, as the reference's zero-padded inputs.
    """
    if frames.dtype != torch.uint8:
        raise TypeError(f"normalize_frames expects uint8 frames, got {frames.dtype}")
    if frames.dim() < 3 or frames.shape[-3] != 3:
        raise ValueError(f"normalize_frames expects frames shaped (..., 3, H, W), got {tuple(frames.shape)}")
    scale, shift = _affine(frames.device, dtype)
    out = torch.addcmul(shift, frames.to(dtype), scale)
    if mask is not None:
        out.mul_(mask.to(dtype)[..., None, None, None])
    return out
