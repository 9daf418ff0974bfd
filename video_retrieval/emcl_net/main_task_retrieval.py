"""EMCL-Net training and evaluation (docs/reference.md, 'EMCL-Net'), one process or many under torchrun.

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

import argparse
import logging
import time
from functools import partial
from typing import Any

import torch
from tqdm import tqdm

from emcl import dist
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
from emcl.data.sources import SkipBudget, VideoSource, check_videos_exist, missing_videos
from emcl.errors import UserError, cli_main
from emcl.metrics import CAPTION_DIRECTIONS, DIRECTIONS, evaluate_similarity, format_table
from emcl.scoring import score_matrix
from emcl.train.amp import autocast
from emcl.train.config import fraction, nonneg_float, positive_float, positive_int
from emcl.train.features import pad_rows, prefetch_to_device
from emcl.train.optim import build_optimizer as _build_optimizer
from emcl.train.optim import build_scheduler, param_groups
from emcl.train.runner import Task, check_skip_fraction, run
from emcl.train.sources import prepare_synthetic
from emcl.train.sources import video_source as _video_source

from .model import EMCLNet, emcl_scores
from .reference_checkpoint import adopt_reference_checkpoint

log = logging.getLogger("emcl.retrieval")

DATATYPES = ("msrvtt", "msvd", "lsmdc", "activitynet", "didemo")
EXTRA_KEYS = ("clip_config", "synthetic")
EVAL_POLICIES = ("paper", "query", "none")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """EMCL-Net's flags (the common ones are the run loop's); the reference's names where they exist."""
    a = p.add_argument
    a("--datatype", default="msrvtt", choices=DATATYPES)
    a("--msrvtt_train", default="9k", choices=("9k", "7k", "full"))
    a("--msrvtt_test", default="1k", choices=("1k", "full"))
    a("--max_words", type=positive_int, default=32)
    a("--max_frames", type=positive_int, default=12)
    a("--video_framerate", type=positive_float, default=1.0)
    a("--image_size", type=positive_int, default=224)
    a("--decode_backend", default="pyav", choices=("pyav", "opencv"))
    a(
        "--augment",
        type=int,
        default=0,
        choices=(0, 1),
        help="RandAugment (4 ops, magnitude 7) on training clips",
    )
    a(
        "--agg_module",
        default="seqTransf",
        choices=("seqTransf", "seqLSTM", "None", "meanP"),
        help="frame aggregation; meanP: CLIP4Clip's mean-pooling baseline (one vector per video)",
    )
    a("--agg_layers", type=positive_int, default=4)
    a("--temp", type=positive_float, default=3.0, help="temperature of the text-conditioned frame weights")
    a("--use_emcl", type=int, default=1, choices=(0, 1))
    a("--centerK", type=positive_int, default=32)
    a("--stage_num", type=positive_int, default=9)
    a("--momentum", type=fraction, default=0.9)
    a("--lamd", type=positive_float, default=1.0)
    a("--beta", type=nonneg_float, default=3.0)
    a("--em_init", default="upstream", choices=("upstream", "gaussian", "linspace"))
    a("--clip_path", default="ViT-B/32", help="CLIP weights (file or name); ignored when clip_config is set")
    a(
        "--freeze_patch_embed",
        type=int,
        default=1,
        choices=(0, 1),
        help="keep CLIP's patch embedding (visual.conv1) fixed in training, as the reference does",
    )
    a(
        "--eval_block",
        default="paper",
        choices=EVAL_POLICIES,
        help="headline policy (all three are reported): paper: EM per 32x32 block as the reference; "
        "query: EM per text over all videos; none: no EM",
    )
    a("--eval_block_size", type=positive_int, default=32)
    a(
        "--multi_positive",
        type=int,
        default=0,
        choices=(0, 1),
        help="other captions of the same video in a batch are positives, not negatives (reference: 0)",
    )
    a(
        "--grad_checkpointing",
        nargs="?",
        const="blocks",
        default="none",
        choices=("none", "blocks", "attn", "mlp"),
        help="recompute CLIP activations in the backward pass: whole blocks (the bare flag), or only their "
        "attention or MLP parts (docs/performance.md)",
    )
    a("--checkpoint_layers", type=positive_int, default=None, help="checkpoint only the first N blocks")
    a("--lean_activations", type=int, default=0, choices=(0, 1), help="fewer saved activations (same math)")
    a("--memory_budget", type=fraction, default=None, help="compiled runs: activation-memory budget (0..1)")


