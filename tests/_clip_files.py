"""Pretrained CLIP files as users bring them, fabricated from a tiny open_clip CLIP: OpenAI's TorchScript
release archives (``ViT-B-32.pt``: fp16 weights under OpenAI's names plus the release's metadata tensors)."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, convert_weights_to_lp
from torch import nn


class OpenAIArchive(nn.Module):
    """Holds CLIP's weights under OpenAI's names, in fp16, plus the three metadata tensors of the release."""

    def __init__(self, model: CLIP, image: int) -> None:
        super().__init__()
        half = copy.deepcopy(model)
        convert_weights_to_lp(half)  # fp16 conv/linear/attention/projections, as OpenAI ships them
        for name in ("visual", "transformer", "token_embedding", "ln_final"):
            setattr(self, name, getattr(half, name))
        self.positional_embedding = half.positional_embedding
        self.text_projection = half.text_projection
        self.logit_scale = half.logit_scale
        self.register_buffer("input_resolution", torch.tensor(image))
        self.register_buffer("context_length", torch.tensor(77))
        self.register_buffer("vocab_size", torch.tensor(49408))

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(text)


def tiny_openai_clip(embed_dim: int = 32, image: int = 32, patch: int = 8, vision_width: int = 96,
                     text_width: int = 64, seed: int = 0) -> CLIP:
    """A tiny OpenAI-architecture CLIP (QuickGELU) built by open_clip itself, with fp16-exact weights."""
    torch.manual_seed(seed)
    model = CLIP(
        embed_dim,
        vision_cfg=CLIPVisionCfg(layers=2, width=vision_width, head_width=vision_width, patch_size=patch,
                                 image_size=image),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=text_width, heads=1, layers=2),
        quick_gelu=True,
    )
    with torch.no_grad():
        for param in model.parameters():  # perturb every weight (LN, biases too) so a mix-up shows
            param.add_(0.02 * torch.randn_like(param)).copy_(param.half().float())
        model.logit_scale.fill_(math.log(100.0))
    return model.eval()


def write_openai_archive(model: CLIP, path: Path) -> Path:
    """``model`` as OpenAI ships CLIP: a TorchScript archive of fp16 weights."""
    image = model.visual.image_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated
        traced = torch.jit.trace(OpenAIArchive(model, image[0] if isinstance(image, tuple) else image),
                                 torch.zeros(1, 4, dtype=torch.long))
    traced.save(str(path))
    return path
