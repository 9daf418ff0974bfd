"""Activation memory of the CLIP towers: selective activation checkpointing and leaner saved tensors.

None of this changes the module tree's parameters or buffers, so ``state_dict`` keys and checkpoints
are the same with and without it, and every option can be switched on or off on a built model.

Where the memory of a training step goes (ViT-B/32, batch 128 x 12 frames = 1,536 images of 50 tokens,
width 768, bf16 autocast, eager): per vision block and per element of the (tokens, width) residual
stream, about 44 bytes are kept for the backward pass:

* each of the two LayerNorms: autocast runs ``layer_norm`` in float32, so it keeps a float32 copy of its
  input (4 B) and the bf16 output that the next linear keeps (2 B);
* attention: q, k, v and the output (8 B);
* the MLP (4x wide): ``QuickGELU`` = ``x * sigmoid(1.702 x)`` keeps its input and the sigmoid (2 x 8 B),
  and ``c_proj`` keeps the product (8 B).

That is about 2.6 GB per block, 31 GB for the 12 vision blocks. The options:

``checkpoint_blocks(transformer, level, layers)``: recompute parts of the first ``layers`` blocks in the
backward pass instead of keeping their activations:
  * ``"blocks"``: whole blocks (keeps only each block's input, 2 B; recomputes the whole forward);
  * ``"mlp"``: LayerNorm 2 + MLP (saves 32 of the 44 B, recomputes two thirds of the block's FLOPs);
  * ``"attn"``: LayerNorm 1 + attention (saves 12 B, recomputes the rest).
``lean_activations(module)``: keep fewer copies, recomputing nothing costly:
  * ``QuickGELU`` as one autograd function that keeps only its input and recomputes the sigmoid in the
    backward pass (saves 8 B);
  * LayerNorm on bf16 input without autocast's float32 copy: PyTorch's layer norm takes bf16 input with
    float32 weights and computes its statistics in float32 anyway, and open_clip casts the output back to
    the input dtype; the kept input is then the bf16 tensor (saves 2 x 2 B). Results agree with the
    autocast path to bf16 rounding of the output.

Chunked frame encoding is not offered for training: without recomputation the activations of every chunk
are kept for the backward pass, so the peak does not fall; with recomputation it is block checkpointing.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["CHECKPOINT_LEVELS", "checkpoint_blocks", "lean_activations", "LeanQuickGELU", "LeanLayerNorm"]

CHECKPOINT_LEVELS = ("none", "blocks", "attn", "mlp")
_ATTR = "_emcl_checkpoint"


def _residual_block_forward(
    block: nn.Module,
    q_x: torch.Tensor,
    k_x: torch.Tensor | None = None,
    v_x: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """open_clip's ``ResidualAttentionBlock.forward`` with the sub-layer named by the block's level
    recomputed in the backward pass (non-reentrant checkpoint, so it composes with torch.compile)."""
    level = getattr(block, _ATTR)
    if k_x is not None or v_x is not None:
        raise NotImplementedError("selective checkpointing supports self-attention blocks only")

    def attn_part(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return block.ls_1(block.attention(q_x=block.ln_1(x), attn_mask=mask))

    def mlp_part(x: torch.Tensor) -> torch.Tensor:
        return block.ls_2(block.mlp(block.ln_2(x)))

    if level == "attn":
        x = q_x + checkpoint(attn_part, q_x, attn_mask, use_reentrant=False)
        return x + mlp_part(x)
    x = q_x + attn_part(q_x, attn_mask)
    return x + checkpoint(mlp_part, x, use_reentrant=False)


def _transformer_forward(
    transformer: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """open_clip's ``Transformer.forward`` with whole-block checkpointing chosen per block: a block at
    level ``"blocks"`` is called through ``checkpoint`` as a module (its hooks run again in the
    recomputation, as with open_clip's own switch); the others are called normally (the ``"attn"`` /
    ``"mlp"`` levels checkpoint inside the block's forward)."""
    if not transformer.batch_first:
        x = x.transpose(0, 1).contiguous()
    for block in transformer.resblocks:
        if getattr(block, _ATTR, "none") == "blocks":
            x = checkpoint(block, x, None, None, attn_mask, use_reentrant=False)
        else:
            x = block(x, attn_mask=attn_mask)
    if not transformer.batch_first:
        x = x.transpose(0, 1)
    return x


def _blocks(transformer: nn.Module) -> nn.ModuleList:
    blocks = getattr(transformer, "resblocks", None)
    if blocks is None:
        raise TypeError(f"{type(transformer).__name__} has no resblocks")
    return blocks


def checkpoint_blocks(
    transformer: nn.Module, level: str | bool = "blocks", layers: int | None = None
) -> None:
    """Set activation checkpointing of an open_clip ``Transformer``'s first ``layers`` blocks (None: all).

    ``level``: ``"none"`` (or False), ``"blocks"`` (or True), ``"attn"``, ``"mlp"`` (see the module
    docstring). Blocks past ``layers`` run normally. Replaces open_clip's own all-blocks switch, which is
    turned off so that blocks are not checkpointed twice.
    """
    if isinstance(level, bool):
        level = "blocks" if level else "none"
    if level not in CHECKPOINT_LEVELS:
        raise ValueError(
            f"grad checkpointing level must be one of {', '.join(CHECKPOINT_LEVELS)}, got {level!r}"
        )
    blocks = _blocks(transformer)
    n = len(blocks) if layers is None else int(layers)
    if n < 0:
        raise ValueError(f"grad checkpointing layers must be >= 0, got {layers}")
    if hasattr(transformer, "grad_checkpointing"):
        transformer.grad_checkpointing = False
    for i, block in enumerate(blocks):
        block.__dict__.pop(_ATTR, None)
        block.__dict__.pop("forward", None)
        if level != "none" and i < n:
            setattr(block, _ATTR, level)
            if level != "blocks":
                # an instance attribute: nn.Module.__call__ runs it instead of the class's forward
                block.forward = functools.partial(_residual_block_forward, block)
    transformer.__dict__.pop("forward", None)
    if level != "none" and n > 0:
        transformer.forward = functools.partial(_transformer_forward, transformer)


def checkpoint_level(transformer: nn.Module) -> tuple[str, int]:
    """``(level, number of checkpointed blocks)`` of a transformer, as set by :func:`checkpoint_blocks`."""
    levels = [getattr(b, _ATTR, "none") for b in _blocks(transformer)]
    used = [lv for lv in levels if lv != "none"]
    if getattr(transformer, "grad_checkpointing", False):
        return "blocks", len(levels)
    return (used[0] if used else "none"), len(used)


class _QuickGELUFn(torch.autograd.Function):
    """``x * sigmoid(1.702 x)`` keeping only ``x``; the backward recomputes the sigmoid in float32."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return x * torch.sigmoid(1.702 * x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        xf = x.float()
        s = torch.sigmoid(1.702 * xf)
        return (grad.float() * (s * (1.0 + 1.702 * xf * (1.0 - s)))).to(grad.dtype)


class LeanQuickGELU(nn.Module):
    """OpenAI's QuickGELU with one saved tensor instead of three (same values and gradients)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad:
            return x * torch.sigmoid(1.702 * x)
        return _QuickGELUFn.apply(x)


class LeanLayerNorm(nn.LayerNorm):
    """open_clip's LayerNorm (output in the input dtype) without autocast's float32 copy of the input.

    On low-precision input under autocast, runs ``layer_norm`` with autocast off on the bf16/fp16 input
    and float32 weights (statistics are float32 inside the kernel); float32 input is unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


def lean_activations(module: nn.Module, enable: bool = True) -> int:
    """Swap ``module``'s QuickGELUs and LayerNorms for the lean forms (or back); returns how many.

    Parameters stay where they are (LayerNorm instances change class in place, QuickGELU has none), so
    ``state_dict`` keys do not change. Plain ``nn.GELU`` already keeps only its input and is left alone.
    """
    from open_clip.transformer import LayerNorm as OpenClipLayerNorm
    from open_clip.transformer import QuickGELU

    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if enable and type(child) is QuickGELU:
                setattr(parent, name, LeanQuickGELU())
            elif not enable and type(child) is LeanQuickGELU:
                setattr(parent, name, QuickGELU())
            elif enable and type(child) is OpenClipLayerNorm:
                child.__class__ = LeanLayerNorm
            elif not enable and type(child) is LeanLayerNorm:
                child.__class__ = OpenClipLayerNorm
            else:
                continue
            count += 1
    return count