# ---------------------------------------------------------------------------------------------- model
def build_model(cfg: argparse.Namespace) -> EMCLNet:
    """CLIP (from ``clip_config`` or pretrained ``clip_path``) plus the EMCL-Net head."""
    torch.manual_seed(cfg.seed)
    if cfg.clip_config:
        clip = build_clip_from_config(cfg.clip_config, f"{cfg.config or 'config'}: clip_config")
    else:
        clip = load_clip(cfg.clip_path)
    model = EMCLNet(
        clip,
        agg_module=cfg.agg_module,
        agg_layers=cfg.agg_layers,
        temp=cfg.temp,
        use_emcl=bool(cfg.use_emcl),
        centerK=cfg.centerK,
        stage_num=cfg.stage_num,
        momentum=cfg.momentum,
        lamd=cfg.lamd,
        beta=cfg.beta,
        em_init=cfg.em_init,
        seed=cfg.seed,
    )
    # after the head is built: the frame transformer's copies of the text blocks are not checkpointed
    model.clip.set_grad_checkpointing(getattr(cfg, "grad_checkpointing", "none"), cfg.checkpoint_layers)
    if cfg.lean_activations:
        model.clip.set_lean_activations(True)
    return model


# ----------------------------------------------------------------------------------------------- data
def prepare_data(cfg: argparse.Namespace, info: dist.DistInfo) -> None:
    """Generate the synthetic dataset (and its frame cache) on first use when the config asks for it
    and no data was given on the command line."""
    prepare_synthetic(cfg, info, format=cfg.datatype, default_out="data/synthetic")


def video_source(cfg: argparse.Namespace) -> VideoSource:
    return _video_source(cfg, any_extension=cfg.datatype == "msvd")


def split_options(cfg: argparse.Namespace) -> dict[str, Any]:
    return (
        {"msrvtt_train": cfg.msrvtt_train, "msrvtt_test": cfg.msrvtt_test} if cfg.datatype == "msrvtt" else {}
    )


def has_dataset_split(cfg: argparse.Namespace, split: str) -> bool:
    """Whether the dataset, under these options, has ``split`` (e.g. a validation split for selection)."""
    return has_split(cfg.datatype, split, cfg.anno_path, **split_options(cfg))


