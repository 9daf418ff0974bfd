"""EMCL-QA (docs/reference.md, 'EMCL-QA'): open-ended video QA as classification over an answer
vocabulary, with EMCL as an auxiliary contrastive loss on the projected video and question features.

Video: CLIP frame features -> frame positions + text-initialised temporal blocks + ``mean_proj`` +
residual -> attention pooling over frames. Question: CLIP token features (projected) -> attention pooling
over tokens. Each side: Linear(D -> proj_dim) + dropout; answer head on the concatenation:
Linear(2 proj_dim -> hidden_dim), ReLU, Linear(hidden_dim -> num_answers). Both poolings mask their
softmax (the reference does not), so padding never changes a result.

Loss = answer CE + ``nce_weight`` * symmetric InfoNCE on ``logit_scale * cos`` of the features after EMCL
(K=16, T=5, lambda=1, beta=1) and L2 normalisation; everything after the encoders that touches EMCL runs
in float32 with autocast off. The answer logits never see EMCL.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from emcl.clip import CLIPBackbone, normalize_frames
from emcl.em import EMSettings
from emcl.errors import UserError
from emcl.loss import symmetric_ce
from emcl.temporal import FrameTransformer

Gather = Callable[[torch.Tensor], torch.Tensor]

# CLIP parts the reference freezes even with freeze_layer_num 0 (docs/reference.md, 'EMCL-QA')
REFERENCE_FROZEN = (
    "token_embedding",
    "positional_embedding",
    "visual.positional_embedding",
    "visual.conv1",
    "visual.class_embedding",
    "visual.ln_pre",
)


QA_EM = EMSettings(k=16, stage_num=5, beta=1.0)  # the reference's K, T and beta for this model

class AttentionPool(nn.Module):
    """Learned attention pooling ``sum_i softmax_i(w . x_i + b) x_i`` over the real positions only.

    The softmax runs over positions with mask 1 (masked scores are -inf, so their weight is exactly 0);
    a row without any real position pools to zeros. Runs in float32 with autocast off.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.score = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x`` (B, N, D), ``mask`` (B, N) -> (B, D)."""
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            keep = mask > 0
            x = x.masked_fill(~keep[..., None], 0.0)  # padding may hold anything, even non-finite values
            s = self.score(x).squeeze(-1).masked_fill(~keep, float("-inf"))
            w = torch.softmax(s, dim=-1).nan_to_num(0.0)  # all-masked row: NaN -> 0
            return torch.einsum("bn,bnd->bd", w, x)


class EMCLQA(nn.Module):
    """Video QA model: ``encode_video``, ``encode_question``, ``answer_logits`` and the training loss.

    ``answers`` (the vocabulary in id order) is part of the state dict, so a checkpoint is only ever
    evaluated against the vocabulary it was trained on.
    """

    def __init__(
        self,
        clip: CLIPBackbone,
        answers: Sequence[str],
        temporal_layers: int = 4,
        proj_dim: int = 2048,
        hidden_dim: int = 8192,
        dropout: float = 0.1,
        em: EMSettings | None = QA_EM,
        nce_weight: float = 0.5,
    ) -> None:
        super().__init__()
        if len(answers) < 1:
            raise ValueError("the answer vocabulary is empty")
        self.answers = list(answers)  # the head's classes in id order; saved with the weights
        num_answers = len(self.answers)
        self.clip = clip
        width = clip.embed_dim
        self.temporal = None
        if temporal_layers > 0:
            self.temporal = FrameTransformer(clip, temporal_layers, out_proj=True)
        self.frame_pool = AttentionPool(width)
        self.token_pool = AttentionPool(width)
        self.video_proj = nn.Sequential(nn.Linear(width, proj_dim), nn.Dropout(dropout))
        self.question_proj = nn.Sequential(nn.Linear(width, proj_dim), nn.Dropout(dropout))
        self.head = nn.Sequential(
            nn.Linear(2 * proj_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, num_answers)
        )
        self.nce_weight = nce_weight
        self.emcl = em.layer() if em is not None else None

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    def get_extra_state(self) -> dict[str, Any]:
        return {"answers": list(self.answers)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Loading weights trained on another vocabulary would silently mislabel every answer: refuse."""
        answers = list(state.get("answers", []))
        if answers != self.answers:
            diff = next((i for i, (a, b) in enumerate(zip(answers, self.answers)) if a != b), None)
            where = f"first difference at id {diff}" if diff is not None else "different sizes"
            raise UserError(
                f"the checkpoint's answer vocabulary ({len(answers)} answers) differs from this run's "
                f"train_ans2label.json ({len(self.answers)} answers; {where})"
            )

    def freeze_reference_parts(self) -> list[str]:
        """Freeze the CLIP parts the reference keeps fixed; returns the names of the frozen tensors."""
        frozen = []
        for name, p in self.clip.named_parameters():
            if name.startswith(REFERENCE_FROZEN):
                p.requires_grad_(False)
                frozen.append(f"clip.{name}")
        return frozen

    # ------------------------------------------------------------------ encoders
    def encode_video(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """uint8 frames (B, T, 3, H, W) and mask (B, T) -> projected video feature (B, proj_dim)."""
        dev = frames.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.float32
        feats = self.clip.encode_frames(normalize_frames(frames, dtype, mask=frame_mask))
        if self.temporal is not None:
            feats = self.temporal(feats, frame_mask)
        return self.video_proj(self.frame_pool(feats, frame_mask))

    def encode_question(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token ids and mask (B, L) -> projected question feature (B, proj_dim)."""
        _, tokens = self.clip.encode_text(ids, mask, return_tokens=True)
        return self.question_proj(self.token_pool(self.clip._project_text(tokens), mask))

    def answer_logits(self, video: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        """Answer scores (B, num_answers) from the projected features (no EMCL)."""
        return self.head(torch.cat([video, question], dim=-1))

    # ---------------------------------------------------------------------- loss
    def contrastive_loss(self, video: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE of matched (video, question) rows after EMCL on ``[videos; questions]``.

        float32, autocast off; EMCL updates its ``mu`` in training.
        """
        with torch.autocast(video.device.type, enabled=False):
            x = torch.cat([video.float(), question.float()], dim=0)
            if self.emcl is not None:
                x = self.emcl(x)
            x = F.normalize(x, dim=-1)
            v, q = x[: video.shape[0]], x[video.shape[0] :]
            return symmetric_ce(self.logit_scale.float().exp() * q @ v.t())

    def forward(
        self,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        frames: torch.Tensor,
        frame_mask: torch.Tensor,
        labels: torch.Tensor,
        gather: Gather | None = None,
        gather_labels: Gather | None = None,
        ce_on_gathered: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training loss on a batch: ``(loss, answer_ce, nce)``.

        ``gather`` merges the ranks' features once (with gradient) for the contrastive term. The answer CE
        is the local batch's mean (DDP's gradient average then gives the global batch's gradient), or with
        ``ce_on_gathered`` the reference's CE on the whole gathered batch on every rank (``gather_labels``
        gathers the labels).
        """
        v = self.encode_video(frames, frame_mask)
        q = self.encode_question(text_ids, text_mask)
        vg, qg = (gather(v), gather(q)) if gather is not None else (v, q)
        if ce_on_gathered and gather is not None:
            logits = self.answer_logits(vg, qg)
            labels = gather_labels(labels) if gather_labels is not None else labels
        else:
            logits = self.answer_logits(v, q)
        ce = F.cross_entropy(logits.float(), labels)
        nce = self.contrastive_loss(vg, qg)
        return ce + self.nce_weight * nce, ce.detach(), nce.detach()

    @torch.no_grad()
    def clamp_logit_scale(self, max_value: float = 100.0) -> None:
        """Keep ``exp(logit_scale) <= max_value`` (applied after every optimiser step)."""
        self.logit_scale.clamp_(max=math.log(max_value))
