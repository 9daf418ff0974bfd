"""Independent float64 re-implementation of the reference EMCL-Net forward pass, for tests.

The reference is the public jpthu17/EMCL code (``video_retrieval/EMCL-Net/tvr/models``): an OpenAI-CLIP
ViT image/text encoder, an optional temporal aggregator over frame features ("seqTransf", "seqLSTM" or
"None"), a text-conditioned frame pooling, and the EM layer ("Emcl") applied to the joint set of pooled
video and text embeddings. Everything here is plain functional code on a reference-layout ``state_dict()``
(keys ``clip.*``, ``frame_position_embeddings.weight``, ``transformerClip.*``, ``lstm_visual.*``),
computed in float64. It deliberately imports nothing from ``emcl``: it is the independent side of the
comparison.

Details that follow the reference exactly (and that a port can easily get wrong):

* CLIP's vision and text blocks use LayerNorm eps 1e-5, but the temporal ``transformerClip`` blocks
  (``module_cross.py``) use the BERT-style LayerNorm from ``until_module.py`` with eps 1e-12.
* The frame pooling softmax runs over ALL frame slots (padding included) and only then multiplies by the
  frame mask, so the features of padded slots do enter the scores through the softmax denominator.
* With "seqLSTM" the reference packs each video to its real length, pads the LSTM output back to the
  longest video of the batch and concatenates the raw features after that, then adds the raw features:
  padded slots before the batch's longest length hold ``f``; slots at or after it hold ``2 * f``.
* The EM iterations run under ``no_grad``: ``y = x + beta * R`` with ``R`` a constant for autograd.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch

DEFAULT_HEADS = 2
CLIP_LN_EPS = 1e-5
TEMPORAL_LN_EPS = 1e-12
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
AGGREGATORS = ("seqTransf", "seqLSTM", "None")
StateDict = dict[str, torch.Tensor]

_BLOCK_SHAPES = (  # (name, shape as a function of width w); reference state_dict order
    ("attn.in_proj_weight", lambda w: (3 * w, w)),
    ("attn.in_proj_bias", lambda w: (3 * w,)),
    ("attn.out_proj.weight", lambda w: (w, w)),
    ("attn.out_proj.bias", lambda w: (w,)),
    ("ln_1.weight", lambda w: (w,)),
    ("ln_1.bias", lambda w: (w,)),
    ("mlp.c_fc.weight", lambda w: (4 * w, w)),
    ("mlp.c_fc.bias", lambda w: (4 * w,)),
    ("mlp.c_proj.weight", lambda w: (w, 4 * w)),
    ("mlp.c_proj.bias", lambda w: (w,)),
    ("ln_2.weight", lambda w: (w,)),
    ("ln_2.bias", lambda w: (w,)),
)


# ----------------------------------------------------------------------------------------------------------
# Fabricated state dicts
# ----------------------------------------------------------------------------------------------------------


def fabricate_reference_state(
    agg: str,
    *,
    seed: int = 0,
    embed_dim: int = 32,
    width: int = 32,
    vision_layers: int = 2,
    text_layers: int = 2,
    heads: int = 2,
    patch: int = 8,
    image: int = 16,
    context: int = 16,
    vocab: int = 64,
    agg_layers: int = 2,
) -> StateDict:
    """A seeded random float32 state dict in the reference EMCL-Net ``state_dict()`` layout.

    ``heads`` is not stored in the file (the reference derives it as width // 64); it is accepted so that
    callers can keep one config dict, and must be passed to the encoders explicitly.
    """
    if agg not in AGGREGATORS:
        raise ValueError(f"agg must be one of {AGGREGATORS}, got {agg!r}")
    if width != embed_dim:
        raise ValueError("the reference adds width-sized frame position embeddings to embed_dim features")
    if width % heads:
        raise ValueError("width must be divisible by heads")
    gen = torch.Generator().manual_seed(seed)

    def normal(shape: tuple[int, ...], std: float, mean: float = 0.0) -> torch.Tensor:
        return mean + std * torch.randn(shape, generator=gen, dtype=torch.float32)

    def block(prefix: str) -> None:
        for name, shape_fn in _BLOCK_SHAPES:
            shape = shape_fn(width)
            if name.startswith("ln_"):
                is_weight = name.endswith("weight")
                sd[prefix + name] = normal(shape, 0.05, 1.0) if is_weight else normal(shape, 0.02)
            elif name.endswith("bias"):
                sd[prefix + name] = normal(shape, 0.02)
            else:
                sd[prefix + name] = normal(shape, 0.05 if "c_proj" in name else 0.1)

    def layer_norm(prefix: str) -> None:
        sd[prefix + ".weight"] = normal((width,), 0.05, 1.0)
        sd[prefix + ".bias"] = normal((width,), 0.02)

    grid = image // patch
    sd: StateDict = OrderedDict()
    sd["clip.positional_embedding"] = normal((context, width), 0.05)
    sd["clip.text_projection"] = normal((width, embed_dim), 0.1)
    sd["clip.logit_scale"] = torch.tensor(math.log(100.0), dtype=torch.float32)
    sd["clip.visual.class_embedding"] = normal((width,), 0.1)
    sd["clip.visual.positional_embedding"] = normal((grid * grid + 1, width), 0.1)
    sd["clip.visual.proj"] = normal((width, embed_dim), 0.1)
    sd["clip.visual.conv1.weight"] = normal((width, 3, patch, patch), 0.05)
    layer_norm("clip.visual.ln_pre")
    for i in range(vision_layers):
        block(f"clip.visual.transformer.resblocks.{i}.")
    layer_norm("clip.visual.ln_post")
    for i in range(text_layers):
        block(f"clip.transformer.resblocks.{i}.")
    sd["clip.token_embedding.weight"] = normal((vocab, width), 0.1)
    layer_norm("clip.ln_final")
    if agg in ("seqTransf", "seqLSTM"):
        sd["frame_position_embeddings.weight"] = normal((context, width), 0.05)
    if agg == "seqTransf":
        for i in range(agg_layers):
            block(f"transformerClip.resblocks.{i}.")
    if agg == "seqLSTM":
        sd["lstm_visual.weight_ih_l0"] = normal((4 * width, width), 0.1)
        sd["lstm_visual.weight_hh_l0"] = normal((4 * width, width), 0.1)
        sd["lstm_visual.bias_ih_l0"] = normal((4 * width,), 0.05)
        sd["lstm_visual.bias_hh_l0"] = normal((4 * width,), 0.05)
    return sd


# ----------------------------------------------------------------------------------------------------------
# Transformer pieces
# ----------------------------------------------------------------------------------------------------------


def _p(sd: StateDict, key: str) -> torch.Tensor:
    return sd[key].double()


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim, biased variance, eps inside the square root."""
    centred = x - x.mean(-1, keepdim=True)
    var = (centred * centred).mean(-1, keepdim=True)
    return centred / torch.sqrt(var + eps) * weight + bias


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _attention(
    sd: StateDict, prefix: str, x: torch.Tensor, heads: int, mask: torch.Tensor | None
) -> torch.Tensor:
    """Multi-head self-attention; x (N, L, W); mask additive, (L, L) or (N, L, L), shared by all heads."""
    n, length, w = x.shape
    hd = w // heads
    qkv = x @ _p(sd, prefix + "attn.in_proj_weight").T + _p(sd, prefix + "attn.in_proj_bias")
    q, k, v = (z.reshape(n, length, heads, hd).transpose(1, 2) for z in qkv.split(w, dim=-1))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # (N, heads, L, L)
    if mask is not None:
        mask = mask.double()
        scores = scores + (mask.unsqueeze(1) if mask.dim() == 3 else mask)
    out = torch.softmax(scores, dim=-1) @ v  # (N, heads, L, hd)
    out = out.transpose(1, 2).reshape(n, length, w)
    return out @ _p(sd, prefix + "attn.out_proj.weight").T + _p(sd, prefix + "attn.out_proj.bias")


def _residual_block(
    sd: StateDict, prefix: str, x: torch.Tensor, heads: int, mask: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """Pre-LN block: x + attn(ln_1(x)), then + c_proj(QuickGELU(c_fc(ln_2(x))))."""
    h = _layer_norm(x, _p(sd, prefix + "ln_1.weight"), _p(sd, prefix + "ln_1.bias"), eps)
    x = x + _attention(sd, prefix, h, heads, mask)
    h = _layer_norm(x, _p(sd, prefix + "ln_2.weight"), _p(sd, prefix + "ln_2.bias"), eps)
    h = _quick_gelu(h @ _p(sd, prefix + "mlp.c_fc.weight").T + _p(sd, prefix + "mlp.c_fc.bias"))
    return x + h @ _p(sd, prefix + "mlp.c_proj.weight").T + _p(sd, prefix + "mlp.c_proj.bias")


def _transformer(
    sd: StateDict, prefix: str, x: torch.Tensor, heads: int, mask: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """All ``{prefix}resblocks.{i}`` blocks found in ``sd``, in order."""
    n_blocks = sum(k.startswith(prefix + "resblocks.") and k.endswith(".attn.in_proj_weight") for k in sd)
    for i in range(n_blocks):
        x = _residual_block(sd, f"{prefix}resblocks.{i}.", x, heads, mask, eps)
    return x


# ----------------------------------------------------------------------------------------------------------
# Encoders and temporal aggregation
# ----------------------------------------------------------------------------------------------------------


def encode_text(sd: StateDict, ids: torch.Tensor, *, heads: int = DEFAULT_HEADS) -> torch.Tensor:
    """CLIP text features (A, E) taken at the EOT (largest id) position of ``ids`` (A, L)."""
    ids = ids.long()
    length = ids.shape[1]
    x = _p(sd, "clip.token_embedding.weight")[ids] + _p(sd, "clip.positional_embedding")[:length]
    causal = torch.full((length, length), float("-inf"), dtype=torch.float64).triu(1)
    x = _transformer(sd, "clip.transformer.", x, heads, causal, CLIP_LN_EPS)
    x = _layer_norm(x, _p(sd, "clip.ln_final.weight"), _p(sd, "clip.ln_final.bias"), CLIP_LN_EPS)
    eot = x[torch.arange(x.shape[0]), ids.argmax(dim=-1)]
    return eot @ _p(sd, "clip.text_projection")


def encode_frames(sd: StateDict, frames: torch.Tensor, *, heads: int = DEFAULT_HEADS) -> torch.Tensor:
    """CLIP image features (B, T, E) of already-normalised frames (B, T, 3, H, W)."""
    b, t, c, height, width_px = frames.shape
    conv = _p(sd, "clip.visual.conv1.weight")  # (W, 3, p, p)
    w, p = conv.shape[0], conv.shape[-1]
    gh, gw = height // p, width_px // p
    x = frames.double().reshape(b * t, c, height, width_px)[:, :, : gh * p, : gw * p]
    patches = x.reshape(b * t, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b * t, gh * gw, c * p * p)
    tokens = patches @ conv.reshape(w, -1).T  # (BT, gh*gw, W), row-major over the patch grid
    cls = _p(sd, "clip.visual.class_embedding").expand(b * t, 1, w)
    x = torch.cat([cls, tokens], dim=1) + _p(sd, "clip.visual.positional_embedding")
    x = _layer_norm(x, _p(sd, "clip.visual.ln_pre.weight"), _p(sd, "clip.visual.ln_pre.bias"), CLIP_LN_EPS)
    x = _transformer(sd, "clip.visual.transformer.", x, heads, None, CLIP_LN_EPS)
    ln_post = _p(sd, "clip.visual.ln_post.weight"), _p(sd, "clip.visual.ln_post.bias")
    x = _layer_norm(x[:, 0], *ln_post, CLIP_LN_EPS)
    return (x @ _p(sd, "clip.visual.proj")).reshape(b, t, -1)


def _lstm(sd: StateDict, x: torch.Tensor) -> torch.Tensor:
    """One-layer unidirectional LSTM over x (n, D) from zero state; gate order i, f, g, o."""
    w_ih, w_hh = _p(sd, "lstm_visual.weight_ih_l0"), _p(sd, "lstm_visual.weight_hh_l0")
    bias = _p(sd, "lstm_visual.bias_ih_l0") + _p(sd, "lstm_visual.bias_hh_l0")
    hidden = w_hh.shape[1]
    h = x.new_zeros(hidden)
    c = x.new_zeros(hidden)
    outs = []
    for step in range(x.shape[0]):
        i, f, g, o = (w_ih @ x[step] + w_hh @ h + bias).chunk(4)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs) if outs else x.new_zeros(0, hidden)


def aggregate(
    sd: StateDict, agg: str, f: torch.Tensor, mask: torch.Tensor, *, heads: int = DEFAULT_HEADS
) -> torch.Tensor:
    """The reference temporal aggregation of frame features f (B, T, E) with frame mask (B, T)."""
    f = f.double()
    mask = mask.double()
    if agg == "None":
        return f
    if agg == "seqTransf":
        h = f + _p(sd, "frame_position_embeddings.weight")[: f.shape[1]]
        key_mask = ((1.0 - mask) * -1e6).unsqueeze(1).expand(-1, f.shape[1], -1)  # (B, T_query, T_key)
        return _transformer(sd, "transformerClip.", h, heads, key_mask, TEMPORAL_LN_EPS) + f
    if agg == "seqLSTM":
        lengths = mask.sum(dim=1).long()
        longest = int(lengths.max()) if len(lengths) else 0
        out = f.clone()
        out[:, longest:] = 2.0 * f[:, longest:]  # reference: concat raw features after the padded LSTM output
        for b, n in enumerate(lengths.tolist()):
            if n:
                out[b, :n] = _lstm(sd, f[b, :n]) + f[b, :n]
        return out
    raise ValueError(f"agg must be one of {AGGREGATORS}, got {agg!r}")


def video_features(
    sd: StateDict,
    agg: str,
    frames_uint8: torch.Tensor,
    frame_mask: torch.Tensor,
    *,
    heads: int = DEFAULT_HEADS,
) -> torch.Tensor:
    """Normalise uint8 frames (B, T, 3, H, W) with CLIP's mean/std, zero padded frames, encode, aggregate."""
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float64).view(1, 1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float64).view(1, 1, 3, 1, 1)
    x = (frames_uint8.double() / 255.0 - mean) / std
    x = torch.where(frame_mask.view(*frame_mask.shape, 1, 1, 1) > 0, x, torch.zeros_like(x))
    return aggregate(sd, agg, encode_frames(sd, x, heads=heads), frame_mask, heads=heads)


# ----------------------------------------------------------------------------------------------------------
# EM layer, similarity and loss
# ----------------------------------------------------------------------------------------------------------


def reference_em(
    x: torch.Tensor, mu: torch.Tensor, stage_num: int, lamd: float, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference Emcl layer on x (N, D) with bases mu (1, K): returns (x + beta * U Z^T, final U (N, K)).

    The iterations run without autograd, as in the reference, so R = U Z^T is a constant for gradients.
    """
    x = x.double()
    if stage_num < 1:
        raise ValueError("stage_num must be >= 1")
    with torch.no_grad():
        u = torch.ones(x.shape[0], 1, dtype=torch.float64) @ mu.double().reshape(1, -1)  # (N, K)
        for _ in range(stage_num):
            z = torch.softmax(x.T @ u / lamd, dim=1)  # (D, K)
            z = z / (1e-6 + z.sum(dim=0, keepdim=True))
            u = x @ z  # (N, K)
            u = u / (1e-6 + u.norm(dim=0, keepdim=True))
        r = u @ z.T  # (N, D)
    return x + beta * r, u


def pair_scores(
    t: torch.Tensor,
    f: torch.Tensor,
    mask: torch.Tensor,
    mu: torch.Tensor,
    *,
    temp: float,
    stage_num: int,
    lamd: float,
    beta: float,
    use_emcl: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scores S (A, B) of texts t (A, E) vs videos f (B, T, E), and the EM's final U (None without EM)."""
    t, f, mask = t.double(), f.double(), mask.double()
    a, e = t.shape
    w = torch.softmax(torch.einsum("ae,bte->abt", t, f) / temp, dim=-1) * mask.unsqueeze(0)
    v = torch.einsum("abt,bte->abe", w, f).reshape(-1, e)  # row i * B + j
    x = torch.cat([v, t], dim=0)
    u = None
    if use_emcl:
        x, u = reference_em(x, mu, stage_num, lamd, beta)
    x = x / x.norm(dim=-1, keepdim=True)
    yv, yt = x[: v.shape[0]].reshape(a, -1, e), x[v.shape[0] :]
    return torch.einsum("ae,abe->ab", yt, yv), u


def block_scores(
    t: torch.Tensor, f: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, *, block: int, **kw
) -> torch.Tensor:
    """The reference evaluation: ``pair_scores`` on each (block texts x block videos) tile of the matrix."""
    a, b = t.shape[0], f.shape[0]
    out = torch.empty(a, b, dtype=torch.float64)
    for i in range(0, a, block):
        for j in range(0, b, block):
            out[i : i + block, j : j + block] = pair_scores(
                t[i : i + block], f[j : j + block], mask[j : j + block], mu, **kw
            )[0]
    return out


def loss_and_mu(
    t: torch.Tensor,
    f: torch.Tensor,
    mask: torch.Tensor,
    mu: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    temp: float,
    stage_num: int,
    lamd: float,
    beta: float,
    momentum: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE loss on matched pairs (A == B) and the momentum-updated EM bases (1, K)."""
    s, u = pair_scores(t, f, mask, mu, temp=temp, stage_num=stage_num, lamd=lamd, beta=beta)
    logits = torch.exp(torch.as_tensor(logit_scale, dtype=torch.float64)) * s
    diag = torch.arange(s.shape[0])
    loss_t2v = -torch.log_softmax(logits, dim=1)[diag, diag].mean()
    loss_v2t = -torch.log_softmax(logits.T, dim=1)[diag, diag].mean()
    new_mu = momentum * mu.double() + (1 - momentum) * u.mean(dim=0, keepdim=True)
    return 0.5 * (loss_t2v + loss_v2t), new_mu
