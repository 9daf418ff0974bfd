"""EMCL as a joint training module: MMT on expert features, with or without EMCL (docs/reference.md,
'Joint training (MMT)').

    python -m video_retrieval.joint_training.main_task_joint --config configs/mmt_synthetic.yaml \
        --output_dir runs/mmt_demo
    python -m video_retrieval.joint_training.main_task_joint --config configs/mmt_msrvtt.yaml \
        --anno_path data/MSRVTT --features data/MSRVTT/experts.h5 --bert_path models/bert-base-cased \
        --output_dir runs/mmt_msrvtt

``--anno_path`` holds the split lists, ``--features`` the expert store (one consolidated HDF5 file from
``scripts/consolidate_experts.py``, or the published folder of per-video files), ``--bert_path`` a local
BERT folder (config, weights, vocab.txt). Evaluation reports both modes, labelled: ``paper`` (EM per
block of 32 matched pairs in list order, as the reference: transductive) and ``query`` (EM per query over
[all videos; that query]: no query sees another's positive).
"""

from __future__ import annotations

import argparse
import logging
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from emcl import dist
from emcl.amp import autocast
from emcl.data.annotations import RetrievalSplit
from emcl.data.expert_datasets import (
    CaptionDataset,
    ExpertTrainDataset,
    ExpertVideoDataset,
    collate_experts,
    load_tokenizer,
)
from emcl.data.experts import EXPERT_DIMS, MMT_DATATYPES, ExpertStore, consolidate_experts, load_expert_split
from emcl.data.loader import build_loader, rank_subset
from emcl.errors import UserError, cli_main
from emcl.loss import hinge_topk
from emcl.metrics import format_table, t2v_metrics, v2t_metrics
from emcl.scoring import EVAL_POLICIES, embedding_score_matrix
from emcl.train.runner import Task, run

from .mmt import MMT, pair_scores

log = logging.getLogger("emcl.joint")

EXTRA_KEYS = ("synthetic",)
ARCH_KEYS = (
    "experts",
    "same_dim",
    "vid_layers",
    "vid_heads",
    "vid_intermediate",
    "max_position",
    "use_emcl",
    "centerK",
    "normalize_experts",
)
SCORE_KEYS = (
    "stage_num",
    "lamd",
    "beta",
    "eval_block",
    "eval_block_size",
    "max_words",
    "max_tokens",
    "datatype",
    "faithful",
)
EXPERIMENT_KEYS = (
    "datatype",
    "features",
    "experts",
    "iters_per_epoch",
    "gamma",
    "margin",
    "topk",
    "momentum",
    "em_init",
    "max_words",
    "max_tokens",
)


def parse_experts(value) -> dict[str, int]:
    """``s3d:1024,vggish:128`` (or a YAML mapping; a bare name takes the reference's dimension)."""
    if isinstance(value, dict):
        items = list(value.items())
    else:
        items = []
        for part in str(value).split(","):
            name, _, dim = part.strip().partition(":")
            items.append((name, dim or EXPERT_DIMS.get(name)))
    out = {}
    for name, dim in items:
        if dim is None:
            raise UserError(
                f"--experts: expert '{name}' needs a dimension (name:dim); known defaults: "
                f"{', '.join(f'{k}:{v}' for k, v in EXPERT_DIMS.items())}"
            )
        out[str(name)] = int(dim)
    if not out:
        raise UserError("--experts: no expert given")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--datatype", default="msrvtt", choices=MMT_DATATYPES)
    a(
        "--features",
        default=None,
        help="expert store: a consolidated .h5 (scripts/consolidate_experts.py) or the per-video folder",
    )
    a(
        "--features_in_memory",
        type=int,
        default=0,
        choices=(0, 1),
        help="read the consolidated store into RAM",
    )
    a("--experts", default="face,ocr,rgb,s3d,scene,speech,vggish", help="name[:dim],... in modality order")
    a(
        "--bert_path",
        default=None,
        help="local BERT folder (config.json, weights, vocab.txt); nothing is downloaded",
    )
    a("--max_words", type=int, default=30, help="text tokens, [CLS] and [SEP] included")
    a("--max_tokens", type=int, default=30, help="temporal feature tokens per expert")
    a("--same_dim", type=int, default=512)
    a("--vid_layers", type=int, default=4)
    a("--vid_heads", type=int, default=4)
    a("--vid_intermediate", type=int, default=3072)
    a("--max_position", type=int, default=32, help="position embeddings of the video encoder (seconds + 2)")
    a("--dropout", type=float, default=0.1)
    a(
        "--normalize_experts",
        default="auto",
        choices=("auto", "0", "1"),
        help="L2-normalise each modality's embeddings; auto: on exactly when EMCL is off (MMT's baseline)",
    )
    a("--use_emcl", type=int, default=1, choices=(0, 1))
    a("--centerK", type=int, default=64)
    a("--stage_num", type=int, default=5)
    a("--momentum", type=float, default=0.9)
    a("--lamd", type=float, default=1.0)
    a("--beta", type=float, default=3.0)
    a("--em_init", default="upstream", choices=("upstream", "gaussian", "linspace"))
    a("--margin", type=float, default=0.05)
    a("--topk", type=int, default=1, help="hardest negatives per row and column in the hinge loss")
    a("--gamma", type=float, default=0.95, help="StepLR factor per epoch")
    a(
        "--iters_per_epoch",
        type=int,
        default=1000,
        help="training steps per epoch (0: one pass over the videos)",
    )
    a(
        "--eval_block",
        default="paper",
        choices=EVAL_POLICIES,
        help="headline policy (all are reported): paper: EM per 32 matched pairs as the reference; "
        "query: EM per query over [all videos; that query]; none: no EM",
    )
    a("--eval_block_size", type=int, default=32)


