"""EMCL-Net (docs/reference.md, 'EMCL-Net'): CLIP text and frame features, temporal aggregation,
text-conditioned frame weighting, the EM subspace layer on [pair video vectors; text vectors], cosine
similarity."""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from emcl.clip import CLIPBackbone, normalize_frames
from emcl.em import EMCL, EMSettings, em_reconstruct
from emcl.loss import multi_positive_ce, symmetric_ce
from emcl.temporal import REFERENCE_LAYER_NORM_EPS, FrameTransformer

log = logging.getLogger(__name__)

AggModule = Literal["seqTransf", "seqLSTM", "None", "meanP"]
Pool = Literal["text", "mean"]


EMCL_NET_EM = EMSettings(k=32, stage_num=9, beta=3.0)  # the reference's K, T and beta for this model

class FrameLSTM(nn.Module):
    """``seqLSTM``: a one-layer LSTM over the frames plus the input.

    Frames are padded at the end, so running the LSTM over all T slots gives the same outputs as a
    packed sequence on the real frames without a host sync for the lengths. Padded slots keep their
    input (the reference leaves them batch-dependent: 1x or 2x the input).
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(width, width, batch_first=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return out * mask[..., None].to(out.dtype) + x


def pair_video_vectors(t: torch.Tensor, f: torch.Tensor, mask: torch.Tensor, temp: float) -> torch.Tensor:
    """Text-conditioned frame pooling: ``v_ij = sum_k softmax_k(t_i . f_jk / temp) * mask_jk * f_jk``.

    ``t`` (..., A, D), ``f`` (..., B, T, D), ``mask`` (..., B, T) -> (..., A, B, D). The softmax runs over
    all T slots and the mask is applied afterwards without renormalising, as in the reference.
    """
    w = torch.softmax(torch.einsum("...ad,...btd->...abt", t, f) / temp, dim=-1)
    w = w * mask.unsqueeze(-3).to(w.dtype)
    return torch.einsum("...abt,...btd->...abd", w, f)


def mean_video_vectors(f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CLIP4Clip's ``meanP``: masked mean of L2-normalised frames, (..., B, T, D) -> (..., B, D)."""
    m = mask.to(f.dtype).unsqueeze(-1)
    return (F.normalize(f, dim=-1) * m).sum(dim=-2) / m.sum(dim=-2).clamp(min=1.0)


def emcl_scores(
    t: torch.Tensor,
    f: torch.Tensor,
    mask: torch.Tensor,
    emcl: EMCL | None,
    temp: float,
    update: bool = False,
    pool: Pool = "text",
) -> torch.Tensor:
    """Cosine scores (..., A, B) after EMCL on ``[v_ij rows; t_i rows]`` of each leading block.

    ``pool="mean"`` (``meanP``): one video vector per video, independent of the text; EMCL then runs on
    ``[v_j rows; t_i rows]``.

    With ``update`` (training), the layer's forward runs and updates ``mu``; otherwise the blocks go
    through the batched EM without touching the state, so any number of blocks run in one call.
    Everything here (pooling, EM, residual, normalisation, cosine) runs in float32 with autocast off,
    in training and evaluation alike (docs/reference.md, 'Precision'); gradients flow back to bf16
    encoders as usual.
    """
    with torch.autocast(t.device.type, enabled=False):
        return _emcl_scores_fp32(t.float(), f.float(), mask, emcl, temp, update, pool)


def _emcl_scores_fp32(
    t: torch.Tensor, f: torch.Tensor, mask: torch.Tensor, emcl: EMCL | None, temp: float, update: bool,
    pool: Pool = "text",
) -> torch.Tensor:
    a, b, d = t.shape[-2], f.shape[-3], t.shape[-1]
    if pool == "mean":
        v = mean_video_vectors(f, mask)  # (..., B, D)
        lead = torch.broadcast_shapes(v.shape[:-2], t.shape[:-2])
        x = torch.cat([v.expand(*lead, b, d), t.expand(*lead, a, d)], dim=-2)
        return _em_cosine(x, emcl, update, b, lambda yv, yt: torch.einsum("...ad,...bd->...ab", yt, yv))
    v = pair_video_vectors(t, f, mask, temp)  # (..., A, B, D)
    lead = v.shape[:-3]
    x = torch.cat([v.reshape(*lead, a * b, d), t.expand(*lead, a, d)], dim=-2)
    return _em_cosine(
        x, emcl, update, a * b,
        lambda yv, yt: torch.einsum("...ad,...abd->...ab", yt, yv.reshape(*lead, a, b, d)),
    )


