"""Frame normalisation done on the device, so frames can travel through the data loader as uint8."""

from __future__ import annotations

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_frames(frames: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Map uint8 RGB frames ``(..., 3, H, W)`` to CLIP's input space: ``(x / 255 - mean) / std``.

    Works on the tensor's own device; the arithmetic is done in float32 and the result cast to ``dtype``.
    Zero-padded frames become the (constant) normalised black image; the frame mask keeps them out.
    """
    if frames.dtype != torch.uint8:
        raise TypeError(f"normalize_frames expects uint8 frames, got {frames.dtype}")
    if frames.dim() < 3 or frames.shape[-3] != 3:
        raise ValueError(f"normalize_frames expects frames shaped (..., 3, H, W), got {tuple(frames.shape)}")
    mean = torch.tensor(CLIP_MEAN, device=frames.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=frames.device).view(3, 1, 1)
    out = (frames.float() / 255.0 - mean) / std
    return out.to(dtype)