def _normalize(cfg: argparse.Namespace) -> bool:
    return bool(cfg.normalize_experts == "1" or (cfg.normalize_experts == "auto" and not cfg.use_emcl))


# ---------------------------------------------------------------------------------------------- model
def build_model(cfg: argparse.Namespace) -> MMT:
    """Text BERT from ``--bert_path`` (local files only) plus the MMT heads."""
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    if not cfg.bert_path or not Path(cfg.bert_path).is_dir():
        raise UserError(
            f"--bert_path {cfg.bert_path!r}: a local BERT folder (config.json, weights, vocab.txt) "
            "is needed; nothing is downloaded"
        )
    torch.manual_seed(cfg.seed)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # the unused pooler's "unexpected keys" report is noise here
    bert = BertModel.from_pretrained(
        cfg.bert_path,
        local_files_only=True,
        add_pooling_layer=False,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
    )
    return MMT(
        bert,
        parse_experts(cfg.experts),
        same_dim=cfg.same_dim,
        layers=cfg.vid_layers,
        heads=cfg.vid_heads,
        intermediate=cfg.vid_intermediate,
        max_position=cfg.max_position,
        dropout=cfg.dropout,
        normalize_experts=_normalize(cfg),
        use_emcl=bool(cfg.use_emcl),
        centerK=cfg.centerK,
        stage_num=cfg.stage_num,
        momentum=cfg.momentum,
        lamd=cfg.lamd,
        beta=cfg.beta,
        em_init=cfg.em_init,
        seed=cfg.seed,
    )


# ----------------------------------------------------------------------------------------------- data
def prepare_data(cfg: argparse.Namespace, info: dist.DistInfo) -> None:
    """With a ``synthetic`` config and no ``--anno_path``: write the synthetic experts (per-video files),
    consolidate them into one store and point the run at it. Otherwise default ``--features``."""
    if cfg.anno_path is None and cfg.synthetic:
        from emcl.data.synthetic_experts import make_synthetic_experts

        syn = dict(cfg.synthetic)
        out = Path(syn.pop("out", "data/synthetic_experts"))
        store = out / "experts.h5"
        if info.is_main:
            paths = make_synthetic_experts(out, **syn)
            done = out / "done.json"
            if not store.is_file() or store.stat().st_mtime < done.stat().st_mtime:
                consolidate_experts(paths["features"], store, parse_experts(cfg.experts))
        dist.barrier()
        cfg.anno_path = str(out)
        cfg.features = cfg.features or str(store)
        cfg.bert_path = cfg.bert_path or str(out / "bert")
        return
    if cfg.anno_path is None:
        raise UserError("--anno_path (the folder of split lists) is required, or use a synthetic config")
    if cfg.features is None:
        root = Path(cfg.anno_path)
        cands = [
            root / "experts.h5",
            root.parent / "vid_feat_files" / "mult_h5",
            root / "vid_feat_files" / "mult_h5",
        ]
        found = next((c for c in cands if c.exists()), None)
        if found is None:
            raise UserError(f"--features not given and none of {', '.join(map(str, cands))} exists")
        cfg.features = str(found)


@lru_cache(maxsize=4)
def _store(features: str, experts: tuple, in_memory: bool) -> ExpertStore:
    return ExpertStore(features, dict(experts), in_memory=in_memory)


def get_store(cfg: argparse.Namespace) -> ExpertStore:
    return _store(str(cfg.features), tuple(parse_experts(cfg.experts).items()), bool(cfg.features_in_memory))


