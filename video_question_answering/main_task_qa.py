"""EMCL-QA training and evaluation on MSRVTT-QA (docs/reference.md, 'EMCL-QA'), one process or many
under torchrun.

    python -m video_question_answering.main_task_qa --config configs/synthetic_qa.yaml --output_dir runs/qa
    torchrun --nproc_per_node=2 -m video_question_answering.main_task_qa --config configs/msrvtt_qa.yaml \
        --anno_path data/msrvtt_qa --video_path data/msrvtt/videos --output_dir runs/msrvtt_qa

``--anno_path`` holds ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` and ``train_ans2label.json`` as they
ship; ``--video_path`` holds ``{video_id}.mp4``; ``--frame_cache`` is the same HDF5 frame store retrieval
uses. Accuracy is reported overall and per answer type: ``accuracy`` counts questions whose answer is
outside the vocabulary as wrong (the honest number), ``accuracy_filtered`` drops them as the reference did
(``oov_count`` says how many). The run loop (resume, selection on val, checkpoints, eval-only runs,
``metrics.json``) is :mod:`emcl.train.runner`; this file supplies the model, data and evaluation.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from emcl import dist
from emcl.clip import build_clip, load_clip, tokenize
from emcl.data.annotations import QA_FILES, QASplit, load_ans2label, load_qa_split
from emcl.data.datasets import Skipped, VideoDataset, collate_skip
from emcl.data.loader import build_loader, rank_subset
from emcl.data.sources import SkipBudget, check_videos_exist, missing_videos
from emcl.data.video import VideoError
from emcl.errors import UserError, cli_main
from emcl.metrics import format_qa_table, qa_accuracy
from emcl.amp import autocast
from emcl.train.config import fraction, nonneg_float, positive_float, positive_int
from emcl.train.optim import build_optimizer as _build_optimizer
from emcl.train.optim import build_scheduler, param_groups
from emcl.train.runner import Task, run
from emcl.train.sources import prepare_synthetic, video_source

from .model import EMCLQA

log = logging.getLogger("emcl.qa")

EXTRA_KEYS = ("clip_config", "synthetic")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """EMCL-QA's flags (the common ones are the run loop's); the reference's names where they exist."""
    a = p.add_argument
    a("--max_words", type=positive_int, default=32)
    a("--max_frames", type=positive_int, default=12)
    a("--video_framerate", type=positive_float, default=1.0)
    a("--image_size", type=positive_int, default=224)
    a("--decode_backend", default="pyav", choices=("pyav", "opencv"))
    a("--clip_path", default="ViT-B/16", help="CLIP weights (file or name); ignored when clip_config is set")
    a("--temporal_layers", type=int, default=4, help="temporal blocks over the frames (0: none)")
    a("--proj_dim", type=positive_int, default=2048, help="width of each modality's projection")
    a("--hidden_dim", type=positive_int, default=8192, help="hidden width of the answer MLP")
    a("--dropout", type=fraction, default=0.1, help="dropout after the projections")
    a("--use_emcl", type=int, default=1, choices=(0, 1), help="EMCL before the contrastive loss")
    a("--centerK", type=positive_int, default=16)
    a("--stage_num", type=positive_int, default=5)
    a("--momentum", type=fraction, default=0.9)
    a("--lamd", type=positive_float, default=1.0)
    a("--beta", type=nonneg_float, default=1.0)
    a("--em_init", default="upstream", choices=("upstream", "gaussian", "linspace"))
    a("--nce_weight", type=nonneg_float, default=0.5, help="weight of the contrastive loss beside the CE")
    a(
        "--freeze_clip_embeddings",
        type=int,
        default=1,
        choices=(0, 1),
        help="freeze CLIP's token/positional embeddings, conv1, class embedding and ln_pre (the reference)",
    )
    a(
        "--optimizer",
        default="bertadam",
        choices=("bertadam", "adamw"),
        help="bertadam: the reference's Adam without bias correction and its warmup-cosine curve; "
        "adamw: torch AdamW with warmup-cosine",
    )
    a(
        "--per_tensor_clip",
        type=int,
        default=None,
        choices=(0, 1),
        help="also clip each tensor's gradient norm to 1, as the reference's BertAdam (default: on with "
        "--faithful only)",
    )
    a("--grad_checkpointing", action="store_true")