def get_split(cfg: argparse.Namespace, split: str) -> RetrievalSplit:
    return load_split(cfg.datatype, cfg.anno_path, split, **split_options(cfg))


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def extract_features(model: EMCLNet, split: RetrievalSplit, cfg, info: dist.DistInfo):
    """Text features (A, D), frame features (V, T, D), frame masks and video validity, on every rank."""
    device = info.device
    text_loader = build_loader(
        rank_subset(TextDataset(split, cfg.max_words), info.rank, info.world_size),
        batch_size=cfg.batch_size_val,
        shuffle=False,
        seed=cfg.seed,
        workers=0,
        distributed=False,
    )
    video_ds = VideoDataset(split, video_source(cfg), skip_bad_videos=cfg.skip_bad_videos)
    video_loader = build_loader(
        rank_subset(video_ds, info.rank, info.world_size),
        batch_size=cfg.batch_size_val,
        shuffle=False,
        seed=cfg.seed,
        workers=cfg.workers,
        distributed=False,
    )
    # batches copied ahead on a side stream; when compiled, the last short batch is padded to one shape
    pad = getattr(cfg, "_compiled", False)
    t_parts, t_idx = [], []
    for b in prefetch_to_device(text_loader, device):
        b, n = pad_rows(b, cfg.batch_size_val) if pad else (b, len(b["caption_index"]))
        with autocast(device, cfg.precision):
            t_parts.append(model.encode_text(b["text_ids"], b["text_mask"])[:n].float())
        t_idx.append(b["caption_index"][:n])
    f_parts, m_parts, v_idx, valid = [], [], [], []
    bar = tqdm(video_loader, desc=f"features {split.split}", disable=not info.is_main, leave=False)
    for b in prefetch_to_device(bar, device):
        b, n = pad_rows(b, cfg.batch_size_val) if pad else (b, len(b["video_index"]))
        with autocast(device, cfg.precision):
            f_parts.append(model.encode_video(b["frames"], b["frame_mask"])[:n].float())
        m_parts.append(b["frame_mask"][:n])
        v_idx.append(b["video_index"][:n])
        valid.append(b["valid"][:n])
    d, n_frames = model.clip.embed_dim, cfg.max_frames

    def cat(parts, shape, dtype):
        return torch.cat(parts) if parts else torch.empty(shape, dtype=dtype, device=device)

    a, v = len(split.captions), len(split.video_ids)
    ti = dist.gather_tensors_no_grad(cat(t_idx, (0,), torch.long))
    vi = dist.gather_tensors_no_grad(cat(v_idx, (0,), torch.long))
    t = dist.gather_in_order(cat(t_parts, (0, d), torch.float32), ti, a)
    f = dist.gather_in_order(cat(f_parts, (0, n_frames, d), torch.float32), vi, v)
    m = dist.gather_in_order(cat(m_parts, (0, n_frames), torch.long), vi, v)
    ok = dist.gather_in_order(cat(valid, (0,), torch.bool), vi, v)
    return t, f, m, ok


@torch.no_grad()
def evaluate_split(model: EMCLNet, split: RetrievalSplit, cfg, info: dist.DistInfo) -> dict[str, Any]:
    """Cache features once, then score them under every policy (``paper``, ``query``, ``none``).

    The headline rows (``t2v``, ``v2t``, ...) follow ``--eval_block``; all three policies are kept under
    ``policies``. Score matrices are built on the device, their rows shared by the ranks.
    """
    model.eval()
    start = time.perf_counter()
    t, f, m, ok = extract_features(model, split, cfg, info)
    caption_video = torch.tensor(split.caption_video, device=t.device)
    num_bad = int((~ok).sum())
    if num_bad:  # skipped videos (only with --skip_bad_videos) leave the gallery with their captions
        bad_ids = [split.video_ids[i] for i in (~ok).nonzero().flatten().tolist()]
        log.warning(
            "%s/%s: %d unreadable video(s) left out of evaluation: %s",
            split.datatype,
            split.split,
            num_bad,
            ", ".join(bad_ids[:20]),
        )
        check_skip_fraction(bad_ids, len(split.video_ids), f"{split.datatype}/{split.split}", cfg)
        keep_v = ok.nonzero().flatten()
        new_index = torch.full_like(ok, -1, dtype=torch.long)
        new_index[keep_v] = torch.arange(len(keep_v), device=t.device)
        keep_t = ok[caption_video]
        t, caption_video = t[keep_t], new_index[caption_video[keep_t]]
        f, m = f[keep_v], m[keep_v]
    extract_s = time.perf_counter() - start
    policies: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for policy in EVAL_POLICIES:
        t0 = time.perf_counter()
        emcl = model.emcl if policy != "none" else None
        if emcl is None and policy != "none":
            continue  # a model without EMCL scores the same under every policy
        rows = score_matrix(
            partial(emcl_scores, emcl=emcl, temp=model.temp, pool=model.pool),
            t,
            f,
            m,
            mode=policy,
            block=cfg.eval_block_size,
            rank=info.rank,
            world_size=info.world_size,
        )
        sim = dist.gather_tensors_no_grad(rows)
        policies[policy] = evaluate_similarity(sim, caption_video)
        seconds[policy] = round(time.perf_counter() - t0, 3)
    if model.emcl is None:  # say so rather than copy numbers under the EM policies' names
        log.info("the model has no EMCL layer: only policy 'none' is scored")
    headline = cfg.eval_block if cfg.eval_block in policies else "none"
    results: dict[str, Any] = dict(policies[headline])
    results.update(
        eval_block=headline,
        policies=policies,
        num_texts=int(t.shape[0]),
        num_videos=int(f.shape[0]),
        num_skipped_videos=num_bad,
        seconds={"features": round(extract_s, 2), **seconds},
    )
    return results