@lru_cache(maxsize=8)
def _split(datatype: str, anno_path: str, split: str, features: str, experts: tuple, in_memory: bool):
    return load_expert_split(datatype, anno_path, split, _store(features, experts, in_memory))


def get_split(cfg: argparse.Namespace, split: str) -> RetrievalSplit:
    return _split(
        cfg.datatype,
        str(cfg.anno_path),
        split,
        str(cfg.features),
        tuple(parse_experts(cfg.experts).items()),
        bool(cfg.features_in_memory),
    )


def has_dataset_split(cfg: argparse.Namespace, split: str) -> bool:
    """The reference trains on the whole training list and evaluates on the test list: no val split."""
    return split in ("train", "test")


def missing_report(cfg: argparse.Namespace, split: RetrievalSplit) -> dict[str, dict[str, int]]:
    """Per expert, the videos of ``split`` without it, by reason (absent / empty / nan)."""
    return get_store(cfg).missing_counts(split.video_ids)


def check_data(cfg: argparse.Namespace, splits: list[str]) -> None:
    """Parse every split the run uses; log the missing experts of each."""
    for s in splits:
        sp = get_split(cfg, s)
        counts = missing_report(cfg, sp)
        msg = ", ".join(
            f"{e} {sum(c.values())} ({', '.join(f'{k} {v}' for k, v in c.items() if v)})"
            for e, c in counts.items()
            if sum(c.values())
        )
        log.info(
            "%s/%s: %d videos, %d captions; missing experts (kept at their text weight, as the "
            "reference): %s",
            cfg.datatype,
            s,
            sp.num_videos,
            sp.num_captions,
            msg or "none",
        )


def _tokenizer(cfg: argparse.Namespace):
    return load_tokenizer(cfg.bert_path, bool(cfg.faithful))


def build_train_loader(cfg: argparse.Namespace, info: dist.DistInfo):
    split = get_split(cfg, "train")
    per_rank = cfg.batch_size // info.world_size
    length = cfg.iters_per_epoch * cfg.batch_size if cfg.iters_per_epoch else len(split.video_ids)
    ds = ExpertTrainDataset(
        split,
        get_store(cfg),
        _tokenizer(cfg),
        cfg.max_words,
        cfg.max_tokens,
        bool(cfg.faithful),
        cfg.seed,
        length=length,
    )
    ds.num_videos = split.num_videos
    return build_loader(
        ds,
        batch_size=per_rank,
        shuffle=True,
        seed=cfg.seed,
        workers=cfg.workers,
        drop_last=True,
        collate_fn=collate_experts,
        epoch_keys=True,
    )


def _to(experts: dict, device: torch.device) -> dict:
    return {e: {k: v.to(device, non_blocking=True) for k, v in d.items()} for e, d in experts.items()}


# ------------------------------------------------------------------------------------------ training
def train_step(ddp, model: MMT, batch: dict, cfg: argparse.Namespace, info: dist.DistInfo) -> torch.Tensor:
    """Hinge loss over the top-k negatives of the batch similarity (gathered over ranks)."""
    dev = info.device
    gather = None
    if info.world_size > 1:

        def gather(x):  # noqa: E306
            return dist.all_gather_with_grad(x)

    sim = ddp(
        batch["text_ids"].to(dev), batch["text_mask"].to(dev), _to(batch["experts"], dev), gather=gather
    )
    return hinge_topk(sim, cfg.margin, cfg.topk)


