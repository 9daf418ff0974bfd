"""Clip-level RandAugment: the same randomly drawn ops, with the same magnitudes, for every frame of a clip.

torchvision's ``transforms.v2.RandAugment`` draws its ops once per call and applies them to the whole
input tensor, whose leading dimensions are treated as a batch; so calling it on the stacked (T, 3, S, S)
clip gives every frame the same ops (tested: identical frames in, identical frames out). Ops with image
statistics (AutoContrast, Equalize) use each frame's own statistics, as a per-frame call would.
"""

from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode, v2


class ClipRandAugment:
    """RandAugment for a uint8 clip (T, 3, S, S); padded (masked) frames are left untouched (zero).

    The reference trains with timm's ``rand-m7-n4-mstd0.5``: 4 ops, magnitude 7 on timm's 0..10 scale,
    each op's magnitude drawn from N(7, 0.5) and clipped to [0, 10]. torchvision has no magnitude noise
    and its scale is 0..30 (``num_magnitude_bins=31``: its "magnitude 7" is 7/30 of each op's maximum,
    a third of timm's 7/10). This class therefore applies torchvision's RandAugment one op at a time
    (``num_ops`` calls of a one-op RandAugment, which is what torchvision's loop does) with a magnitude
    drawn per op, on a 0..``max_magnitude`` scale at 0.1 resolution:

    - defaults (``magnitude=7, magnitude_std=0.5, max_magnitude=10``) follow timm's m7 / mstd0.5;
    - ``magnitude_std=0, max_magnitude=30`` is exactly torchvision's ``RandAugment(num_ops, magnitude)``.

    Remaining differences from timm, not emulated: timm applies each op with probability 0.5, draws ops
    without replacement, includes Invert and SolarizeAdd and has no Identity op, fills with the image mean
    and interpolates bilinear/bicubic; here torchvision's op set, always applied, fill 0, bilinear.
    Random numbers come from torch's generator, so DataLoader worker seeding makes runs repeatable.
    """

    def __init__(self, num_ops: int = 4, magnitude: float = 7, magnitude_std: float = 0.5,
                 max_magnitude: float = 10,
                 interpolation: str | InterpolationMode = InterpolationMode.BILINEAR) -> None:
        if num_ops < 0:
            raise ValueError(f"num_ops must be >= 0, got {num_ops}")
        if not 0 <= magnitude <= max_magnitude:
            raise ValueError(f"magnitude must lie in [0, {max_magnitude}], got {magnitude}")
        if magnitude_std < 0:
            raise ValueError(f"magnitude_std must be >= 0, got {magnitude_std}")
        self.num_ops = int(num_ops)
        self.magnitude = float(magnitude)
        self.magnitude_std = float(magnitude_std)
        self.max_magnitude = float(max_magnitude)
        self._steps = int(round(self.max_magnitude * 10))  # bins at 0.1 magnitude resolution
        # torchvision 0.26 rejects a string here (0.29 accepts both): always pass the enum
        try:
            mode = InterpolationMode(interpolation)
        except ValueError:
            choices = ", ".join(m.value for m in InterpolationMode)
            raise ValueError(f"unknown interpolation {interpolation!r}; choose one of {choices}") from None
        self._op = v2.RandAugment(num_ops=1, magnitude=self._bin(self.magnitude),
                                  num_magnitude_bins=self._steps + 1, interpolation=mode)

    def _bin(self, magnitude: float) -> int:
        m = min(max(magnitude, 0.0), self.max_magnitude)
        return int(round(m / self.max_magnitude * self._steps))

    def _augment(self, clip: torch.Tensor) -> torch.Tensor:
        for _ in range(self.num_ops):
            m = self.magnitude
            if self.magnitude_std > 0:
                m = m + self.magnitude_std * float(torch.randn(()))
            self._op.magnitude = self._bin(m)
            clip = self._op(clip)
        return clip

    def __call__(self, frames: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Augment the real frames of one clip; returns a new uint8 tensor of the same shape.

        Real frames are those with ``mask == 1``; without a mask, the frames before the trailing all-zero
        (padding) frames. An all-zero frame stays zero under every op at these magnitudes anyway.
        """
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"expected a uint8 clip (T, 3, S, S), got {tuple(frames.shape)} {frames.dtype}")
        if mask is None:
            nonzero = frames.flatten(1).any(dim=1).nonzero()
            real = torch.zeros(frames.shape[0], dtype=torch.bool)
            if len(nonzero):
                real[: int(nonzero[-1]) + 1] = True
        else:
            if mask.shape != frames.shape[:1]:
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match {frames.shape[0]} frames")
            real = mask.bool()
        out = frames.clone()
        if real.any():
            out[real] = self._augment(frames[real])
        return out

    def __repr__(self) -> str:
        return (f"ClipRandAugment(num_ops={self.num_ops}, magnitude={self.magnitude}, "
                f"magnitude_std={self.magnitude_std}, max_magnitude={self.max_magnitude})")
