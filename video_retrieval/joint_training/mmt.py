"""The Multi-modal Transformer (MMT) over expert features, with EMCL between the per-modality heads and
the similarity (docs/reference.md, 'Joint training (MMT)').

Text: BERT's [CLS] output -> per-modality gated embedding units (512) and text-derived modality weights
(softmax over modalities). Video: each expert projected to 512 and L2-normalised; tokens [CLS], then per
modality an AGG token (the projected max-pool) and up to ``max_tokens`` temporal tokens, with position
(time) and type (modality) embeddings; a BERT-style encoder (4 layers); each modality's AGG output ->
its gated unit. Similarity ``S_ij = sum_m w_i^m <t_i^m, v_j^m>``.

EMCL runs per modality on [videos; texts] through the batched (M, N, D) form of :class:`emcl.em.EMCL`
(the reference's MMT variant: lambda multiplies, mu normalised across modalities at init, output
L2-normalised), in float32 with autocast off.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from emcl.em import EMSettings, em_reconstruct
from emcl.errors import UserError

MMT_EM = EMSettings(k=64, stage_num=5, beta=3.0)  # the reference's K, T and beta for this model

class ContextGating(nn.Module):
    """``x * sigmoid(BN(W x + b))`` (GLU over [x, BN(fc(x))])."""

    def __init__(self, dim: int, batch_norm: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.bn = nn.BatchNorm1d(dim) if batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.fc(x)
        if self.bn is not None:
            g = self.bn(g)
        return F.glu(torch.cat([x, g], dim=-1), dim=-1)


class GatedEmbeddingUnit(nn.Module):
    """Linear -> context gating (with batch norm) -> optional L2 normalisation."""

    def __init__(self, in_dim: int, out_dim: int, normalize: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)
        self.cg = ContextGating(out_dim)
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cg(self.fc(x))
        return F.normalize(x, dim=-1) if self.normalize else x


class VideoEncoder(nn.Module):
    """BERT-style encoder over feature tokens: features + position + type embeddings, LayerNorm,
    dropout, post-LN transformer layers (GELU), key-padding mask."""

    def __init__(
        self,
        dim: int,
        layers: int,
        heads: int,
        intermediate: int,
        max_position: int,
        num_types: int,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.max_position = max_position
        self.position = nn.Embedding(max_position, dim)
        self.token_type = nn.Embedding(num_types, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-12)
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            dim,
            heads,
            intermediate,
            dropout,
            activation="gelu",
            batch_first=True,
            norm_first=False,
            layer_norm_eps=1e-12,
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.apply(_bert_init)

    def forward(
        self, feats: torch.Tensor, positions: torch.Tensor, types: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        pos = positions.clamp(0, self.max_position - 1).long()
        h = self.dropout(self.norm(feats + self.position(pos) + self.token_type(types)))
        return self.encoder(h, src_key_padding_mask=mask == 0)


def load_bert(path: str | None, dropout: float) -> nn.Module:
    """The text BERT from a local folder (config.json, weights, vocab.txt), without its pooler; nothing is
    downloaded."""
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    if not path or not Path(path).is_dir():
        raise UserError(
            f"--bert_path {path!r}: a local BERT folder (config.json, weights, vocab.txt) "
            "is needed; nothing is downloaded"
        )
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # the unused pooler's "unexpected keys" report is noise here
    return BertModel.from_pretrained(
        path,
        local_files_only=True,
        add_pooling_layer=False,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )


def _bert_init(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


def pair_scores(t: torch.Tensor, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``S_ab = sum_m w_a^m <t_a^m, v_b^m>``; t (..., A, M, D), w (..., A, M), v (..., B, M, D)."""
    return torch.einsum("...amd,...bmd,...am->...ab", t, v, w)


