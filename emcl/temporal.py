"""Temporal aggregation of per-frame features shared by EMCL-Net (``seqTransf``) and EMCL-QA."""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from emcl.clip import CLIPBackbone

log = logging.getLogger(__name__)

# the reference's temporal blocks use its own LayerNorm, whose epsilon is 1e-12 (CLIP's towers use 1e-5)
REFERENCE_LAYER_NORM_EPS = 1e-12


class FrameTransformer(nn.Module):
    """Learned frame positions, CLIP-text-shaped blocks, key-padding mask, residual add.

    EMCL-Net's ``seqTransf``: ``out = blocks(x + pos) + x``. With ``out_proj`` (EMCL-QA's ``mean_proj``)
    a linear layer maps the blocks' output before the residual add: ``out = mean_proj(blocks(x + pos)) + x``.
    Padded frames (mask 0) are never attended to, so the outputs at real frames do not depend on how much
    padding follows them. ``layer_norm_eps`` replaces the copied blocks' LayerNorm epsilon (CLIP's 1e-5);
    EMCL-Net passes the reference's :data:`REFERENCE_LAYER_NORM_EPS`.
    """

    def __init__(
        self,
        clip: CLIPBackbone,
        layers: int = 4,
        init_from_text: bool = True,
        out_proj: bool = False,
        layer_norm_eps: float | None = None,
    ) -> None:
        super().__init__()
        width, ctx = clip.embed_dim, clip.context_length
        text_blocks = clip.text_blocks
        self.position = nn.Embedding(ctx, width)
        nn.init.normal_(self.position.weight, std=0.02)
        self.heads = clip.text_heads if clip.text_width == width else max(1, width // 64)
        shape_matches = clip.text_width == width and len(text_blocks) >= layers
        if init_from_text and shape_matches:
            # the initialisation trick: frame positions <- text positions, blocks <- text blocks 0..layers-1
            with torch.no_grad():
                self.position.weight.copy_(clip.text_positional_embedding[:ctx])
            self.blocks = nn.ModuleList(copy.deepcopy(text_blocks[i]) for i in range(layers))
        else:
            if init_from_text:
                log.warning(
                    "seqTransf: CLIP text tower (width %d, %d blocks) cannot seed %d blocks of width %d; "
                    "using random initialisation",
                    clip.text_width,
                    len(text_blocks),
                    layers,
                    width,
                )
            from open_clip.transformer import ResidualAttentionBlock

            self.blocks = nn.ModuleList(ResidualAttentionBlock(width, self.heads) for _ in range(layers))
        if layer_norm_eps is not None:
            for module in self.blocks.modules():
                if isinstance(module, nn.LayerNorm):
                    module.eps = layer_norm_eps
        self.batch_first = getattr(self.blocks[0].attn, "batch_first", True)
        if out_proj:
            self.mean_proj = nn.Linear(width, width)
        else:
            self.mean_proj = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = x + self.position.weight[:t].to(x.dtype)
        # additive key-padding mask (B*heads, T, T); -1e6 as the reference, safe in bf16 and fp32
        pad = (1.0 - mask.to(torch.float32))[:, None, None, :] * -1e6
        attn_mask = pad.expand(b, self.heads, t, t).reshape(b * self.heads, t, t)
        if not self.batch_first:
            h = h.transpose(0, 1)
        for block in self.blocks:
            h = block(h, attn_mask=attn_mask)
        if not self.batch_first:
            h = h.transpose(0, 1)
        if self.mean_proj is not None:
            h = self.mean_proj(h)
        return h + x