def build_optimizer(model: MMT, cfg: argparse.Namespace, total_steps: int, steps_per_epoch: int):
    """Adam on every parameter (BERT included), StepLR per epoch as a per-step LambdaLR."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gamma = cfg.gamma
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: gamma ** (s // steps_per_epoch))
    return opt, sched


def compile_targets(model: MMT) -> list[torch.nn.Module]:
    return [model.text_encoder, model.video_encoder]


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def embed_split(model: MMT, split: RetrievalSplit, cfg, info: dist.DistInfo):
    """Text embeddings (A, M, D), modality weights (A, M) and video embeddings (V, M, D) on every rank."""
    dev = info.device
    kw = dict(shuffle=False, seed=cfg.seed, distributed=False, collate_fn=collate_experts)
    texts = build_loader(
        rank_subset(
            CaptionDataset(split, _tokenizer(cfg), cfg.max_words, bool(cfg.faithful)),
            info.rank,
            info.world_size,
        ),
        batch_size=cfg.batch_size_val,
        workers=0,
        **kw,
    )
    videos = build_loader(
        rank_subset(ExpertVideoDataset(split, get_store(cfg), cfg.max_tokens), info.rank, info.world_size),
        batch_size=cfg.batch_size_val,
        workers=cfg.workers,
        **kw,
    )
    t_parts, w_parts, t_idx, v_parts, v_idx = [], [], [], [], []
    for b in texts:
        with autocast(dev, cfg.precision):
            t, w = model.encode_text(b["text_ids"].to(dev), b["text_mask"].to(dev))
        t_parts.append(t.float())
        w_parts.append(w.float())
        t_idx.append(b["caption_index"].to(dev))
    for b in videos:
        with autocast(dev, cfg.precision):
            v_parts.append(model.encode_video(_to(b["experts"], dev)).float())
        v_idx.append(b["video_index"].to(dev))
    a, v = split.num_captions, split.num_videos
    ti = dist.gather_tensors_no_grad(torch.cat(t_idx))  # each index list gathered once
    vi = dist.gather_tensors_no_grad(torch.cat(v_idx))
    return (
        dist.gather_in_order(torch.cat(t_parts), ti, a),
        dist.gather_in_order(torch.cat(w_parts), ti, a),
        dist.gather_in_order(torch.cat(v_parts), vi, v),
    )


@torch.no_grad()
def evaluate(model: MMT, split_name: str, cfg, info: dist.DistInfo) -> dict[str, Any]:
    """Embed the split once, then score it under every policy (``paper``, ``query``, ``none``).

    The headline rows (``t2v``, ``v2t``) follow ``--eval_block``; every policy is kept under ``policies``.
    A model without EMCL is scored once, under ``none``.
    """
    model.eval()
    start = time.perf_counter()
    split = get_split(cfg, split_name)
    t, w, v = embed_split(model, split, cfg, info)
    caption_video = torch.tensor(split.caption_video, device=t.device)
    policies: dict[str, Any] = {}
    for policy in EVAL_POLICIES if model.emcl is not None else ("none",):
        if policy == "paper" and split.multi_caption:
            log.warning(
                "%s/%s: several captions per video: the paper policy (matched pairs) is skipped",
                cfg.datatype,
                split_name,
            )
            continue
        rows = embedding_score_matrix(
            model.em_transform,
            lambda tt, vv, ww: pair_scores(tt, ww, vv),
            t,
            v,
            extra=w,
            mode=policy,
            block=cfg.eval_block_size,
            rank=info.rank,
            world_size=info.world_size,
        )
        sim = dist.gather_tensors_no_grad(rows)
        # tied ranks averaged, as the reference's MMT evaluation
        policies[policy] = {
            "t2v": t2v_metrics(sim, caption_video, ties="average"),
            "v2t": v2t_metrics(sim, caption_video, ties="average"),
        }
    headline = cfg.eval_block if cfg.eval_block in policies else next(iter(policies))
    results: dict[str, Any] = dict(policies[headline])
    results.update(
        eval_block=headline,
        policies=policies,
        num_texts=split.num_captions,
        num_videos=split.num_videos,
        missing_experts=missing_report(cfg, split),
        seconds=round(time.perf_counter() - start, 2),
    )
    return results


def format_results(res: dict[str, Any]) -> str:
    """The headline table, then every policy labelled."""
    lines = [f"headline policy: {res['eval_block']} ({res['num_texts']} texts x {res['num_videos']} videos)"]
    lines.append(format_table({k: res[k] for k in ("t2v", "v2t")}))
    lines.append(
        format_table({f"{p} {d}": row for p, rows in res["policies"].items() for d, row in rows.items()})
    )
    lines.append(
        "paper: EM per 32 matched pairs in list order (transductive, as the reference); "
        "query: EM per query over all videos; none: no EM"
    )
    missing = {e: sum(c.values()) for e, c in res["missing_experts"].items() if sum(c.values())}
    if missing:
        lines.append("videos missing an expert: " + ", ".join(f"{e} {n}" for e, n in missing.items()))
    return "\n".join(lines)


def select_key(results: dict) -> tuple[float, float, float]:
    """Text-to-video R@1, then R@5 and R@10, of the headline policy."""
    r = results["t2v"]
    return r["R1"], r["R5"], r["R10"]


TASK = Task(
    name="joint",
    module=__name__ if __name__ != "__main__" else "video_retrieval.joint_training.main_task_joint",
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
    compile_targets=compile_targets,
    extra_config_keys=EXTRA_KEYS,
    arch_keys=ARCH_KEYS,
    score_keys=SCORE_KEYS,
    experiment_keys=EXPERIMENT_KEYS,
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(TASK, argv, description=__doc__)


if __name__ == "__main__":
    cli_main(main)
