"""EMCL as a joint training module: MMT on expert features, with or without EMCL (docs/joint_training.md).

    python -m video_retrieval.joint_training.main_task_joint --config configs/mmt_synthetic.yaml \
        --output_dir runs/mmt_demo
    python -m video_retrieval.joint_training.main_task_joint --config configs/mmt_msrvtt.yaml \
        --anno_path data/MSRVTT --features data/MSRVTT/experts.h5 --bert_path models/bert-base-cased \
        --output_dir runs/mmt_msrvtt
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # a busy --output_dir stops the run before the imports below take seconds
    from emcl.train.lock import refuse_busy_output_dir

    refuse_busy_output_dir(sys.argv[1:])

import argparse
import logging
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from emcl import dist
from emcl.batches import to_device
from emcl.data.annotations import RetrievalSplit
from emcl.data.expert_datasets import (
    CaptionDataset,
    ExpertTrainDataset,
    ExpertVideoDataset,
    collate_experts,
    load_tokenizer,
)
from emcl.data.experts import MMT_DATATYPES, ExpertSplits, find_store, parse_experts
from emcl.data.loader import build_loader, rank_subset
from emcl.errors import UserError, cli_main
from emcl.evaluation import encode_split
from emcl.loss import hinge_topk
from emcl.metrics import t2v_metrics, v2t_metrics
from emcl.scoring import embedding_score_matrix
from emcl.train.config import fraction, nonneg_float, nonneg_int, positive_float, positive_int
from emcl.train.flags import EVAL_POLICIES, em_group, em_settings, evaluation_group, flag, group
from emcl.train.retrieval import RetrievalTask
from emcl.train.runner import run

from .mmt import MMT, load_bert, pair_scores

log = logging.getLogger("emcl.joint")

MMT_FLAGS = group(
    "MMT",
    flag("--datatype", kind="experiment score", default="msrvtt", choices=MMT_DATATYPES),
    flag("--features", kind="experiment", default=None,
         help="expert store: a consolidated .h5 (scripts/consolidate_experts.py) or the per-video folder"),
    flag("--features_in_memory", type=int, default=0, choices=(0, 1),
         help="read the consolidated store into RAM"),
    flag("--experts", kind="arch experiment", default="face,ocr,rgb,s3d,scene,speech,vggish",
         help="name[:dim],... in modality order"),
    flag("--bert_path", default=None,
         help="local BERT folder (config.json, weights, vocab.txt); nothing is downloaded"),
    flag("--max_words", kind="score experiment", type=positive_int, default=30,
         help="text tokens, [CLS] and [SEP] included"),
    flag("--max_tokens", kind="score experiment", type=positive_int, default=30,
         help="temporal feature tokens per expert"),
    flag("--same_dim", kind="arch", type=positive_int, default=512),
    flag("--vid_layers", kind="arch", type=positive_int, default=4),
    flag("--vid_heads", kind="arch", type=positive_int, default=4),
    flag("--vid_intermediate", kind="arch", type=positive_int, default=3072),
    flag("--max_position", kind="arch", type=positive_int, default=32,
         help="position embeddings of the video encoder (seconds + 2)"),
    flag("--dropout", type=fraction, default=0.1),
    flag("--normalize_experts", kind="arch", default="auto", choices=("auto", "0", "1"),
         help="L2-normalise each modality's embeddings; auto: on exactly when EMCL is off (MMT's baseline)"),
    flag("--margin", kind="experiment", type=nonneg_float, default=0.05, help="margin of the hinge loss"),
    flag("--topk", kind="experiment", type=positive_int, default=1,
         help="hardest negatives per row and column in the hinge loss"),
    flag("--gamma", kind="experiment", type=positive_float, default=0.95, help="StepLR factor per epoch"),
    flag("--iters_per_epoch", kind="experiment", type=nonneg_int, default=1000,
         help="training steps per epoch (0: one pass over the videos)"),
)  # fmt: skip
POLICY_HELP = (
    "headline policy (all are reported): paper: EM per 32 matched pairs as the reference; "
    "query: EM per query over [all videos; that query]; none: no EM"
)


def _normalize(cfg: argparse.Namespace) -> bool:
    """L2-normalised experts: asked for, or (auto) MMT's baseline without EMCL."""
    return bool(cfg.normalize_experts == "1" or (cfg.normalize_experts == "auto" and not cfg.use_emcl))