# ---------------------------------------------------------------------------------------------- data
def prepare_data(cfg: argparse.Namespace, info: dist.DistInfo) -> None:
    """Generate the synthetic QA set (and its frame cache) on first use when the config asks for it and no
    data was given on the command line."""
    prepare_synthetic(cfg, info, format="msrvtt_qa", default_out="data/synthetic_qa")
    if cfg.video_path is None and cfg.frame_cache is None:
        raise UserError("--video_path (or --frame_cache) is required")


def _user_error(fn, *args):
    """Parser errors (bad lines, missing files) as one-line user errors naming file and line."""
    try:
        return fn(*args)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from e


@lru_cache(maxsize=8)
def get_split(anno_path: str, split: str) -> QASplit:
    """One split's records, parsed once per process."""
    return _user_error(load_qa_split, anno_path, split)


@lru_cache(maxsize=2)
def get_vocab(anno_path: str) -> tuple[str, ...]:
    """The answers of ``train_ans2label.json`` ordered by id."""
    ans2label = _user_error(load_ans2label, anno_path)
    return tuple(sorted(ans2label, key=ans2label.__getitem__))


def ans2label(cfg: argparse.Namespace) -> dict[str, int]:
    return {a: i for i, a in enumerate(get_vocab(cfg.anno_path))}