def _em_cosine(x: torch.Tensor, emcl: EMCL | None, update: bool, nv: int, cosine) -> torch.Tensor:
    """EMCL (when given) on the rows ``x`` = [``nv`` video rows; text rows], L2 normalisation, cosine."""
    if emcl is not None:
        if update:
            x = emcl(x)
        else:
            r, _ = em_reconstruct(x, emcl.mu, emcl.stage_num, emcl.lamd, emcl.lamd_mode)
            x = x + emcl.beta * r
    x = F.normalize(x, dim=-1)
    return cosine(x[..., :nv, :], x[..., nv:, :])


class EMCLNet(nn.Module):
    """EMCL-Net: ``encode_text``, ``encode_video``, ``scores`` and the training ``forward`` (loss)."""

    def __init__(
        self,
        clip: CLIPBackbone,
        agg_module: AggModule = "seqTransf",
        agg_layers: int = 4,
        temp: float = 3.0,
        em: EMSettings | None = EMCL_NET_EM,
    ) -> None:
        super().__init__()
        self.clip = clip
        self.agg_module = agg_module
        self.temp = temp
        self.pool: Pool = "mean" if agg_module == "meanP" else "text"
        if agg_module == "seqTransf":
            # the reference's temporal LayerNorms use epsilon 1e-12 (CLIP's use 1e-5)
            self.agg: nn.Module | None = FrameTransformer(
                clip, agg_layers, layer_norm_eps=REFERENCE_LAYER_NORM_EPS
            )
        elif agg_module == "seqLSTM":
            self.agg = FrameLSTM(clip.embed_dim)
        elif agg_module in ("None", None, "meanP"):
            self.agg = None
        else:
            raise ValueError(f"agg_module must be seqTransf, seqLSTM, None or meanP, got {agg_module!r}")
        self.emcl = em.layer() if em is not None else None

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) token ids -> (B, D) text features (projected EOT)."""
        return self.clip.encode_text(ids, mask)

    def encode_video(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """uint8 (B, T, 3, H, W) frames -> (B, T, D) per-frame features after temporal aggregation.

        Frames are normalised here on their device; padded slots become zero after normalisation, as the
        reference's zero-padded inputs.
        """
        dev = frames.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.float32
        x = normalize_frames(frames, dtype, mask=frame_mask)
        feats = self.clip.encode_frames(x)
        if self.agg is not None:
            feats = self.agg(feats, frame_mask)
        return feats

    def scores(
        self, t: torch.Tensor, f: torch.Tensor, mask: torch.Tensor, update: bool = False
    ) -> torch.Tensor:
        """Cosine scores of texts x videos (see :func:`emcl_scores`); leading block dims allowed."""
        return emcl_scores(t, f, mask, self.emcl, self.temp, update=update, pool=self.pool)

    def loss_from_features(
        self, t: torch.Tensor, f: torch.Tensor, mask: torch.Tensor, video_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Symmetric cross-entropy on ``exp(logit_scale) * scores`` for matched (text, video) rows.

        With ``video_ids`` (B,) (``--multi_positive``), rows showing the same video are all positives
        (:func:`emcl.loss.multi_positive_ce`) instead of negatives; without, the reference's loss.
        """
        s = self.scores(t, f, mask, update=self.training)
        logits = self.logit_scale.exp() * s
        return symmetric_ce(logits) if video_ids is None else multi_positive_ce(logits, video_ids)

    def forward(
        self,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        frames: torch.Tensor,
        frame_mask: torch.Tensor,
        gather=None,
        video_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Training loss on a batch; ``gather`` (e.g. all-gather with gradient) merges ranks' features,
        and ``video_ids`` (the batch's ``video_index``, for the multi-positive loss) like them."""
        t = self.encode_text(text_ids, text_mask)
        f = self.encode_video(frames, frame_mask)
        if gather is not None:
            t, f, frame_mask = gather(t), gather(f), gather(frame_mask)
            if video_ids is not None:
                video_ids = gather(video_ids)
        return self.loss_from_features(t, f, frame_mask, video_ids)

    @torch.no_grad()
    def clamp_logit_scale(self, max_value: float = 100.0) -> None:
        """Keep ``exp(logit_scale) <= max_value`` (applied after every optimiser step)."""
        self.logit_scale.clamp_(max=math.log(max_value))