class JointTask(RetrievalTask):
    """MMT (a text BERT and a multi-modal video transformer) with the EMCL layer per modality, trained with
    the hinge loss over the batch's hardest negatives."""

    name = "joint"
    module = "video_retrieval.joint_training.main_task_joint"
    groups = (MMT_FLAGS, em_group(centerK=64, stage_num=5, beta=3.0))
    evaluation = evaluation_group(32, EVAL_POLICIES, POLICY_HELP)
    config_blocks = ("synthetic",)
    setting_kinds = {"faithful": "score"}  # the reference's tokenisation changes the captions scored
    policy_note = (
        "paper: EM per 32 matched pairs in list order (transductive, as the reference); "
        "query: EM per query over all videos; none: no EM"
    )

    # ------------------------------------------------------------------------------------- model
    def build_model(self) -> MMT:
        """Text BERT from ``--bert_path`` (local files only) plus the MMT heads."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        return MMT(
            load_bert(cfg.bert_path, cfg.dropout), parse_experts(cfg.experts), same_dim=cfg.same_dim,
            layers=cfg.vid_layers, heads=cfg.vid_heads, intermediate=cfg.vid_intermediate,
            max_position=cfg.max_position, dropout=cfg.dropout, normalize_experts=_normalize(cfg),
            em=em_settings(cfg),
        )  # fmt: skip

    def compile_targets(self, model: MMT) -> list[torch.nn.Module]:
        return [model.text_encoder, model.video_encoder]

    # -------------------------------------------------------------------------------------- data
    def prepare_data(self) -> None:
        """With a ``synthetic`` config and no ``--anno_path``: write the synthetic experts, consolidate
        them into one store and point the run at it. Otherwise find ``--features`` if not given."""
        cfg = self.cfg
        if cfg.anno_path is None and cfg.synthetic:
            from emcl.data.synthetic_experts import prepare_synthetic_experts

            syn = dict(cfg.synthetic)
            out = Path(syn.pop("out", "data/synthetic_experts"))
            if self.info.is_main:
                prepare_synthetic_experts(out, parse_experts(cfg.experts), **syn)
            dist.barrier()
            cfg.anno_path = str(out)
            cfg.features = cfg.features or str(out / "experts.h5")
            cfg.bert_path = cfg.bert_path or str(out / "bert")
        elif cfg.anno_path is None:
            raise UserError("--anno_path (the folder of split lists) is required, or use a synthetic config")
        elif cfg.features is None:
            cfg.features = str(find_store(cfg.anno_path))

    @cached_property
    def splits(self) -> ExpertSplits:
        """The split lists over the expert store, opened once (after ``prepare_data``)."""
        cfg = self.cfg
        experts = parse_experts(cfg.experts)
        return ExpertSplits(cfg.datatype, cfg.anno_path, cfg.features, experts, bool(cfg.features_in_memory))

    def load_split(self, name: str) -> RetrievalSplit:
        return self.splits[name]

    def tokenizer(self) -> Any:
        return load_tokenizer(self.cfg.bert_path, bool(self.cfg.faithful))

    def check_data(self, splits: list[str]) -> None:
        """Parse every split the run uses; log the missing experts of each. The evaluated splits' features
        must be finite (training's own NaNs stop at their step): found now, not after training."""
        for name in splits:
            log.info("%s", self.splits.describe(name))
            bad = self.splits.store.nonfinite(self.load_split(name).video_ids) if name != "train" else []
            if bad:
                raise UserError(f"{self.splits.store.path}: {name} features hold NaN or infinity: "
                                f"{', '.join(bad)}")

    def loader(self, split: str) -> Any:
        """``--iters_per_epoch`` batches (0: one pass over the videos), each video with one of its
        captions; the draws keyed by (seed, epoch, index)."""
        cfg = self.cfg
        data = self.load_split(split)
        length = cfg.iters_per_epoch * cfg.batch_size if cfg.iters_per_epoch else len(data.video_ids)
        ds = ExpertTrainDataset(
            data, self.splits.store, self.tokenizer(), cfg.max_words, cfg.max_tokens, bool(cfg.faithful),
            cfg.seed, length=length,
        )  # fmt: skip
        ds.num_videos = data.num_videos
        return build_loader(
            ds, batch_size=cfg.batch_size // self.info.world_size, shuffle=True, seed=cfg.seed,
            workers=cfg.workers, drop_last=True, collate_fn=collate_experts, epoch_keys=True,
        )  # fmt: skip

    # ---------------------------------------------------------------------------------- training
    def build_optimizer(self, model: MMT, total_steps: int, steps_per_epoch: int) -> tuple[Any, Any]:
        """Adam on every parameter (BERT included), StepLR per epoch as a per-step LambdaLR."""
        cfg = self.cfg
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        gamma = cfg.gamma
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: gamma ** (s // steps_per_epoch))

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's embeddings, with gradient: MMT keeps the plain gather (its batches are all full
        and ``--faithful`` changes only its tokenisation)."""
        return dist.all_gather_with_grad(x)

    def step(self, ddp: torch.nn.Module, batch: dict) -> torch.Tensor:
        """Hinge loss over the top-k negatives of the batch similarity (gathered over ranks)."""
        b = to_device({k: batch[k] for k in ("text_ids", "text_mask", "experts")}, self.info.device)
        gather = self.gather if self.info.world_size > 1 else None
        sim = ddp(b["text_ids"], b["text_mask"], b["experts"], gather=gather)
        return hinge_topk(sim, self.cfg.margin, self.cfg.topk)

    # -------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def encode(self, model: MMT, split: RetrievalSplit) -> tuple[torch.Tensor, ...]:
        """Text embeddings (A, M, D), modality weights (A, M) and video embeddings (V, M, D), every rank."""
        cfg, info = self.cfg, self.info
        model.eval()
        ranks = (info.rank, info.world_size)
        kw = dict(batch_size=cfg.batch_size_val, shuffle=False, seed=cfg.seed, distributed=False,
                  collate_fn=collate_experts)  # fmt: skip
        texts = CaptionDataset(split, self.tokenizer(), cfg.max_words, bool(cfg.faithful))
        videos = ExpertVideoDataset(split, self.splits.store, cfg.max_tokens)
        texts = build_loader(rank_subset(texts, *ranks), workers=0, **kw)
        videos = build_loader(rank_subset(videos, *ranks), workers=cfg.workers, **kw)
        t, w = encode_split(
            texts, lambda b: model.encode_text(b["text_ids"], b["text_mask"]), split.num_captions,
            info.device, cfg.precision, "caption_index",
        )  # fmt: skip
        (v,) = encode_split(
            videos, lambda b: model.encode_video(b["experts"]), split.num_videos,
            info.device, cfg.precision, "video_index",
        )  # fmt: skip
        return t, w, v

    def usable(self, split: RetrievalSplit, features: tuple) -> tuple[tuple, torch.Tensor, dict[str, Any]]:
        """Every video is scored (a missing expert enters at its text weight); the missing are counted."""
        missing = self.splits.store.missing_counts(split.video_ids)
        report = {"num_texts": split.num_captions, "num_videos": split.num_videos, "missing_experts": missing}
        return features, torch.tensor(split.caption_video), report

    def policies(self, model: MMT, split: RetrievalSplit) -> tuple[str, ...]:
        """Only ``none`` without EMCL; ``paper`` (matched pairs) needs one caption per video."""
        policies = super().policies(model, split)
        if "paper" in policies and split.multi_caption:
            log.warning(
                "%s/%s: several captions per video: the paper policy (matched pairs) is skipped",
                split.datatype, split.split,
            )  # fmt: skip
            policies = tuple(p for p in policies if p != "paper")
        return policies

    def score_rows(self, model: MMT, features: tuple, policy: str) -> torch.Tensor:
        """This rank's rows: EM per modality on the embeddings (``emcl.scoring``), then MMT's weighted sum."""
        t, w, v = features
        return embedding_score_matrix(
            model.em_transform, lambda tt, vv, ww: pair_scores(tt, ww, vv), t, v, extra=w, mode=policy,
            block=self.cfg.eval_block_size, rank=self.info.rank, world_size=self.info.world_size,
        )  # fmt: skip

    def rank(self, sim: torch.Tensor, caption_video: torch.Tensor) -> dict[str, Any]:
        """Tied ranks averaged, as the reference's MMT evaluation."""
        return {
            "t2v": t2v_metrics(sim, caption_video, ties="average"),
            "v2t": v2t_metrics(sim, caption_video, ties="average"),
        }

    def format_results(self, res: dict[str, Any]) -> str:
        """The policy tables, then how many videos miss each expert."""
        missing = {e: sum(c.values()) for e, c in res["missing_experts"].items() if sum(c.values())}
        extra = "\nvideos missing an expert: " + ", ".join(f"{e} {n}" for e, n in missing.items())
        return super().format_results(res) + (extra if missing else "")

    def after_training(self, out: Path) -> Path | None:
        from emcl.viz.curves import draw_curves

        return draw_curves(out)


TASK = JointTask


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train and/or evaluate MMT; see the module docstring."""
    return run(TASK, argv, description=__doc__)


if __name__ == "__main__":
    cli_main(main)