def evaluate(model: EMCLNet, split: str, cfg, info: dist.DistInfo) -> dict[str, Any]:
    """The run loop's evaluation of ``split`` ("val" or "test")."""
    return evaluate_split(model, get_split(cfg, split), cfg, info)


def format_results(res: dict[str, Any]) -> str:
    """The headline table, then one line per policy and direction: the policies side by side."""
    lines = [f"headline policy: {res['eval_block']} ({res['num_texts']} texts x {res['num_videos']} videos)"]
    lines.append(format_table({k: v for k, v in res.items() if k in (*DIRECTIONS, *CAPTION_DIRECTIONS)}))
    keys = ("R1", "R5", "R10", "R50", "MdR", "MnR")
    lines.append(f"{'policy':<7} {'direction':<17}" + "".join(f"{k:>8}" for k in keys))
    for policy, rows in res["policies"].items():
        for direction, row in rows.items():
            lines.append(f"{policy:<7} {direction:<17}" + "".join(f"{row[k]:>8.1f}" for k in keys))
    return "\n".join(lines)


def select_key(results: dict) -> tuple[float, float, float]:
    """Model selection on text-to-video R@1, then R@5 and R@10 as tie-breakers (headline policy)."""
    r = results["t2v"]
    return r["R1"], r["R5"], r["R10"]


# -------------------------------------------------------------------------------------------- training
def build_train_loader(cfg: argparse.Namespace, info: dist.DistInfo):
    """Per-rank loader over every training caption; augmentation keyed by (seed, epoch, index)."""
    per_rank = cfg.batch_size // info.world_size
    train_split = get_split(cfg, "train")
    augment = None
    if cfg.augment:
        from emcl.data.augment import ClipRandAugment

        augment = ClipRandAugment(num_ops=4, magnitude=7)
    train_ds = TrainDataset(
        train_split,
        video_source(cfg),
        cfg.max_words,
        augment=augment,
        skip_bad_videos=cfg.skip_bad_videos,
        seed=cfg.seed,
    )
    if len(train_ds) < cfg.batch_size:
        raise UserError(
            f"training set has {len(train_ds)} captions, fewer than --batch_size {cfg.batch_size}"
        )
    return build_loader(
        train_ds,
        batch_size=per_rank,
        shuffle=True,
        seed=cfg.seed,
        workers=cfg.workers,
        drop_last=True,
        collate_fn=collate_skip,
        epoch_keys=True,  # augmentation seeded by (seed, epoch, index): identical after --resume
    )


