"""CLIP2Video (Fang et al. 2021) as the EMCL inference-module reference evaluates it (docs/reference.md,
'EMCL as an inference module').

CLIP ViT towers, then on the per-frame CLS features:

- Temporal Difference Block (TDB): differences of adjacent frames, enhanced by a one-block attention and
  ``2 sigmoid(LN(.)) - 1``, interleaved with the frames ``[x0, d0, x1, ..., x11]`` (type ids 1 / 0) and run
  through the 4-block temporal transformer; the frame slots plus a residual, each L2-normalised, masked
  mean, L2 norm: the video vector ``v``. The text vector ``t`` is the L2-normalised projected EOT feature.
  The main score is ``logit_scale * t . v``; EMCL acts on it at inference
  (:func:`emcl.scoring.pooled_emcl_scores`).
- Temporal Alignment Block (TAB): text tokens (projected, start token masked) and video tokens (the frames
  plus every second frame re-encoded through the TDB and a one-block transformer) are soft-assigned to
  ``centerK`` shared centres; residuals pooled per centre, normalised, averaged, normalised:
  ``s_TAB = logit_scale * g_t . g_v``.
- Final score ``center_weight * s_main + (1 - center_weight) * s_TAB`` (0.5 / 0.5).

Both vectors of each kind are per-item, so this module returns embeddings, and the blocked EMCL scoring
lives in :mod:`emcl.scoring`. Checkpoints are the released ``pytorch_model.bin.N`` state dicts: ``clip.*``
(OpenAI CLIP key names), ``frame_position_embeddings``, ``type_position_embeddings``,
``frame2t_attention.resblocks.0``, ``transformerClip.resblocks.0-3``, ``trans_layernorm``,
``actionClip.resblocks.0``, ``weight_center``, ``emb_center``. CLIP is taken from the checkpoint; a
missing file, a missing or unexpected key, or a shape mismatch stops with an error naming it (the reference
needs a separate CLIP file and silently falls back to plain CLIP when the checkpoint is missing).

Deviation: the reference expands the key-padding mask for the attention heads with ``repeat`` (head-major)
where PyTorch expects batch-major order; identical when every clip has the same number of frames (the
12-frame MSR-VTT case), wrong otherwise. Ours builds the batch-major mask.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from emcl.clip import CLIPBackbone, build_clip, default_heads, infer_clip_config, normalize_frames
from emcl.errors import UserError

# Non-weight entries that OpenAI's archives carry; tolerated (and ignored) under ``clip.``.
_CLIP_META = ("clip.input_resolution", "clip.context_length", "clip.vocab_size")
# What the CLIP architecture is read from: named when missing rather than reported as a shape error.
_CLIP_ARCH_KEYS = (
    "visual.conv1.weight",
    "visual.positional_embedding",
    "visual.proj",
    "ln_final.weight",
    "text_projection",
    "positional_embedding",
    "token_embedding.weight",
    "logit_scale",
    "visual.transformer.resblocks.0.mlp.c_fc.weight",
    "transformer.resblocks.0.mlp.c_fc.weight",
)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualBlock(nn.Module):
    """A CLIP-shaped pre-norm transformer block (keys ``attn``, ``ln_1``, ``mlp.c_fc``, ``mlp.c_proj``,
    ``ln_2``), batch-first, taking an additive (B*heads, L, L) mask."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(), c_proj=nn.Linear(4 * width, width)
            )
        )
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class TemporalTransformer(nn.Module):
    """``resblocks`` of :class:`ResidualBlock` over (B, L, D) with a key-padding mask (B, L) of 0/1."""

    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.resblocks = nn.ModuleList(ResidualBlock(width, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        pad = (1.0 - mask.to(x.dtype))[:, None, None, :] * -1e6  # the reference's additive -1e6
        attn_mask = pad.expand(b, self.heads, n, n).reshape(b * self.heads, n, n)  # batch-major
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype).unsqueeze(-1)
    total = m.sum(dim=1)
    return (x * m).sum(dim=1) / torch.where(total == 0, torch.ones_like(total), total)


class CLIP2Video(nn.Module):
    """CLIP2Video with TDB and TAB (``center_proj = TAB_TDB``, ``temporal_proj = sigmoid_selfA``).

    ``encode_text(ids, mask) -> (t, g_t)`` and ``encode_video(frames, mask) -> (v, g_v)``: the main
    (L2-normalised) vectors and the TAB vectors, float32. Scores: ``logit_scale * t . v`` (EMCL acts here)
    and ``logit_scale * g_t . g_v``, fused with ``center_weight``.
    """

    def __init__(
        self, clip: CLIPBackbone, *, temporal_layers: int = 4, center_k: int = 5, center_weight: float = 0.5
    ) -> None:
        super().__init__()
        d = clip.embed_dim
        if clip.text_width != d:
            raise ValueError(
                f"CLIP2Video runs the CLIP-text-shaped temporal blocks on {d}-d frame features: "
                f"needs text width == embed dim, got {clip.text_width} and {d}"
            )
        heads = default_heads(clip.text_width)  # the reference's transformer_width // 64
        self.clip = clip
        self.center_k = center_k
        self.center_weight = center_weight
        self.frame_position_embeddings = nn.Embedding(clip.context_length, d)
        self.type_position_embeddings = nn.Embedding(2, d)
        self.frame2t_attention = TemporalTransformer(d, 1, heads)
        self.transformerClip = TemporalTransformer(d, temporal_layers, heads)
        self.trans_layernorm = nn.LayerNorm(d)
        self.actionClip = TemporalTransformer(d, 1, heads)
        self.weight_center = nn.Parameter(torch.randn(center_k, d) * 64**-0.5)
        self.emb_center = nn.Parameter(torch.randn(center_k, d) * 64**-0.5)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    # ------------------------------------------------------------------------------------ temporal
    def temporal_difference_block(
        self, x: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames (B, T, D) -> interleaved ``[x0, d0, x1, ..., x_{T-1}]`` with position and type embeddings
        added (B, 2T-1, D), and their mask (B, 2T-1).

        Difference ``d_i = x_{i+1} - x_i`` takes position ``i + 1`` and key mask ``mask_{i+1}`` in the
        difference attention, then position ``i`` and mask ``mask_i`` in the interleaved sequence (both as
        the reference).
        """
        b, t, d = x.shape
        pos = self.frame_position_embeddings.weight[:t]
        type_frame, type_diff = (
            self.type_position_embeddings.weight[1],
            self.type_position_embeddings.weight[0],
        )
        tokens = x.new_zeros(b, 2 * t - 1, d)
        tokens[:, 0::2] = x + pos + type_frame
        out_mask = mask.new_zeros(b, 2 * t - 1)
        out_mask[:, 0::2] = mask
        if t > 1:
            diff = x[:, 1:] - x[:, :-1] + pos[1:]
            diff = self.frame2t_attention(diff, mask[:, 1:])
            diff = 2 * torch.sigmoid(self.trans_layernorm(diff)) - 1
            tokens[:, 1::2] = diff + pos[:-1] + type_diff
            out_mask[:, 1::2] = mask[:, :-1]
        return tokens, out_mask

    def video_vector(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The main video vector: TDB, 4-block transformer, frame slots + residual, normalised frames,
        masked mean, L2 norm."""
        tokens, tmask = self.temporal_difference_block(x, mask)
        h = self.transformerClip(tokens, tmask)[:, 0::2] + x
        h = F.normalize(h, dim=-1)
        return F.normalize(_masked_mean(h, mask), dim=-1)

    def _tab_pool(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Soft-assign tokens (B, L, D) to the centres, pool residuals over valid tokens, normalise per
        centre, average the centres, normalise."""
        w = torch.softmax(emb @ self.weight_center.t(), dim=-1) * mask.to(emb.dtype).unsqueeze(
            -1
        )  # (B, L, K)
        cluster = torch.einsum("blk,bld->bkd", w, emb) - w.sum(dim=1).unsqueeze(-1) * self.emb_center
        cluster = F.normalize(cluster, dim=-1)
        return F.normalize(cluster.mean(dim=1), dim=-1)

    def tab_video_vector(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """TAB video vector: frames plus every second frame re-encoded (TDB + one block) with a residual."""
        large, lmask = x[:, 0::2], mask[:, 0::2]
        tokens, tmask = self.temporal_difference_block(large, lmask)
        h = self.actionClip(tokens, tmask)[:, 0::2] + large
        return self._tab_pool(torch.cat([x, h], dim=1), torch.cat([mask, lmask], dim=1))

    # ------------------------------------------------------------------------------------- encoders
    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask (B, L) -> normalised EOT vector ``t`` and TAB vector ``g_t``, (B, D) each."""
        eot, tokens = self.clip.encode_text(ids, mask, return_tokens=True)
        with torch.autocast(ids.device.type, enabled=False):
            proj = self.clip.text_projection
            tokens = tokens.float() @ (proj.weight.t() if isinstance(proj, nn.Linear) else proj).float()
            tmask = mask.clone()
            tmask[:, 0] = 0  # the start token takes no part in TAB
            return F.normalize(eot.float(), dim=-1), self._tab_pool(tokens, tmask)

    def encode_video(self, frames: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 frames (B, T, 3, H, W) and mask (B, T) -> video vector ``v`` and TAB vector ``g_v``."""
        dev = frames.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.float32
        x = self.clip.encode_frames(normalize_frames(frames, dtype, mask=mask))
        with torch.autocast(dev, enabled=False):
            x = x.float()
            return self.video_vector(x, mask), self.tab_video_vector(x, mask)


# ---------------------------------------------------------------------------------------- loading
def checkpoint_path(checkpoint: str | os.PathLike, model_num: str | int | None = None) -> Path:
    """``{checkpoint}/pytorch_model.bin.{model_num}`` (the reference's flags), or ``checkpoint`` itself."""
    path = Path(checkpoint)
    if model_num not in (None, ""):
        path = path / f"pytorch_model.bin.{model_num}"
    if not path.is_file():
        raise UserError(f"CLIP2Video checkpoint not found: {path}")
    return path


def _state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(obj, Mapping) and not any(str(k).startswith("clip.") for k in obj):
        nested = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            break
        obj = nested
    if not isinstance(obj, Mapping):
        raise UserError(f"{path}: expected a state dict, got {type(obj).__name__}")
    keys = list(obj)
    if keys and all(str(k).startswith("module.") for k in keys):  # saved from a DataParallel wrapper
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def _name_keys(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:8])
    return shown + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")


def load_clip2video(
    path: str | os.PathLike, *, temporal_layers: int = 4, center_k: int = 5, center_weight: float = 0.5
) -> CLIP2Video:
    """Build CLIP2Video from a released ``pytorch_model.bin.N`` (CLIP included), in float32 on the CPU.

    Every key must match the model and vice versa (the metadata ``clip.input_resolution``,
    ``clip.context_length``, ``clip.vocab_size`` are ignored); otherwise :class:`UserError` names the file
    and the keys. CLIP's architecture is read from the ``clip.*`` weights (OpenAI's QuickGELU).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"CLIP2Video checkpoint not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"cannot read CLIP2Video checkpoint {path}: {error}") from error
    state = {k: v for k, v in _state_dict(raw, path).items() if k not in _CLIP_META}
    missing_arch = [f"clip.{k}" for k in _CLIP_ARCH_KEYS if f"clip.{k}" not in state]
    if missing_arch:
        raise UserError(
            f"{path}: missing key(s) {_name_keys(missing_arch)} (CLIP's architecture is read from them)"
        )
    clip_state = {k[len("clip.") :]: v for k, v in state.items() if k.startswith("clip.")}
    try:
        config = infer_clip_config(clip_state, source=str(path))
    except (ValueError, NotImplementedError) as error:
        raise UserError(str(error)) from error
    clip = build_clip(**config, quick_gelu=True)
    try:
        model = CLIP2Video(
            clip, temporal_layers=temporal_layers, center_k=center_k, center_weight=center_weight
        )
    except ValueError as error:
        raise UserError(f"{path}: {error}") from error
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise UserError(
            f"{path}: missing key(s) {_name_keys(missing)} (model: {temporal_layers} temporal "
            f"blocks, {center_k} TAB centres)"
        )
    if unexpected:
        raise UserError(
            f"{path}: unexpected key(s) {_name_keys(unexpected)} (model: {temporal_layers} "
            f"temporal blocks, {center_k} TAB centres)"
        )
    wrong = [
        f"{k!r}: checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise UserError(f"{path}: shape mismatch for {'; '.join(wrong[:8])}")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model
