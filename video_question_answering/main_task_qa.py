"""EMCL-QA training and evaluation on MSRVTT-QA (docs/qa.md), one process or many under torchrun.

    python -m video_question_answering.main_task_qa --config configs/synthetic_qa.yaml --output_dir runs/qa
    torchrun --nproc_per_node=2 -m video_question_answering.main_task_qa --config configs/msrvtt_qa.yaml \
        --anno_path data/msrvtt_qa --video_path data/msrvtt/videos --output_dir runs/msrvtt_qa

``accuracy`` counts out-of-vocabulary answers as wrong; ``accuracy_filtered`` drops them, as the reference.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # a busy --output_dir stops the run before the imports below take seconds
    from emcl.train.lock import refuse_busy_output_dir

    refuse_busy_output_dir(sys.argv[1:])

import logging
import time
from pathlib import Path
from typing import Any

import torch

from emcl import dist
from emcl.clip import build_clip_from_config, load_clip
from emcl.data import qa_datasets as qa_data
from emcl.data.annotations import QASplit
from emcl.data.datasets import VideoDataset, collate_skip
from emcl.data.loader import build_loader, rank_subset
from emcl.data.qa_datasets import QATrainDataset, QuestionDataset
from emcl.errors import UserError, cli_main
from emcl.evaluation import encode_split
from emcl.metrics import format_qa_table, qa_accuracy
from emcl.train.config import fraction, nonneg_float, nonneg_int, positive_int
from emcl.train.flags import em_group, em_settings, flag, frame_group, group
from emcl.train.optim import build_optimizer, build_scheduler, param_groups
from emcl.train.runner import run
from emcl.train.sources import check_skip_fraction, check_split_videos, prepare_synthetic, video_source
from emcl.train.task import Task

from .model import EMCLQA

log = logging.getLogger("emcl.qa")

EMCL_QA = group(
    "EMCL-QA",
    flag("--clip_path", kind="arch", default="ViT-B/16",
         help="CLIP weights (file or name); ignored when clip_config is set"),
    flag("--temporal_layers", kind="arch", type=nonneg_int, default=4,
         help="temporal blocks over the frames (0: none)"),
    flag("--proj_dim", kind="arch", type=positive_int, default=2048,
         help="width of each modality's projection"),
    flag("--hidden_dim", kind="arch", type=positive_int, default=8192, help="hidden width of the answer MLP"),
    flag("--dropout", kind="experiment", type=fraction, default=0.1, help="dropout after the projections"),
    flag("--nce_weight", kind="experiment", type=nonneg_float, default=0.5,
         help="weight of the contrastive loss beside the CE"),
    flag("--freeze_clip_embeddings", kind="experiment", type=int, default=1, choices=(0, 1),
         help="freeze CLIP's token/positional embeddings, conv1, class embedding and ln_pre (the reference)"),
    flag("--optimizer", kind="experiment", default="bertadam", choices=("bertadam", "adamw"),
         help="bertadam: the reference's Adam without bias correction and its warmup-cosine curve; "
         "adamw: torch AdamW with warmup-cosine"),
    flag("--per_tensor_clip", kind="experiment", type=int, default=None, choices=(0, 1),
         help="also clip each tensor's gradient norm to 1, as the reference's BertAdam (default: on with "
         "--faithful only)"),
    flag("--grad_checkpointing", action="store_true", help="recompute CLIP's blocks in the backward pass"),
)
MODEL_KEYS = ("temporal_layers", "proj_dim", "hidden_dim", "dropout", "nce_weight")  # EMCLQA's, as the flags


class QATask(Task):
    """CLIP with a temporal head and an answer classifier, trained with CE plus InfoNCE through EMCL."""

    name = "qa"
    module = "video_question_answering.main_task_qa"
    groups = (
        frame_group(max_words=32, max_frames=12, video_framerate=1.0, image_size=224),
        em_group(centerK=16, stage_num=5, beta=1.0, scored=False),  # no EMCL in the answer logits
        EMCL_QA,
    )
    config_blocks = ("clip_config", "synthetic")
    setting_kinds = {"clip_config": "arch"}
    logit_scale_max = 100.0

    # -------------------------------------------------------------------------------------- data
    def prepare_data(self) -> None:
        """The synthetic QA set (and its frame cache) on first use, when the config has one and no data
        was given on the command line."""
        prepare_synthetic(self.cfg, self.info, format="msrvtt_qa", default_out="data/synthetic_qa")
        if self.cfg.video_path is None and self.cfg.frame_cache is None:
            raise UserError("--video_path (or --frame_cache) is required")

    def qa_split(self, name: str) -> QASplit:
        return qa_data.qa_split(self.cfg.anno_path, name)

    def tokens(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return qa_data.qa_tokens(self.cfg.anno_path, name, self.cfg.max_words)

    def has_split(self, split: str) -> bool:
        return qa_data.has_qa_split(self.cfg.anno_path, split)

    def check_data(self, splits: list[str]) -> None:
        """Parse every split the run uses and the vocabulary, and stat each video."""
        vocab, source = qa_data.ans2label(self.cfg.anno_path), video_source(self.cfg)
        for name in splits:
            qa = self.qa_split(name)
            oov = sum(r.answer not in vocab for r in qa.records)
            log.info("%s: %d questions on %d videos, %d with an answer outside the %d-answer vocabulary",
                     qa.file, len(qa.records), len(qa.video_ids), oov, len(vocab))
            skipped = "whose questions are skipped in training and count as wrong in evaluation"
            check_split_videos(source, qa.video_ids, f"msrvtt_qa/{name}", self.cfg, skipped=skipped)

    def loader(self, split: str) -> Any:
        """Per-rank loader over the in-vocabulary training questions (global batch split across ranks)."""
        cfg = self.cfg
        vocab = qa_data.ans2label(cfg.anno_path)
        ds = QATrainDataset(self.qa_split(split), video_source(cfg), *self.tokens(split), vocab,
                            skip_bad_videos=cfg.skip_bad_videos)
        if len(ds) < cfg.batch_size:
            raise UserError(f"training set has {len(ds)} usable questions, fewer than --batch_size "
                            f"{cfg.batch_size}")
        return build_loader(ds, batch_size=cfg.batch_size // self.info.world_size, shuffle=True,
                            seed=cfg.seed, workers=cfg.workers, drop_last=True, collate_fn=collate_skip)

    # ------------------------------------------------------------------------------------- model
    def build_model(self) -> EMCLQA:
        """CLIP (from ``clip_config`` or pretrained ``clip_path``) plus the QA head over the vocabulary."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        where = f"{cfg.config or 'config'}: clip_config"
        clip = build_clip_from_config(cfg.clip_config, where) if cfg.clip_config else load_clip(cfg.clip_path)
        if cfg.grad_checkpointing:
            clip.set_grad_checkpointing(True)
        answers = qa_data.qa_vocab(cfg.anno_path)
        model = EMCLQA(clip, answers, em=em_settings(cfg), **{k: getattr(cfg, k) for k in MODEL_KEYS})
        if cfg.freeze_clip_embeddings:
            log.info("frozen as in the reference: %s", ", ".join(model.freeze_reference_parts()))
        return model

    def compile_targets(self, model: EMCLQA) -> list[torch.nn.Module]:
        return [model.clip.visual, model.clip.transformer]

    # ---------------------------------------------------------------------------------- training
    def build_optimizer(self, model: EMCLQA, total_steps: int, steps_per_epoch: int) -> tuple[Any, Any]:
        """The reference's BertAdam (Adam without bias correction, its warmup-cosine curve) by default, or
        AdamW with warmup-cosine; CLIP learns at ``lr * coef_lr``."""
        cfg = self.cfg
        groups = param_groups(model, cfg.lr, cfg.coef_lr, cfg.weight_decay, faithful=cfg.faithful)
        reference = cfg.optimizer == "bertadam"
        optimizer = build_optimizer(groups, faithful=reference)
        curve = reference or cfg.faithful
        return optimizer, build_scheduler(optimizer, total_steps, cfg.warmup_proportion, faithful=curve)

    def step(self, ddp: torch.nn.Module, batch: dict) -> torch.Tensor:
        """Answer CE + nce_weight * InfoNCE after EMCL on the features gathered once across ranks.

        The CE is the local batch's mean (DDP's average of the gradients is the global batch's gradient);
        the returned value is the global batch's loss (the local CE's value replaced by its mean over ranks,
        the gradient untouched), so the logged loss does not depend on the number of processes.
        ``--faithful``: the reference's CE on the whole gathered batch on every rank, with its 1/W-scaled
        encoder gradients.
        """
        dev, several = self.info.device, self.info.world_size > 1
        keys = ("text_ids", "text_mask", "frames", "frame_mask", "label")
        gather = self.gather if several else None  # floating features with gradient, the labels without
        inputs = (batch[k].to(dev, non_blocking=True) for k in keys)
        loss, ce, _ = ddp(*inputs, gather=gather, gather_labels=gather, ce_on_gathered=self.cfg.faithful)
        if several and not self.cfg.faithful:
            n = torch.tensor([float(batch["label"].shape[0])], device=dev)
            weighted = dist.reduce_mean(torch.cat([ce.reshape(1) * n, n]))  # sizes differ with skipped videos
            loss = loss + (weighted[0] / weighted[1] - ce)
        return loss

    def clip_grad(self, model: EMCLQA) -> torch.Tensor | None:
        """The global clip to ``--max_grad_norm``; then, with the reference's per-tensor clip, each
        tensor's norm to 1 (which BertAdam does inside its step). Returns the global norm before clipping."""
        norm = super().clip_grad(model)
        per_tensor = self.cfg.per_tensor_clip
        if self.cfg.faithful if per_tensor is None else per_tensor:
            for p in model.parameters():
                if p.grad is not None:
                    torch.nn.utils.clip_grad_norm_(p, 1.0)
        return norm

    # -------------------------------------------------------------------------------- evaluation
    def _loader(self, dataset: Any, workers: int) -> Any:
        cfg, info = self.cfg, self.info
        return build_loader(rank_subset(dataset, info.rank, info.world_size), batch_size=cfg.batch_size_val,
                            shuffle=False, seed=cfg.seed, workers=workers, distributed=False)

    def _pad(self) -> int | None:
        return self.cfg.batch_size_val if getattr(self.cfg, "_compiled", False) else None  # one shape

    @torch.no_grad()
    def encode(self, model: EMCLQA, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Every video of ``split`` encoded once: features (V, D) and validity (V,), on every rank."""
        cfg = self.cfg
        model.eval()
        qa = self.qa_split(split)
        videos = VideoDataset(qa, video_source(cfg), skip_bad_videos=cfg.skip_bad_videos)
        encode = lambda b: (model.encode_video(b["frames"], b["frame_mask"]), b["valid"])
        loader = self._loader(videos, cfg.workers)
        return encode_split(loader, encode, len(qa.video_ids), self.info.device, cfg.precision, "video_index",
                            self._pad())

    @torch.no_grad()
    def predict(self, model: EMCLQA, split: str, video: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        """The answer id of every question of ``split`` from its video's features (no EMCL in the answer
        logits); -1 for a question on an unreadable video."""
        cfg, qa = self.cfg, self.qa_split(split)

        def answer(b: dict) -> torch.Tensor:
            vid = b["video_index"]
            q = model.encode_question(b["text_ids"], b["text_mask"])
            pred = model.answer_logits(video[vid].to(q.dtype), q).float().argmax(dim=-1)
            return torch.where(ok[vid], pred, torch.full_like(pred, -1))  # unreadable video: wrong

        loader = self._loader(QuestionDataset(qa, *self.tokens(split)), 0)
        n = len(qa.records)
        return encode_split(loader, answer, n, self.info.device, cfg.precision, "index", self._pad(), -1)[0]

    def evaluate(self, model: EMCLQA, split: str) -> dict[str, Any]:
        """Accuracy on ``split``: each video encoded once, then every question. A question on a video that
        could not be read (only with ``--skip_bad_videos``) counts as wrong."""
        start, anno = time.perf_counter(), self.cfg.anno_path
        qa, vocab = self.qa_split(split), qa_data.ans2label(anno)
        qa_data.check_vocab(anno, model.answers)
        video, ok = self.encode(model, split)
        preds = self.predict(model, split, video, ok)
        answers, types = [r.answer for r in qa.records], [r.answer_type for r in qa.records]
        results = qa_accuracy(preds.cpu(), answers, types, vocab)
        major, _ = qa_data.majority_answer(anno)
        base = qa_accuracy([vocab[major]] * len(answers), answers, types, vocab)
        bad = [qa.video_ids[i] for i in (~ok).nonzero().flatten().tolist()]
        if bad:
            log.warning("%s: %d unreadable video(s); their questions count as wrong: %s", qa.file, len(bad),
                        ", ".join(bad[:20]))
            check_skip_fraction(bad, len(qa.video_ids), f"msrvtt_qa/{split}", self.cfg)
        results.update(
            majority_baseline={"answer": major, "accuracy": base["accuracy"],
                               "accuracy_filtered": base["accuracy_filtered"]},
            num_videos=len(qa.video_ids),
            num_skipped_videos=len(bad),
            seconds=round(time.perf_counter() - start, 2),
        )
        return results

    def select_key(self, results: dict[str, Any]) -> tuple[float, float]:
        """Selection on the honest accuracy, then the filtered one."""
        return results["accuracy"], results["accuracy_filtered"] or 0.0

    def format_results(self, results: dict[str, Any]) -> str:
        base = results.get("majority_baseline", {})
        return (f"{format_qa_table(results)}\naccuracy counts out-of-vocabulary answers as wrong; filtered "
                "drops them (the reference); "
                f"majority answer '{base.get('answer')}': {base.get('accuracy', 0):.2f}")

    def after_training(self, out: Path) -> Path | None:
        from emcl.viz.curves import draw_curves

        return draw_curves(out)


TASK = QATask


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train and/or evaluate EMCL-QA; see the module docstring."""
    return run(TASK, argv, description=__doc__)


if __name__ == "__main__":
    cli_main(main)