def _gather(cfg: argparse.Namespace):
    def gather(x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            return dist.gather_tensors_no_grad(x)
        # with skipped videos the ranks' batches can differ in length
        return dist.all_gather_with_grad(x, reduce_grads=not cfg.faithful, variable=cfg.skip_bad_videos)

    return gather


def train_step(
    ddp, model: EMCLNet, batch: dict, cfg: argparse.Namespace, info: dist.DistInfo
) -> torch.Tensor:
    """The contrastive loss of one batch (features gathered across ranks with gradient)."""
    device = info.device
    return ddp(
        batch["text_ids"].to(device, non_blocking=True),
        batch["text_mask"].to(device, non_blocking=True),
        batch["frames"].to(device, non_blocking=True),
        batch["frame_mask"].to(device, non_blocking=True),
        gather=_gather(cfg) if info.world_size > 1 else None,
        video_ids=batch["video_index"].to(device, non_blocking=True) if cfg.multi_positive else None,
    )


def build_optimizer(model: EMCLNet, cfg: argparse.Namespace, total_steps: int, steps_per_epoch: int):
    """AdamW with backbone / new groups and warmup-cosine; ``--faithful`` freezes CLIP (the reference's
    fp16 CLIP at lr 1e-7 does not move) and uses its Adam and schedule. The patch embedding stays fixed
    unless ``--freeze_patch_embed 0`` (the reference freezes ``visual.conv1``)."""
    if cfg.faithful:
        model.clip.requires_grad_(False)
    if cfg.freeze_patch_embed:
        model.clip.visual.conv1.requires_grad_(False)
    groups = param_groups(model, cfg.lr, cfg.coef_lr, cfg.weight_decay, faithful=cfg.faithful)
    optimizer = _build_optimizer(groups, faithful=cfg.faithful)
    return optimizer, build_scheduler(optimizer, total_steps, cfg.warmup_proportion, faithful=cfg.faithful)


def after_step(model: EMCLNet) -> None:
    model.clamp_logit_scale(100.0)


def check_data(cfg: argparse.Namespace, splits: list[str]) -> None:
    """Before the first step: parse every split the run uses and stat each of its videos.

    A missing or empty video is an error; with ``--skip_bad_videos`` up to ``--max_skip_fraction`` of a
    split's videos may be missing (logged; they are skipped like unreadable ones)."""
    source = video_source(cfg)
    for name in splits:
        split = get_split(cfg, name)
        what = f"{split.datatype}/{name}"
        if not cfg.skip_bad_videos:
            check_videos_exist(source, split.video_ids, what)
            continue
        bad = missing_videos(source, split.video_ids)
        if bad:
            log.warning(
                "%s: %d missing or empty video(s) will be skipped: %s",
                what,
                len(bad),
                ", ".join(list(bad)[:20]),
            )
            SkipBudget(len(split.video_ids), cfg.max_skip_fraction, what).add(bad)


def compile_targets(model: EMCLNet) -> list[torch.nn.Module]:
    """Compiled in place, so module trees and checkpoint keys stay as they are."""
    return [model.clip.visual, model.clip.transformer]


ARCH_KEYS = ("clip_config", "clip_path", "agg_module", "agg_layers", "use_emcl", "centerK")
SCORE_KEYS = (
    "temp",
    "centerK",
    "stage_num",
    "lamd",
    "beta",
    "em_init",
    "agg_module",
    "max_words",
    "max_frames",
    "video_framerate",
    "image_size",
    "eval_block",
    "eval_block_size",
)
EXPERIMENT_KEYS = (
    "multi_positive",
    "freeze_patch_embed",
    "datatype",
    "msrvtt_train",
    "augment",
    "momentum",
    "max_words",
    "max_frames",
    "video_framerate",
)

TASK = Task(
    name="retrieval",
    module=__name__ if __name__ != "__main__" else "video_retrieval.emcl_net.main_task_retrieval",
    add_arguments=add_arguments,
    build_model=build_model,
    build_train_loader=build_train_loader,
    train_step=train_step,
    evaluate=evaluate,
    has_split=has_dataset_split,
    select_key=select_key,
    format_results=format_results,
    check_data=check_data,
    prepare_data=prepare_data,
    build_optimizer=build_optimizer,
    after_step=after_step,
    compile_targets=compile_targets,
    adopt_checkpoint=adopt_reference_checkpoint,
    extra_config_keys=EXTRA_KEYS,
    arch_keys=ARCH_KEYS,
    score_keys=SCORE_KEYS,
    experiment_keys=EXPERIMENT_KEYS,
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train and/or evaluate EMCL-Net; see the module docstring."""
    return run(TASK, argv, description=__doc__)


if __name__ == "__main__":
    cli_main(main)
