"""EMCL-Net training and evaluation (docs/emcl_net.md), one process or many under torchrun.

    python -m video_retrieval.emcl_net.main_task_retrieval --config configs/synthetic.yaml \
        --output_dir runs/demo
    torchrun --nproc_per_node=8 -m video_retrieval.emcl_net.main_task_retrieval --config configs/msrvtt.yaml \
        --anno_path data/msrvtt/anno --video_path data/msrvtt/videos --output_dir runs/msrvtt

Outputs in ``--output_dir``: ``config.yaml``, ``train.log``, ``metrics.json``, ``curves.png``,
``checkpoint_last.pt`` (every epoch) and, where a validation split selects the epoch,
``checkpoint_best.pt``. The run loop (resume, selection, eval-only runs, the lock) is
:mod:`emcl.train.runner`; this file supplies EMCL-Net's model, data and evaluation.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # a busy --output_dir stops the run before the imports below take seconds
    from emcl.train.lock import refuse_busy_output_dir

    refuse_busy_output_dir(sys.argv[1:])

import logging
from functools import partial
from pathlib import Path
from typing import Any

import torch

from emcl.clip import build_clip_from_config, load_clip
from emcl.data.datasets import (
    RetrievalSplit,
    TextDataset,
    TrainDataset,
    VideoDataset,
    collate_skip,
    has_split,
    load_split,
)
from emcl.data.loader import build_loader, rank_subset
from emcl.data.sources import VideoSource
from emcl.errors import UserError, cli_main
from emcl.evaluation import encode_split
from emcl.progress import bar
from emcl.scoring import score_matrix
from emcl.train.config import fraction, positive_float, positive_int
from emcl.train.flags import em_group, em_settings, flag, frame_group, group
from emcl.train.retrieval import RetrievalTask, drop_unreadable
from emcl.train.runner import run
from emcl.train.sources import check_split_videos, prepare_synthetic, video_source

from .model import EMCLNet, emcl_scores
from .reference_checkpoint import adopt_reference_checkpoint

log = logging.getLogger("emcl.retrieval")

DATATYPES = ("msrvtt", "msvd", "lsmdc", "activitynet", "didemo")

EMCL_NET = group(
    "EMCL-Net",
    flag("--datatype", kind="experiment", default="msrvtt", choices=DATATYPES),
    flag("--msrvtt_train", kind="experiment", default="9k", choices=("9k", "7k", "full")),
    flag("--msrvtt_test", default="1k", choices=("1k", "full")),
    flag("--clip_path", kind="arch", default="ViT-B/32",
         help="CLIP weights (file or name); ignored when clip_config is set"),
    flag("--agg_module", kind="arch score", default="seqTransf",
         choices=("seqTransf", "seqLSTM", "None", "meanP"),
         help="frame aggregation; meanP: CLIP4Clip's mean-pooling baseline (one vector per video)"),
    flag("--agg_layers", kind="arch", type=positive_int, default=4),
    flag("--temp", kind="score", type=positive_float, default=3.0,
         help="temperature of the text-conditioned frame weights"),
    flag("--augment", kind="experiment", type=int, default=0, choices=(0, 1),
         help="RandAugment (4 ops, magnitude 7) on training clips"),
    flag("--freeze_patch_embed", kind="experiment", type=int, default=1, choices=(0, 1),
         help="keep CLIP's patch embedding (visual.conv1) fixed in training, as the reference does"),
    flag("--multi_positive", kind="experiment", type=int, default=0, choices=(0, 1),
         help="other captions of the same video in a batch are positives, not negatives (reference: 0)"),
)
MEMORY = group(
    "memory",
    flag("--grad_checkpointing", nargs="?", const="blocks", default="none",
         choices=("none", "blocks", "attn", "mlp"),
         help="recompute CLIP activations in the backward pass: whole blocks (the bare flag), or only their "
         "attention or MLP parts (docs/performance.md)"),
    flag("--checkpoint_layers", type=positive_int, default=None, help="checkpoint only the first N blocks"),
    flag("--lean_activations", type=int, default=0, choices=(0, 1),
         help="fewer saved activations (same math)"),
    flag("--memory_budget", type=fraction, default=None,
         help="compiled runs: activation-memory budget (0..1)"),
)


class EMCLNetTask(RetrievalTask):
    """CLIP with a temporal head and the EMCL layer, trained with the symmetric InfoNCE loss."""

    name = "retrieval"
    module = "video_retrieval.emcl_net.main_task_retrieval"
    groups = (EMCL_NET, frame_group(), em_group(centerK=32, stage_num=9, beta=3.0), MEMORY)
    config_blocks = ("clip_config", "synthetic")
    setting_kinds = {"clip_config": "arch"}
    logit_scale_max = 100.0
    zero_shot = True

    # ------------------------------------------------------------------------------------- model
    def build_model(self) -> EMCLNet:
        """CLIP (from ``clip_config`` or pretrained ``clip_path``) plus the EMCL-Net head."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        if cfg.clip_config:
            clip = build_clip_from_config(cfg.clip_config, f"{cfg.config or 'config'}: clip_config")
        else:
            clip = load_clip(cfg.clip_path)
        model = EMCLNet(clip, agg_module=cfg.agg_module, agg_layers=cfg.agg_layers, temp=cfg.temp,
                        em=em_settings(cfg))
        # after the head is built: the frame transformer's copies of the text blocks are not checkpointed
        model.clip.set_grad_checkpointing(getattr(cfg, "grad_checkpointing", "none"), cfg.checkpoint_layers)
        if cfg.lean_activations:
            model.clip.set_lean_activations(True)
        return model

    def prepare_zero_shot(self) -> None:
        """Pretrained CLIP from ``--clip_path`` as it is: frames mean-pooled, whatever head the config
        names (it would be untrained); an untrained ``clip_config`` is refused."""
        cfg = self.cfg
        if cfg.clip_config:
            raise UserError("zero-shot (no --init_model, no training) needs pretrained CLIP weights from "
                            "--clip_path, but the config's clip_config builds an untrained CLIP")
        log.info("zero-shot: pretrained CLIP %s as it is, frames mean-pooled (the config's head: %s)",
                 cfg.clip_path, cfg.agg_module)
        cfg.agg_module, cfg.zero_shot = "meanP", True

    def adopt_checkpoint(self, checkpoint: Any, path: str, configured: set[str]) -> Any:
        """The authors' EMCL-Net files (``pytorch_model.bin.N``) bring their architecture."""
        return adopt_reference_checkpoint(checkpoint, path, self.cfg, configured)

    def compile_targets(self, model: EMCLNet) -> list[torch.nn.Module]:
        return [model.clip.visual, model.clip.transformer]

    # -------------------------------------------------------------------------------------- data
    def prepare_data(self) -> None:
        """The synthetic dataset (and its frame cache) on first use, when the config has one and no data
        was given on the command line."""
        prepare_synthetic(self.cfg, self.info, format=self.cfg.datatype, default_out="data/synthetic")

    def video_source(self) -> VideoSource:
        return video_source(self.cfg, any_extension=self.cfg.datatype == "msvd")

    def _split_options(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.datatype != "msrvtt":
            return {}
        return {"msrvtt_train": cfg.msrvtt_train, "msrvtt_test": cfg.msrvtt_test}

    def has_split(self, split: str) -> bool:
        return has_split(self.cfg.datatype, split, self.cfg.anno_path, **self._split_options())

    def load_split(self, name: str) -> RetrievalSplit:
        return load_split(self.cfg.datatype, self.cfg.anno_path, name, **self._split_options())

    def check_data(self, splits: list[str]) -> None:
        """Parse every split the run uses and stat each of its videos."""
        source = self.video_source()
        for name in splits:
            split = self.load_split(name)
            check_split_videos(source, split.video_ids, f"{split.datatype}/{name}", self.cfg)

    def loader(self, split: str) -> Any:
        """Per-rank loader over every training caption; augmentation keyed by (seed, epoch, index)."""
        cfg = self.cfg
        augment = None
        if cfg.augment:
            from emcl.data.augment import ClipRandAugment

            augment = ClipRandAugment(num_ops=4, magnitude=7)
        ds = TrainDataset(self.load_split(split), self.video_source(), cfg.max_words, augment=augment,
                          skip_bad_videos=cfg.skip_bad_videos, seed=cfg.seed)
        if len(ds) < cfg.batch_size:
            raise UserError(f"training set has {len(ds)} captions, fewer than --batch_size {cfg.batch_size}")
        return build_loader(ds, batch_size=cfg.batch_size // self.info.world_size, shuffle=True,
                            seed=cfg.seed, workers=cfg.workers, drop_last=True, collate_fn=collate_skip,
                            epoch_keys=True)

    # ---------------------------------------------------------------------------------- training
    def build_optimizer(self, model: EMCLNet, total_steps: int, steps_per_epoch: int) -> tuple[Any, Any]:
        """``--faithful`` freezes CLIP (the reference's fp16 CLIP at lr 1e-7 does not move); the patch
        embedding stays fixed unless ``--freeze_patch_embed 0`` (the reference freezes ``visual.conv1``)."""
        if self.cfg.faithful:
            model.clip.requires_grad_(False)
        if self.cfg.freeze_patch_embed:
            model.clip.visual.conv1.requires_grad_(False)
        return super().build_optimizer(model, total_steps, steps_per_epoch)

    def step(self, ddp: torch.nn.Module, batch: dict) -> torch.Tensor:
        """The contrastive loss of one batch (features gathered across ranks with gradient)."""
        dev = self.info.device
        return ddp(
            batch["text_ids"].to(dev, non_blocking=True),
            batch["text_mask"].to(dev, non_blocking=True),
            batch["frames"].to(dev, non_blocking=True),
            batch["frame_mask"].to(dev, non_blocking=True),
            gather=self.gather if self.info.world_size > 1 else None,
            video_ids=batch["video_index"].to(dev, non_blocking=True) if self.cfg.multi_positive else None,
        )

    # -------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def encode(self, model: EMCLNet, split: RetrievalSplit) -> tuple[torch.Tensor, ...]:
        """Text features (A, D), frame features (V, T, D), frame masks and video validity, on every rank."""
        cfg, info = self.cfg, self.info
        model.eval()
        pad = cfg.batch_size_val if getattr(cfg, "_compiled", False) else None  # one shape when compiled
        kw = dict(batch_size=cfg.batch_size_val, shuffle=False, seed=cfg.seed, distributed=False)
        videos = VideoDataset(split, self.video_source(), skip_bad_videos=cfg.skip_bad_videos)
        texts = build_loader(rank_subset(TextDataset(split, cfg.max_words), info.rank, info.world_size),
                             workers=0, **kw)
        videos = build_loader(rank_subset(videos, info.rank, info.world_size), workers=cfg.workers, **kw)
        (t,) = encode_split(texts, lambda b: model.encode_text(b["text_ids"], b["text_mask"]),
                            len(split.captions), info.device, cfg.precision, "caption_index", pad)
        f, m, ok = encode_split(
            bar(videos, show=info.is_main, desc=f"features {split.split}", leave=False),
            lambda b: (model.encode_video(b["frames"], b["frame_mask"]), b["frame_mask"], b["valid"]),
            len(split.video_ids), info.device, cfg.precision, "video_index", pad,
        )  # fmt: skip
        return t, f, m, ok

    def usable(self, split: RetrievalSplit, features: tuple) -> tuple[tuple, torch.Tensor, dict[str, Any]]:
        """Skipped videos (only with ``--skip_bad_videos``) leave the gallery with their captions."""
        t, f, m, ok = features
        (t, f, m), caption_video, num_bad = drop_unreadable(split, t, (f, m), ok, self.cfg)
        report = {"num_texts": int(t.shape[0]), "num_videos": int(f.shape[0]), "num_skipped_videos": num_bad}
        return (t, f, m), caption_video, report

    def score_fn(self, model: EMCLNet, policy: str) -> Any:
        """``fn(t, f, mask)``: the scores of texts against videos' frames, with EMCL unless ``none``."""
        emcl = model.emcl if policy != "none" else None
        return partial(emcl_scores, emcl=emcl, temp=model.temp, pool=model.pool)

    def score_rows(self, model: EMCLNet, features: tuple, policy: str) -> torch.Tensor:
        t, f, m = features
        info = self.info
        return score_matrix(self.score_fn(model, policy), t, f, m, mode=policy,
                            block=self.cfg.eval_block_size, rank=info.rank, world_size=info.world_size)

    def after_training(self, out: Path) -> Path | None:
        from emcl.viz.curves import draw_curves

        return draw_curves(out)


TASK = EMCLNetTask


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train and/or evaluate EMCL-Net; see the module docstring."""
    return run(TASK, argv, description=__doc__)


if __name__ == "__main__":
    cli_main(main)