@lru_cache(maxsize=8)
def get_tokens(anno_path: str, split: str, max_words: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every question of a split tokenised once per process."""
    qa = get_split(anno_path, split)
    try:
        return tokenize([r.question for r in qa.records], max_words)
    except ValueError as e:
        raise UserError(f"{qa.file}: {e}") from e


def has_dataset_split(cfg: argparse.Namespace, split: str) -> bool:
    """train and test always (a missing file is an error naming it); val when ``val.jsonl`` exists."""
    if split != "val":
        return True
    return cfg.anno_path is not None and (Path(cfg.anno_path) / QA_FILES["val"]).is_file()


class QATrainDataset(Dataset):
    """Training questions whose answer is in the vocabulary: tokens, label and the video's frames.

    Questions with an out-of-vocabulary answer cannot be learned by a classifier over the vocabulary: they
    are left out and counted (``num_oov``), not an error. An unreadable video raises, or with
    ``skip_bad_videos`` gives a :class:`Skipped` marker that the collate function drops and counts.
    """

    def __init__(self, cfg: argparse.Namespace) -> None:
        qa = get_split(cfg.anno_path, "train")
        vocab = ans2label(cfg)
        ids, mask = get_tokens(cfg.anno_path, "train", cfg.max_words)
        keep = [i for i, r in enumerate(qa.records) if r.answer in vocab]
        self.num_oov = len(qa.records) - len(keep)
        if self.num_oov:
            log.warning(
                "%s: %d of %d training questions have an answer outside %s; they are left out of training",
                qa.file,
                self.num_oov,
                len(qa.records),
                Path(cfg.anno_path) / "train_ans2label.json",
            )
        if not keep:
            raise UserError(f"{qa.file}: no training question has an answer in the vocabulary")
        self.split = qa
        self.index = torch.tensor(keep, dtype=torch.long)
        self.text_ids, self.text_mask = ids[self.index], mask[self.index]
        self.labels = torch.tensor([vocab[qa.records[i].answer] for i in keep], dtype=torch.long)
        self.source = video_source(cfg)
        self.skip_bad_videos = cfg.skip_bad_videos

    @property
    def num_videos(self) -> int:
        return len(self.split.video_ids)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict | Skipped:
        record = self.split.records[int(self.index[i])]
        try:
            frames, frame_mask = self.source.load(record.video_id)
        except VideoError as e:
            if not self.skip_bad_videos:
                raise
            log.warning("skipping question on line %d of %s: %s", record.line, self.split.file, e)
            return Skipped(record.video_id, str(e))
        return {
            "text_ids": self.text_ids[i],
            "text_mask": self.text_mask[i],
            "frames": frames,
            "frame_mask": frame_mask,
            "label": self.labels[i],
        }


def build_train_loader(cfg: argparse.Namespace, info: dist.DistInfo):
    """Per-rank loader over the in-vocabulary training questions (global batch split across ranks)."""
    ds = QATrainDataset(cfg)
    if len(ds) < cfg.batch_size:
        raise UserError(
            f"training set has {len(ds)} usable questions, fewer than --batch_size {cfg.batch_size}"
        )
    return build_loader(
        ds,
        batch_size=cfg.batch_size // info.world_size,
        shuffle=True,
        seed=cfg.seed,
        workers=cfg.workers,
        drop_last=True,
        collate_fn=collate_skip,
    )


def check_data(cfg: argparse.Namespace, splits: list[str]) -> None:
    """Before the first step: parse every split the run uses and the vocabulary, stat each video."""
    vocab = ans2label(cfg)
    source = video_source(cfg)
    for name in splits:
        qa = get_split(cfg.anno_path, name)
        oov = sum(r.answer not in vocab for r in qa.records)
        log.info(
            "%s: %d questions on %d videos, %d with an answer outside the %d-answer vocabulary",
            qa.file,
            len(qa.records),
            len(qa.video_ids),
            oov,
            len(vocab),
        )
        what = f"msrvtt_qa/{name}"
        if not cfg.skip_bad_videos:
            check_videos_exist(source, qa.video_ids, what)
            continue
        bad = missing_videos(source, qa.video_ids)
        if bad:
            log.warning(
                "%s: %d missing or empty video(s): their questions are skipped in training and count as "
                "wrong in evaluation: %s",
                what,
                len(bad),
                ", ".join(list(bad)[:20]),
            )
            SkipBudget(len(qa.video_ids), cfg.max_skip_fraction, what).add(bad)


# ---------------------------------------------------------------------------------------------- model
def build_model(cfg: argparse.Namespace) -> EMCLQA:
    """CLIP (from ``clip_config`` or pretrained ``clip_path``) plus the QA head over the vocabulary."""
    torch.manual_seed(cfg.seed)
    clip = build_clip(**cfg.clip_config) if cfg.clip_config else load_clip(cfg.clip_path)
    if cfg.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    model = EMCLQA(
        clip,
        answers=get_vocab(cfg.anno_path),
        temporal_layers=cfg.temporal_layers,
        proj_dim=cfg.proj_dim,
        hidden_dim=cfg.hidden_dim,
        dropout=cfg.dropout,
        use_emcl=bool(cfg.use_emcl),
        centerK=cfg.centerK,
        stage_num=cfg.stage_num,
        momentum=cfg.momentum,
        lamd=cfg.lamd,
        beta=cfg.beta,
        em_init=cfg.em_init,
        nce_weight=cfg.nce_weight,
        seed=cfg.seed,
    )
    if cfg.freeze_clip_embeddings:
        frozen = model.freeze_reference_parts()
        log.info("frozen as in the reference: %s", ", ".join(frozen))
    return model


def build_optimizer(model: EMCLQA, cfg: argparse.Namespace, total_steps: int, steps_per_epoch: int):
    """The reference's BertAdam (Adam without bias correction, its warmup-cosine curve) by default, or
    AdamW with warmup-cosine; CLIP learns at ``lr * coef_lr``."""
    groups = param_groups(model, cfg.lr, cfg.coef_lr, cfg.weight_decay, faithful=cfg.faithful)
    reference = cfg.optimizer == "bertadam"
    optimizer = _build_optimizer(groups, faithful=reference)
    curve = reference or cfg.faithful
    return optimizer, build_scheduler(optimizer, total_steps, cfg.warmup_proportion, faithful=curve)


def per_tensor_clip(cfg: argparse.Namespace) -> bool:
    return bool(cfg.faithful if cfg.per_tensor_clip is None else cfg.per_tensor_clip)


def clip_grad(model: EMCLQA, cfg: argparse.Namespace) -> torch.Tensor | None:
    """Global gradient-norm clip to ``max_grad_norm``; then, with the reference's per-tensor clip, each
    tensor's norm to 1 (which BertAdam does inside its step). Returns the global norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
    if per_tensor_clip(cfg):
        for p in params:
            torch.nn.utils.clip_grad_norm_(p, 1.0)
    return norm


def after_step(model: EMCLQA) -> None:
    model.clamp_logit_scale(100.0)


def train_step(ddp, model: EMCLQA, batch: dict, cfg: argparse.Namespace, info: dist.DistInfo) -> torch.Tensor:
    """Answer CE + nce_weight * InfoNCE after EMCL on the features gathered once across ranks.

    The CE is the local batch's mean (DDP's average of the gradients is the global batch's gradient); the
    returned value is the global batch's loss (the local CE's value replaced by its mean over ranks, the
    gradient untouched), so the logged loss does not depend on the number of processes. ``--faithful``:
    the reference's CE on the whole gathered batch on every rank, with its 1/W-scaled encoder gradients.
    """
    device = info.device
    gather = gather_labels = None
    if info.world_size > 1:

        def gather(x: torch.Tensor) -> torch.Tensor:  # with skipped videos the ranks' batches differ
            return dist.all_gather_with_grad(x, reduce_grads=not cfg.faithful, variable=cfg.skip_bad_videos)

        gather_labels = dist.gather_tensors_no_grad
    loss, ce, _ = ddp(
        batch["text_ids"].to(device, non_blocking=True),
        batch["text_mask"].to(device, non_blocking=True),
        batch["frames"].to(device, non_blocking=True),
        batch["frame_mask"].to(device, non_blocking=True),
        batch["label"].to(device, non_blocking=True),
        gather=gather,
        gather_labels=gather_labels,
        ce_on_gathered=cfg.faithful,
    )
    if info.world_size > 1 and not cfg.faithful:
        n = torch.tensor([float(batch["label"].shape[0])], device=device)
        weighted = dist.reduce_mean(torch.cat([ce.reshape(1) * n, n]))  # sizes differ with skipped videos
        loss = loss + (weighted[0] / weighted[1] - ce)
    return loss


# ------------------------------------------------------------------------------------------ evaluation
def _cat(parts: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
    return torch.cat(parts) if parts else empty


class _Questions(Dataset):
    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, video: list[int]) -> None:
        self.ids, self.mask, self.video = ids, mask, torch.tensor(video, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.video)

    def __getitem__(self, i: int) -> dict:
        return {"text_ids": self.ids[i], "text_mask": self.mask[i], "video_index": self.video[i], "index": i}


@lru_cache(maxsize=2)
def majority_answer(anno_path: str) -> tuple[str, int]:
    """The most frequent in-vocabulary training answer (ties: alphabetical) and how often it occurs."""
    vocab = set(get_vocab(anno_path))
    counts = Counter(r.answer for r in get_split(anno_path, "train").records if r.answer in vocab)
    answer, n = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return answer, n


@torch.no_grad()
def evaluate(model: EMCLQA, split: str, cfg: argparse.Namespace, info: dist.DistInfo) -> dict[str, Any]:
    """Accuracy on ``split``: each video encoded once, then every question; no EMCL in the answer logits.

    A question on a video that could not be read (only with ``--skip_bad_videos``) counts as wrong.
    """
    model.eval()
    start = time.perf_counter()
    device = info.device
    qa = get_split(cfg.anno_path, split)
    vocab = ans2label(cfg)
    if tuple(model.answers) != get_vocab(cfg.anno_path):
        raise UserError(
            f"the model's {len(model.answers)}-answer vocabulary differs from "
            f"{Path(cfg.anno_path) / 'train_ans2label.json'} ({len(vocab)} answers)"
        )
    video_ds = VideoDataset(qa, video_source(cfg), skip_bad_videos=cfg.skip_bad_videos)
    loader = build_loader(
        rank_subset(video_ds, info.rank, info.world_size),
        batch_size=cfg.batch_size_val,
        shuffle=False,
        seed=cfg.seed,
        workers=cfg.workers,
        distributed=False,
    )
    feats, v_idx, valid = [], [], []
    for b in loader:
        with autocast(device, cfg.precision):
            f = model.encode_video(b["frames"].to(device, non_blocking=True), b["frame_mask"].to(device))
        feats.append(f.float())
        v_idx.append(b["video_index"].to(device))
        valid.append(b["valid"].to(device))
    dim = model.video_proj[0].out_features
    nv = len(qa.video_ids)
    no_index = torch.empty(0, dtype=torch.long, device=device)
    vi = dist.gather_tensors_no_grad(_cat(v_idx, no_index))
    video = dist.gather_in_order(_cat(feats, torch.empty(0, dim, device=device)), vi, nv)
    ok = dist.gather_in_order(_cat(valid, torch.empty(0, dtype=torch.bool, device=device)), vi, nv)

    ids, mask = get_tokens(cfg.anno_path, split, cfg.max_words)
    q_loader = build_loader(
        rank_subset(_Questions(ids, mask, qa.record_video), info.rank, info.world_size),
        batch_size=cfg.batch_size_val,
        shuffle=False,
        seed=cfg.seed,
        workers=0,
        distributed=False,
    )
    preds, q_idx = [], []
    for b in q_loader:
        vid = b["video_index"].to(device)
        with autocast(device, cfg.precision):
            q = model.encode_question(b["text_ids"].to(device), b["text_mask"].to(device))
            logits = model.answer_logits(video[vid].to(q.dtype), q)
        pred = logits.float().argmax(dim=-1)
        preds.append(torch.where(ok[vid], pred, torch.full_like(pred, -1)))  # unreadable video: wrong
        q_idx.append(b["index"].to(device))
    n = len(qa.records)
    qi = dist.gather_tensors_no_grad(_cat(q_idx, no_index))
    pred_all = dist.gather_in_order(_cat(preds, no_index), qi, n, fill=-1)

    answers = [r.answer for r in qa.records]
    types = [r.answer_type for r in qa.records]
    results = qa_accuracy(pred_all.cpu(), answers, types, vocab)
    major, _ = majority_answer(cfg.anno_path)
    base = qa_accuracy([vocab[major]] * n, answers, types, vocab)
    bad = [qa.video_ids[i] for i in (~ok).nonzero().flatten().tolist()]
    if bad:
        log.warning("%s: %d unreadable video(s); their questions count as wrong: %s", qa.file, len(bad),
                    ", ".join(bad[:20]))
        SkipBudget(nv, cfg.max_skip_fraction, f"msrvtt_qa/{split}").add(bad)
    results.update(
        majority_baseline={
            "answer": major,
            "accuracy": base["accuracy"],
            "accuracy_filtered": base["accuracy_filtered"],
        },
        num_videos=nv,
        num_skipped_videos=len(bad),
        seconds=round(time.perf_counter() - start, 2),
    )
    return results


def format_results(res: dict[str, Any]) -> str:
    base = res.get("majority_baseline", {})
    lines = [format_qa_table(res)]
    lines.append(
        "accuracy counts out-of-vocabulary answers as wrong; filtered drops them (the reference); "
        f"majority answer '{base.get('answer')}': {base.get('accuracy', 0):.2f}"
    )
    return "\n".join(lines)


def select_key(results: dict) -> tuple[float, float]:
    """Selection on the honest accuracy, then the filtered one."""
    return results["accuracy"], results["accuracy_filtered"] or 0.0


def compile_targets(model: EMCLQA) -> list[torch.nn.Module]:
    """Compiled in place, so module trees and checkpoint keys stay as they are."""
    return [model.clip.visual, model.clip.transformer]


ARCH_KEYS = ("clip_config", "clip_path", "temporal_layers", "proj_dim", "hidden_dim", "use_emcl", "centerK")
SCORE_KEYS = ("max_words", "max_frames", "video_framerate", "image_size")
EXPERIMENT_KEYS = (
    "max_words",
    "max_frames",
    "video_framerate",
    "image_size",
    "dropout",
    "stage_num",
    "momentum",
    "lamd",
    "beta",
    "em_init",
    "nce_weight",
    "freeze_clip_embeddings",
    "optimizer",
    "per_tensor_clip",
)

TASK = Task(
    name="qa",
    module=__name__ if __name__ != "__main__" else "video_question_answering.main_task_qa",
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
    clip_grad=clip_grad,
    compile_targets=compile_targets,
    extra_config_keys=EXTRA_KEYS,
    arch_keys=ARCH_KEYS,
    score_keys=SCORE_KEYS,
    experiment_keys=EXPERIMENT_KEYS,
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train and/or evaluate EMCL-QA; see the module docstring."""
    return run(TASK, argv, description=__doc__)


if __name__ == "__main__":
    cli_main(main)
