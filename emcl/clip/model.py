"""CLIP backbone used by the EMCL models: an open_clip ``CLIP`` with a text path that runs on short captions.

``CLIPBackbone`` takes over the towers of a standard (non-custom-text) ``open_clip.model.CLIP``. Its
submodules keep open_clip's attribute names, so its state dict uses exactly OpenAI's / open_clip's key names
(``visual.conv1.weight``, ``transformer.resblocks.0.attn.in_proj_weight``, ``text_projection``, ...): a model
that holds it as ``self.clip`` saves CLIP under ``clip.*`` like the EMCL reference does.

Attention runs through ``nn.MultiheadAttention(need_weights=False)``, which calls PyTorch's fused
``scaled_dot_product_attention``; the causal text mask is the (L, L) additive float mask sliced from CLIP's
77 x 77 one, so captions of any length L <= context_length are encoded without padding them to 77.
"""

from __future__ import annotations

from typing import Any

import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.transformer import VisionTransformer
from torch import nn

from .memory import checkpoint_blocks, checkpoint_level, lean_activations


def default_heads(width: int) -> int:
    """OpenAI's head count rule (64-wide heads), at least one head for tiny test models."""
    return max(1, width // 64)


class CLIPBackbone(nn.Module):
    """Text and image towers of a ViT CLIP, with the accessors EMCL-Net's initialisation needs."""

    def __init__(self, model: CLIP, config: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not isinstance(model, CLIP):
            raise TypeError(f"CLIPBackbone wraps open_clip.model.CLIP, got {type(model).__name__}")
        if not isinstance(model.visual, VisionTransformer):
            raise NotImplementedError(
                f"only ViT visual towers are supported, got {type(model.visual).__name__}"
            )
        if model.text_pool_type != "argmax" or model.attn_mask is None:
            raise NotImplementedError("only causal text towers pooled at EOT (argmax) are supported")
        self.visual = model.visual
        self.token_embedding = model.token_embedding
        self.positional_embedding = model.positional_embedding
        self.transformer = model.transformer
        self.ln_final = model.ln_final
        self.text_projection = model.text_projection
        self.logit_scale = model.logit_scale
        self.register_buffer("attn_mask", model.attn_mask, persistent=False)
        self._config = dict(config) if config is not None else None

    # ------------------------------------------------------------------ text
    def encode_text(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        return_tokens: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Projected text feature ``(B, embed_dim)`` taken at the EOT position of ``ids`` ``(B, L)``.

        The EOT position is ``argmax(ids)`` (EOT has the largest id) or, when ``mask`` is given, the last
        position where it is 1. ``L`` may be anything up to ``context_length``. With ``return_tokens``
        also returns the per-token features after ``ln_final``, ``(B, L, text_width)``, unprojected.
        """
        if ids.dim() != 2:
            raise ValueError(f"encode_text expects ids shaped (B, L), got {tuple(ids.shape)}")
        length = ids.shape[1]
        if length > self.context_length:
            raise ValueError(f"text length {length} exceeds the CLIP context length {self.context_length}")
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(ids).to(cast_dtype)
        x = x + self.positional_embedding[:length].to(cast_dtype)
        x = self.transformer(x, attn_mask=self.attn_mask[:length, :length].contiguous())
        tokens = self.ln_final(x)
        eot = self._eot_positions(ids, mask)
        pooled = self._project_text(tokens[torch.arange(tokens.shape[0], device=tokens.device), eot])
        return (pooled, tokens) if return_tokens else pooled

    @staticmethod
    def _eot_positions(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            return ids.argmax(dim=-1)
        if mask.shape != ids.shape:
            raise ValueError(f"text mask shape {tuple(mask.shape)} differs from ids shape {tuple(ids.shape)}")
        valid = mask > 0
        empty = ~valid.any(dim=-1)
        if empty.any():
            rows = empty.nonzero().flatten().tolist()
            raise ValueError(f"text mask is all zero in rows {rows}: no token to pool")
        # cumsum peaks first at the last valid position
        return valid.long().cumsum(dim=-1).argmax(dim=-1)

    def _project_text(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.text_projection
        if proj is None:
            return x
        if isinstance(proj, nn.Linear):
            return proj(x)
        return x @ proj

    # ---------------------------------------------------------------- vision
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Projected CLS feature ``(N, embed_dim)`` of normalised float images ``(N, 3, H, W)``."""
        if images.dtype == torch.uint8:
            raise TypeError("encode_image/encode_frames expect normalised float input; use normalize_frames")
        return self.visual(images.to(self.visual.conv1.weight.dtype))

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Per-frame projected CLS features ``(B, T, embed_dim)`` of normalised frames ``(B, T, 3, H, W)``."""
        if frames.dim() != 5:
            raise ValueError(f"encode_frames expects frames (B, T, 3, H, W), got {tuple(frames.shape)}")
        batch, num_frames = frames.shape[:2]
        features = self.encode_image(frames.flatten(0, 1))
        return features.view(batch, num_frames, -1)

    # ---------------------------------------------------------------- memory
    def set_grad_checkpointing(self, enable: bool | str = True, layers: int | None = None) -> None:
        """Recompute parts of the transformer blocks in the backward pass, in both towers.

        ``enable``: True / ``"blocks"`` (whole blocks), ``"mlp"`` (LayerNorm 2 + MLP), ``"attn"``
        (LayerNorm 1 + attention), False / ``"none"``; ``layers``: only the first N blocks of each tower
        (None: all). See :mod:`emcl.clip.memory` for what each level saves.
        """
        checkpoint_blocks(self.visual.transformer, enable, layers)
        checkpoint_blocks(self.transformer, enable, layers)

    @property
    def grad_checkpointing(self) -> tuple[str, int]:
        """``(level, blocks per tower)`` of activation checkpointing (``("none", 0)`` when off)."""
        return checkpoint_level(self.visual.transformer)

    def set_lean_activations(self, enable: bool = True) -> int:
        """Keep fewer saved tensors in training (QuickGELU keeps its input only, LayerNorm no float32 copy
        under autocast); same weights and keys. Returns the number of modules switched."""
        return (
            lean_activations(self.visual, enable)
            + lean_activations(self.transformer, enable)
            + (lean_activations(self.ln_final, enable))
        )

    # ------------------------------------------------------------- accessors
    @property
    def config(self) -> dict[str, Any] | None:
        """The ``build_clip`` keyword arguments this model was built with (None if built elsewhere)."""
        return dict(self._config) if self._config is not None else None

    @property
    def text_positional_embedding(self) -> nn.Parameter:
        """Text positional embedding, ``(context_length, text_width)``."""
        return self.positional_embedding

    @property
    def text_blocks(self) -> nn.ModuleList:
        """The text transformer's residual attention blocks."""
        return self.transformer.resblocks

    @property
    def text_batch_first(self) -> bool:
        """Whether the text blocks take ``(B, L, D)`` (True) or ``(L, B, D)`` input."""
        return bool(self.transformer.batch_first)

    @property
    def text_width(self) -> int:
        return int(self.transformer.width)

    @property
    def text_layers(self) -> int:
        return len(self.transformer.resblocks)

    @property
    def text_heads(self) -> int:
        return int(self.transformer.resblocks[0].attn.num_heads)

    @property
    def context_length(self) -> int:
        return int(self.positional_embedding.shape[0])

    @property
    def vocab_size(self) -> int:
        return int(self.token_embedding.num_embeddings)

    @property
    def embed_dim(self) -> int:
        proj = self.text_projection
        return int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])

    @property
    def vision_width(self) -> int:
        return int(self.visual.transformer.width)

    @property
    def vision_layers(self) -> int:
        return len(self.visual.transformer.resblocks)

    @property
    def vision_heads(self) -> int:
        return int(self.visual.transformer.resblocks[0].attn.num_heads)

    @property
    def image_size(self) -> int:
        return int(self.visual.image_size[0])

    @property
    def patch_size(self) -> int:
        return int(self.visual.patch_size[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype


def build_clip(
    embed_dim: int,
    *,
    image_size: int,
    patch_size: int,
    vision_width: int,
    vision_layers: int,
    vision_heads: int | None = None,
    text_width: int,
    text_layers: int,
    text_heads: int | None = None,
    context_length: int = 77,
    vocab_size: int = 49408,
    vision_mlp_ratio: float = 4.0,
    text_mlp_ratio: float = 4.0,
    quick_gelu: bool = False,
    nonscalar_logit_scale: bool = False,
) -> CLIPBackbone:
    """Build a randomly initialised ViT CLIP (open_clip's own initialisation) as a ``CLIPBackbone``.

    Heads default to ``width // 64`` (at least 1). ``quick_gelu=True`` is what OpenAI's weights were trained
    with; ``load_clip`` sets it. ``build_clip(**backbone.config)`` rebuilds the same architecture.
    """
    vision_heads = default_heads(vision_width) if vision_heads is None else vision_heads
    text_heads = default_heads(text_width) if text_heads is None else text_heads
    for name, width, heads in (("vision", vision_width, vision_heads), ("text", text_width, text_heads)):
        if heads < 1 or width % heads:
            raise ValueError(f"{name} width {width} is not divisible by {name} heads {heads}")
    if image_size % patch_size:
        raise ValueError(f"image size {image_size} is not a multiple of patch size {patch_size}")
    config = dict(
        embed_dim=embed_dim, image_size=image_size, patch_size=patch_size, vision_width=vision_width,
        vision_layers=vision_layers, vision_heads=vision_heads, text_width=text_width,
        text_layers=text_layers, text_heads=text_heads, context_length=context_length, vocab_size=vocab_size,
        vision_mlp_ratio=vision_mlp_ratio, text_mlp_ratio=text_mlp_ratio, quick_gelu=quick_gelu,
        nonscalar_logit_scale=nonscalar_logit_scale,
    )  # fmt: skip
    vision_cfg = CLIPVisionCfg(layers=vision_layers, width=vision_width, mlp_ratio=vision_mlp_ratio,
                               head_width=vision_width // vision_heads, patch_size=patch_size,
                               image_size=image_size)
    text_cfg = CLIPTextCfg(context_length=context_length, vocab_size=vocab_size, width=text_width,
                           heads=text_heads, layers=text_layers, mlp_ratio=text_mlp_ratio)
    model = CLIP(embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=quick_gelu,
                 nonscalar_logit_scale=nonscalar_logit_scale)
    return CLIPBackbone(model, config)


def check_clip_config(config: Any, source: str = "clip_config") -> dict[str, Any]:
    """``config`` checked against :func:`build_clip`'s parameters; returns it as a dict.

    A misspelt or unknown key, a missing required one, or a value of the wrong type raises
    :class:`~emcl.errors.UserValueError` naming ``source``, the key and the allowed keys.
    """
    import difflib
    import inspect

    from emcl.errors import UserValueError

    if not isinstance(config, dict):
        kind = type(config).__name__
        raise UserValueError(f"{source}: expected a mapping of build_clip arguments, got {kind}")
    params = dict(inspect.signature(build_clip).parameters)
    allowed = ", ".join(params)
    unknown = [k for k in config if k not in params]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), list(params), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise UserValueError(f"{source}: unknown key(s) {', '.join(hints)}; allowed keys: {allowed}")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in config]
    if missing:
        need = ", ".join(missing)
        raise UserValueError(f"{source}: missing required key(s) {need}; allowed keys: {allowed}")
    for key, value in config.items():
        kind = str(params[key].annotation)
        if value is None and "None" in kind:
            continue
        if kind.startswith("int"):
            ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
            want = "a positive integer"
        elif kind.startswith("float"):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
            want = "a positive number"
        elif kind.startswith("bool"):
            ok, want = isinstance(value, bool), "true or false"
        else:
            continue
        if not ok:
            raise UserValueError(f"{source}: {key}: expected {want}, got {value!r}")
    return dict(config)


def build_clip_from_config(config: Any, source: str = "clip_config") -> CLIPBackbone:
    """:func:`build_clip` from a config mapping, with errors naming ``source`` and the key (see
    :func:`check_clip_config`); inconsistent sizes (width not divisible by heads, ...) too."""
    from emcl.errors import UserValueError

    kwargs = check_clip_config(config, source)
    try:
        return build_clip(**kwargs)
    except ValueError as e:
        raise UserValueError(f"{source}: {e}") from None