class MMT(nn.Module):
    """MMT: ``encode_text``, ``encode_video``, ``em_transform`` and the training ``forward`` (similarity)."""

    def __init__(
        self,
        text_encoder: nn.Module,
        experts: Mapping[str, int],
        same_dim: int = 512,
        layers: int = 4,
        heads: int = 4,
        intermediate: int = 3072,
        max_position: int = 32,
        dropout: float = 0.1,
        normalize_experts: bool = False,
        em: EMSettings | None = MMT_EM,
    ) -> None:
        super().__init__()
        self.modalities = list(experts)
        m = len(self.modalities)
        self.text_encoder = text_encoder
        text_dim = text_encoder.config.hidden_size
        self.same_dim, self.normalize_experts = same_dim, normalize_experts
        self.reduce = nn.ModuleDict({e: nn.Linear(d, same_dim) for e, d in experts.items()})
        self.video_encoder = VideoEncoder(same_dim, layers, heads, intermediate, max_position, m + 1, dropout)
        self.video_gu = nn.ModuleDict(
            {e: GatedEmbeddingUnit(same_dim, same_dim, normalize_experts) for e in self.modalities}
        )
        self.text_gu = nn.ModuleDict(
            {e: GatedEmbeddingUnit(text_dim, same_dim, normalize_experts) for e in self.modalities}
        )
        self.text_weight_dropout = nn.Dropout(dropout)
        self.text_weight = nn.Linear(text_dim, m)  # one logit per modality (the reference's M Linear(.,1))
        self.emcl = None
        if em is not None:  # one layer over every modality's embeddings, as the reference
            self.emcl = em.layer(num_modalities=m, lamd_mode="multiply", normalize_output=True)

    # ------------------------------------------------------------------------------------ encoders
    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) ids -> per-modality text embeddings (B, M, D) and modality weights (B, M)."""
        cls = self.text_encoder(input_ids=ids, attention_mask=mask)[0][:, 0]
        t = torch.stack([self.text_gu[e](cls) for e in self.modalities], dim=1)
        w = torch.softmax(self.text_weight(self.text_weight_dropout(cls)).float(), dim=-1)
        if self.normalize_experts:
            t = F.normalize(t, dim=-1)
        return t, w

    def encode_video(self, experts: Mapping[str, Mapping[str, torch.Tensor]]) -> torch.Tensor:
        """Per-expert dicts (``features`` (B, T, D_e), ``positions``, ``mask`` (B, T), ``maxpool`` (B, D_e))
        -> per-modality video embeddings (B, M, D)."""
        first = experts[self.modalities[0]]["mask"]
        b, dev = first.shape[0], first.device
        dtype = self.reduce[self.modalities[0]].weight.dtype
        if torch.is_autocast_enabled(dev.type):
            dtype = torch.get_autocast_dtype(dev.type)
        feats = [torch.zeros(b, 1, self.same_dim, device=dev, dtype=dtype)]
        pos = [torch.zeros(b, 1, device=dev)]
        types = [torch.zeros(b, 1, dtype=torch.long, device=dev)]
        mask = [torch.ones(b, 1, device=dev)]
        agg_index = []
        n = 1
        for i, e in enumerate(self.modalities):
            x = experts[e]
            tok_mask = x["mask"].float()
            agg = F.normalize(self.reduce[e](x["maxpool"]), dim=-1)[:, None]
            temporal = F.normalize(self.reduce[e](x["features"]), dim=-1)
            feats += [agg.to(dtype), temporal.to(dtype)]
            pos += [torch.zeros(b, 1, device=dev), x["positions"].float()]
            t = tok_mask.shape[1]
            types.append(torch.full((b, 1 + t), i + 1, dtype=torch.long, device=dev))
            mask += [tok_mask.amax(dim=1, keepdim=True), tok_mask]
            agg_index.append(n)
            n += 1 + t
        h = self.video_encoder(
            torch.cat(feats, 1), torch.cat(pos, 1), torch.cat(types, 1), torch.cat(mask, 1)
        )
        v = torch.stack([self.video_gu[e](h[:, j]) for e, j in zip(self.modalities, agg_index)], dim=1)
        if self.normalize_experts:
            v = F.normalize(v, dim=-1)
        return v

    # ------------------------------------------------------------------------------------ EM + scores
    def em_transform(self, t: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """EMCL per modality on [videos; texts] of each leading block, without touching ``mu``:
        t (..., A, M, D), v (..., B, M, D) -> the same shapes, float32. Identity without EMCL."""
        if self.emcl is None:
            return t.float(), v.float()
        with torch.autocast(t.device.type, enabled=False):
            b = v.shape[-3]
            x = torch.cat([v.float(), t.float()], dim=-3).transpose(-3, -2)  # (..., M, B + A, D)
            r, _ = em_reconstruct(x, self.emcl.mu, self.emcl.stage_num, self.emcl.lamd, self.emcl.lamd_mode)
            y = F.normalize(x + self.emcl.beta * r, dim=-1).transpose(-3, -2)
            return y[..., b:, :, :], y[..., :b, :, :]

    def similarity(self, t: torch.Tensor, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Training similarity (B, B) of matched rows: EMCL on [v; t] per modality (updating ``mu`` in
        training), then ``sum_m w^m <t^m, v^m>``; float32 with autocast off."""
        with torch.autocast(t.device.type, enabled=False):
            t, w, v = t.float(), w.float(), v.float()
            if self.emcl is not None:
                b = v.shape[0]
                y = self.emcl(torch.cat([v, t], dim=0).transpose(0, 1))  # (M, 2B, D)
                v, t = y[:, :b].transpose(0, 1), y[:, b:].transpose(0, 1)
            return pair_scores(t, w, v)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, experts: Mapping, gather=None) -> torch.Tensor:
        """The (B, B) similarity of a training batch (texts x videos, matched on the diagonal);
        ``gather`` (all-gather with gradient) merges the ranks' embeddings first."""
        t, w = self.encode_text(ids, mask)
        v = self.encode_video(experts)
        if gather is not None:
            t, w, v = gather(t), gather(w), gather(v)
        return self.similarity(t, w, v)
