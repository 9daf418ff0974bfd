"""EMCL-Net training and evaluation (SPEC §2), one process or many under torchrun.

    python -m video_retrieval.emcl_net.main_task_retrieval --config configs/synthetic.yaml \
        --output_dir runs/demo
    torchrun --nproc_per_node=8 -m video_retrieval.emcl_net.main_task_retrieval --config configs/msrvtt.yaml \
        --anno_path data/msrvtt/anno --video_path data/msrvtt/videos --output_dir runs/msrvtt

Outputs in ``--output_dir``: ``config.yaml``, ``train.log``, ``metrics.json``, ``checkpoint_last.pt``
(every epoch) and ``checkpoint_best.pt`` (the selected model).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset
from tqdm import tqdm

from emcl import dist
from emcl.clip import build_clip, load_clip
from emcl.data.datasets import (
    RetrievalSplit,
    TextDataset,
    TrainDataset,
    VideoDataset,
    collate_skip,
    has_split,
    load_split,
)
from emcl.data.loader import build_loader, set_epoch
from emcl.data.video import VideoSource
from emcl.fileio import save_json, save_torch, save_yaml
from emcl.metrics import evaluate_similarity, format_table
from emcl.scoring import score_matrix
from emcl.train.amp import autocast
from emcl.train.checkpoint import load_checkpoint
from emcl.train.config import parse_args
from emcl.train.logs import setup_logging
from emcl.train.optim import build_optimizer, build_scheduler, param_groups

from .model import EMCLNet, emcl_scores

log = logging.getLogger("emcl.retrieval")

DATATYPES = ("msrvtt", "msvd", "lsmdc", "activitynet", "didemo")
EXTRA_KEYS = ("clip_config", "synthetic")


def build_parser() -> argparse.ArgumentParser:
    """All flags; the reference's names where they exist."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--config", default=None, help="YAML file of option defaults; flags given here override it")
    a("--do_train", type=int, default=0)
    a("--do_eval", type=int, default=0)
    a("--datatype", default="msrvtt", choices=DATATYPES)
    a("--anno_path", default=None, help="folder of the dataset's annotation files")
    a("--video_path", default=None, help="folder of the videos")
    a("--frame_cache", default=None, help="HDF5 frame store from scripts/cache_frames.py")
    a("--cache_in_memory", type=int, default=0, help="hold the whole frame cache in RAM (per worker)")
    a("--msrvtt_train", default="9k", choices=("9k", "7k", "full"))
    a("--msrvtt_test", default="1k", choices=("1k", "full"))
    a("--max_words", type=int, default=32)
    a("--max_frames", type=int, default=12)
    a("--video_framerate", type=float, default=1.0)
    a("--image_size", type=int, default=224)
    a("--decode_backend", default="pyav", choices=("pyav", "opencv"))
    a("--augment", type=int, default=0, help="RandAugment (4 ops, magnitude 7) on training clips")
    a("--skip_bad_videos", action="store_true", help="log, count and skip unreadable videos")
    a("--batch_size", type=int, default=128, help="global training batch, split across ranks")
    a("--batch_size_val", type=int, default=64, help="per-rank batch for feature extraction")
    a("--epochs", type=int, default=5)
    a("--max_steps", type=int, default=0, help="stop training after this many steps (0: all epochs)")
    a("--lr", type=float, default=1e-4)
    a("--coef_lr", type=float, default=1e-3, help="backbone lr = lr * coef_lr")
    a("--weight_decay", type=float, default=0.2)
    a("--warmup_proportion", type=float, default=0.1)
    a("--max_grad_norm", type=float, default=1.0)
    a("--agg_module", default="seqTransf", choices=("seqTransf", "seqLSTM", "None"))
    a("--agg_layers", type=int, default=4)
    a("--temp", type=float, default=3.0)
    a("--use_emcl", type=int, default=1)
    a("--centerK", type=int, default=32)
    a("--stage_num", type=int, default=9)
    a("--momentum", type=float, default=0.9)
    a("--lamd", type=float, default=1.0)
    a("--beta", type=float, default=3.0)
    a("--em_init", default="upstream", choices=("upstream", "gaussian", "linspace"))
    a("--clip_path", default="ViT-B/32", help="CLIP weights (file or name); ignored when clip_config is set")
    a("--init_model", default=None, help="EMCL-Net checkpoint to start from or to evaluate")
    a("--resume", action="store_true", help="continue from output_dir/checkpoint_last.pt")
    a("--output_dir", default="runs/emcl")
    a("--seed", type=int, default=42)
    a("--workers", type=int, default=4)
    a("--device", default=None, choices=("cpu", "cuda"))
    a("--precision", default="auto", choices=("auto", "bf16", "fp32"), help="auto: bf16 autocast on CUDA")
    a("--eval_split", default="test", choices=("val", "test"), help="split of the final evaluation")
    a(
        "--eval_block",
        default="query",
        choices=("paper", "query", "none"),
        help="paper: EM per 32x32 block as the reference; query: EM per text over all videos; none: no EM",
    )
    a("--eval_block_size", type=int, default=32)
    a(
        "--select_on_test",
        action="store_true",
        help="select the epoch on the test split, as the reference did (results are labelled as such)",
    )
    a(
        "--faithful",
        action="store_true",
        help="reference optimisation: Adam without bias correction, frozen CLIP, its decay groups, 1/W grads",
    )
    a("--grad_checkpointing", action="store_true")
    a("--compile", action="store_true", help="torch.compile the encoders")
    a("--n_display", type=int, default=50, help="log every n steps")
    a("--_kill_after_epoch", type=int, default=0, help=argparse.SUPPRESS)  # tests: die like a killed job
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags over ``--config``; checks that need several options at once."""
    cfg = parse_args(build_parser(), argv, EXTRA_KEYS)
    if not (cfg.do_train or cfg.do_eval):
        raise SystemExit("nothing to do: pass --do_train 1 and/or --do_eval 1")
    if cfg.do_eval and not cfg.do_train and not cfg.init_model:
        raise SystemExit("--do_eval 1 without training needs --init_model CHECKPOINT")
    return cfg


# ---------------------------------------------------------------------------------------------- model
def build_model(cfg: argparse.Namespace) -> EMCLNet:
    """CLIP (from ``clip_config`` or pretrained ``clip_path``) plus the EMCL-Net head."""
    torch.manual_seed(cfg.seed)
    if cfg.clip_config:
        clip = build_clip(**cfg.clip_config)
    else:
        clip = load_clip(cfg.clip_path)
    if cfg.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    return EMCLNet(
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


# ----------------------------------------------------------------------------------------------- data
def prepare_data(cfg: argparse.Namespace, info: dist.DistInfo) -> None:
    """Generate the synthetic dataset (and its frame cache) on first use when the config asks for it
    and no data was given on the command line."""
    if cfg.anno_path is not None or not cfg.synthetic:
        if cfg.anno_path is None:
            raise SystemExit("--anno_path is required (or use a config with a synthetic dataset)")
        return
    from emcl.data.cache import build_cache
    from emcl.data.synthetic import make_synthetic

    syn = dict(cfg.synthetic)
    out = Path(syn.pop("out", "data/synthetic"))
    use_cache = syn.pop("frame_cache", False) and cfg.frame_cache is None
    cache = out / f"frames_{cfg.max_frames}x{cfg.video_framerate:g}fps_{cfg.image_size}px.h5"
    if info.is_main:
        make_synthetic(out, format=cfg.datatype, **syn)
        if use_cache:
            build_cache(
                out / "videos",
                cache,
                max_frames=cfg.max_frames,
                framerate=cfg.video_framerate,
                size=cfg.image_size,
                workers=min(2, cfg.workers),
                backend=cfg.decode_backend,
            )
    dist.barrier()
    cfg.anno_path = str(out / "annotations")
    cfg.video_path = str(out / "videos")
    if use_cache:
        cfg.frame_cache = str(cache)


def video_source(cfg: argparse.Namespace) -> VideoSource:
    return VideoSource(
        cfg.video_path,
        framerate=cfg.video_framerate,
        max_frames=cfg.max_frames,
        size=cfg.image_size,
        backend=cfg.decode_backend,
        frame_cache=cfg.frame_cache,
        any_extension=cfg.datatype == "msvd",
        cache_in_memory=bool(cfg.cache_in_memory),
    )


def split_options(cfg: argparse.Namespace) -> dict[str, Any]:
    return (
        {"msrvtt_train": cfg.msrvtt_train, "msrvtt_test": cfg.msrvtt_test} if cfg.datatype == "msrvtt" else {}
    )


def has_val(cfg: argparse.Namespace) -> bool:
    """Whether the dataset, under these options, has a validation split (for model selection)."""
    return has_split(cfg.datatype, "val", cfg.anno_path, **split_options(cfg))


def get_split(cfg: argparse.Namespace, split: str) -> RetrievalSplit:
    return load_split(cfg.datatype, cfg.anno_path, split, **split_options(cfg))


# ------------------------------------------------------------------------------------------ evaluation
def _rank_subset(dataset, info: dist.DistInfo):
    """Indices rank::W of an evaluation set, no padding; items carry their index for reassembly."""
    return Subset(dataset, list(range(info.rank, len(dataset), info.world_size)))


@torch.no_grad()
def extract_features(model: EMCLNet, split: RetrievalSplit, cfg, info: dist.DistInfo):
    """Text features (A, D), frame features (V, T, D), frame masks and video validity, on every rank."""
    device = info.device
    text_loader = build_loader(
        _rank_subset(TextDataset(split, cfg.max_words), info),
        batch_size=cfg.batch_size_val,
        shuffle=False,
        seed=cfg.seed,
        workers=0,
        distributed=False,
    )
    video_ds = VideoDataset(split, video_source(cfg), skip_bad_videos=cfg.skip_bad_videos)
    video_loader = build_loader(
        _rank_subset(video_ds, info),
        batch_size=cfg.batch_size_val,
        shuffle=False,
        seed=cfg.seed,
        workers=cfg.workers,
        distributed=False,
    )
    t_parts, t_idx = [], []
    for b in text_loader:
        with autocast(device, cfg.precision):
            t_parts.append(model.encode_text(b["text_ids"].to(device), b["text_mask"].to(device)).float())
        t_idx.append(b["caption_index"].to(device))
    f_parts, m_parts, v_idx, valid = [], [], [], []
    bar = tqdm(video_loader, desc=f"features {split.split}", disable=not info.is_main, leave=False)
    for b in bar:
        frames = b["frames"].to(device, non_blocking=True)
        mask = b["frame_mask"].to(device, non_blocking=True)
        with autocast(device, cfg.precision):
            f_parts.append(model.encode_video(frames, mask).float())
        m_parts.append(mask)
        v_idx.append(b["video_index"].to(device))
        valid.append(b["valid"].to(device))
    d, n_frames = model.clip.embed_dim, cfg.max_frames

    def cat(parts, shape, dtype):
        return torch.cat(parts) if parts else torch.empty(shape, dtype=dtype, device=device)

    def assemble(x: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
        """Every rank's rows put back in dataset order (``idx``: the gathered dataset indices)."""
        x = dist.gather_tensors_no_grad(x)
        out = x.new_zeros((n, *x.shape[1:]))
        out[idx] = x
        return out

    a, v = len(split.captions), len(split.video_ids)
    ti = dist.gather_tensors_no_grad(cat(t_idx, (0,), torch.long))
    vi = dist.gather_tensors_no_grad(cat(v_idx, (0,), torch.long))
    t = assemble(cat(t_parts, (0, d), torch.float32), ti, a)
    f = assemble(cat(f_parts, (0, n_frames, d), torch.float32), vi, v)
    m = assemble(cat(m_parts, (0, n_frames), torch.long), vi, v)
    ok = assemble(cat(valid, (0,), torch.bool), vi, v)
    return t, f, m, ok


@torch.no_grad()
def evaluate(model: EMCLNet, split: RetrievalSplit, cfg, info: dist.DistInfo) -> dict[str, Any]:
    """Cache features once, build the full score matrix on the device (rows shared by ranks), metrics."""
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
        keep_v = ok.nonzero().flatten()
        new_index = torch.full_like(ok, -1, dtype=torch.long)
        new_index[keep_v] = torch.arange(len(keep_v), device=t.device)
        keep_t = ok[caption_video]
        t, caption_video = t[keep_t], new_index[caption_video[keep_t]]
        f, m = f[keep_v], m[keep_v]
    emcl = model.emcl if cfg.eval_block != "none" else None

    def score_fn(tb, fb, mb):  # float32, autocast off (emcl_scores and score_matrix see to it)
        return emcl_scores(tb, fb, mb, emcl, model.temp)

    rows = score_matrix(
        score_fn,
        t,
        f,
        m,
        mode=cfg.eval_block,
        block=cfg.eval_block_size,
        rank=info.rank,
        world_size=info.world_size,
    )
    sim = dist.gather_tensors_no_grad(rows)
    results = evaluate_similarity(sim, caption_video)
    results.update(
        eval_block=cfg.eval_block,
        num_texts=int(sim.shape[0]),
        num_videos=int(sim.shape[1]),
        num_skipped_videos=num_bad,
        seconds=round(time.perf_counter() - start, 2),
    )
    return results


# -------------------------------------------------------------------------------------------- training
def unwrap(model) -> EMCLNet:
    return model.module if isinstance(model, DistributedDataParallel) else model


def checkpoint_state(model, optimizer, scheduler, epoch: int, step: int, best: dict, cfg) -> dict[str, Any]:
    return {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "step": step,
        "best": best,
        "config": config_dict(cfg),
    }


def config_dict(cfg: argparse.Namespace) -> dict[str, Any]:
    return dict(vars(cfg))


def _group_lr(optimizer, prefix: str) -> float | None:
    """Current learning rate of the first parameter group whose name starts with ``prefix``."""
    return next((g["lr"] for g in optimizer.param_groups if str(g.get("name", "")).startswith(prefix)), None)


def select_key(results: dict) -> tuple[float, float, float]:
    """Model selection on text-to-video R@1, then R@5 and R@10 as tie-breakers."""
    r = results["t2v"]
    return r["R1"], r["R5"], r["R10"]


def train(cfg: argparse.Namespace, model: EMCLNet, info: dist.DistInfo, out: Path) -> dict[str, Any]:
    """Train for ``epochs``, checkpoint every epoch, select on val (or test with --select_on_test)."""
    device = info.device
    if cfg.batch_size % info.world_size:
        raise SystemExit(f"--batch_size {cfg.batch_size} is not divisible by the {info.world_size} processes")
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
        raise SystemExit(
            f"training set has {len(train_ds)} captions, fewer than --batch_size {cfg.batch_size}"
        )
    loader = build_loader(
        train_ds,
        batch_size=per_rank,
        shuffle=True,
        seed=cfg.seed,
        workers=cfg.workers,
        drop_last=True,
        collate_fn=collate_skip,
        epoch_keys=True,  # augmentation seeded by (seed, epoch, index): identical after --resume
    )
    steps_per_epoch = len(loader)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    if cfg.faithful:  # the reference's fp16 CLIP (logit_scale included) at lr 1e-7 does not move: freeze it
        model.clip.requires_grad_(False)
    groups = param_groups(model, cfg.lr, cfg.coef_lr, cfg.weight_decay, faithful=cfg.faithful)
    optimizer = build_optimizer(groups, faithful=cfg.faithful)
    scheduler = build_scheduler(optimizer, total_steps, cfg.warmup_proportion, faithful=cfg.faithful)

    start_epoch, step, best = 0, 0, {}
    last = out / "checkpoint_last.pt"
    if cfg.resume and last.is_file():
        ck = load_checkpoint(last, map_location=device)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        start_epoch, step, best = ck["epoch"], ck["step"], ck["best"]
        log.info("resumed from %s at epoch %d, step %d", last, start_epoch, step)
    elif cfg.resume:
        log.info("--resume: no %s yet, starting from scratch", last)

    if cfg.compile:  # in place: module tree and checkpoint keys stay as they are
        model.clip.visual.compile()
        model.clip.transformer.compile()
    ddp = model
    if info.world_size > 1:
        ddp = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True
        )
    gather = None
    if info.world_size > 1:

        def gather(x):  # noqa: E306 - closure over the reduce mode
            if not x.is_floating_point():
                return dist.gather_tensors_no_grad(x)
            # with skipped videos the ranks' batches can differ in length
            return dist.all_gather_with_grad(x, reduce_grads=not cfg.faithful, variable=cfg.skip_bad_videos)

    select_split = "test" if cfg.select_on_test else ("val" if has_val(cfg) else None)
    select_data = get_split(cfg, select_split) if select_split else None
    history = best.get("history", [])
    skipped_all: set[str] = set(best.get("skipped_ids", []))
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.max_steps and step >= cfg.max_steps:
            break
        model.train()
        set_epoch(loader, epoch)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not info.is_main)
        t0, seen, skipped, loss_sum = time.perf_counter(), 0, 0, torch.zeros((), device=device)
        skipped_ids: set[str] = set()
        n_steps = 0
        for batch in bar:
            skipped += batch["num_skipped"]
            skipped_ids.update(batch["skipped_ids"])
            if "text_ids" not in batch:  # every clip of this batch was unreadable
                if info.world_size > 1:
                    raise RuntimeError(
                        f"rank {info.rank}: every clip of a batch was unreadable: "
                        f"{', '.join(batch['skipped_ids'])}"
                    )
                continue
            ids = batch["text_ids"].to(device, non_blocking=True)
            tmask = batch["text_mask"].to(device, non_blocking=True)
            frames = batch["frames"].to(device, non_blocking=True)
            fmask = batch["frame_mask"].to(device, non_blocking=True)
            with autocast(device, cfg.precision):
                loss = ddp(ids, tmask, frames, fmask, gather=gather)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            model.clamp_logit_scale(100.0)
            step += 1
            n_steps += 1
            seen += ids.shape[0] * info.world_size
            loss_sum += loss.detach()
            if step % cfg.n_display == 0 or step == total_steps:
                rate = seen / (time.perf_counter() - t0)
                eta = (total_steps - step) * cfg.batch_size / max(rate, 1e-9)
                mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
                msg = dict(
                    loss=f"{loss.item():.4f}",
                    lr=f"{scheduler.get_last_lr()[-1]:.2e}",
                    clips_s=f"{rate:.1f}",
                    eta=f"{eta / 60:.1f}m",
                    mem_gb=f"{mem:.1f}",
                )
                bar.set_postfix(msg)
                log.info(
                    "epoch %d step %d/%d %s",
                    epoch + 1,
                    step,
                    total_steps,
                    " ".join(f"{k}={v}" for k, v in msg.items()),
                )
            if cfg.max_steps and step >= cfg.max_steps:
                break
        if info.world_size > 1:  # every rank skipped its own samples
            skipped = sum(dist.all_gather_object_list(skipped))
            skipped_ids = set().union(*dist.all_gather_object_list(sorted(skipped_ids)))
        skipped_all |= skipped_ids
        epoch_loss = float(loss_sum / max(1, n_steps))
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": step,
            "loss": epoch_loss,
            # learning rates at the end of the epoch: the new parameters' and the backbone's
            "lr": _group_lr(optimizer, "new"),
            "lr_backbone": _group_lr(optimizer, "backbone"),
            "skipped_videos": len(skipped_ids),
            "skipped_samples": skipped,
        }
        if skipped:
            log.warning(
                "epoch %d: skipped %d sample(s) of %d unreadable video(s): %s",
                epoch + 1,
                skipped,
                len(skipped_ids),
                ", ".join(sorted(skipped_ids)[:20]),
            )
        if select_data is not None:
            res = evaluate(model, select_data, cfg, info)
            record[select_split] = res
            log.info("epoch %d %s:\n%s", epoch + 1, select_split, format_table(res))
            if not best.get("results") or select_key(res) > select_key(best["results"]):
                best.update(results=res, epoch=epoch + 1)
                if info.is_main:
                    save_torch(
                        {**checkpoint_state(model, optimizer, scheduler, epoch + 1, step, best, cfg)},
                        out / "checkpoint_best.pt",
                    )
        history.append(record)
        best.update(history=history, skipped_ids=sorted(skipped_all))
        if info.is_main:
            save_torch(checkpoint_state(model, optimizer, scheduler, epoch + 1, step, best, cfg), last)
            save_json(
                {"train": {"history": history, "skipped_videos": len(skipped_all)}}, out / "metrics.json"
            )
        log.info("epoch %d done: loss %.4f (%.0f s)", epoch + 1, epoch_loss, time.perf_counter() - t0)
        if cfg._kill_after_epoch == epoch + 1:
            os.kill(os.getpid(), signal.SIGKILL)
        dist.barrier()
    if select_data is None and info.is_main:  # no selection split: the last epoch is the model
        import shutil

        shutil.copyfile(last, out / "checkpoint_best.pt")
    dist.barrier()
    return {
        "history": history,
        "skipped_videos": len(skipped_all),
        "skipped_video_ids": sorted(skipped_all),
        "selected_epoch": best.get("epoch"),
        "selected_on": select_split or "last_epoch",
    }


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse(argv)
    info = dist.init_distributed(cfg.device)
    out = Path(cfg.output_dir)
    setup_logging(out, info.rank)
    dist.seed_everything(cfg.seed, info.rank)
    prepare_data(cfg, info)
    if cfg.eval_split == "val" and not has_val(cfg):
        raise SystemExit(f"--eval_split val: {cfg.datatype} has no validation split under these options")
    if info.is_main:
        save_yaml(config_dict(cfg), out / "config.yaml")
    log.info("device %s, %d process(es); output %s", info.device, info.world_size, out)

    model = build_model(cfg)
    if cfg.init_model:
        ck = load_checkpoint(cfg.init_model)
        model.load_state_dict(ck["model"] if "model" in ck else ck)
        log.info("loaded %s", cfg.init_model)
    model.to(info.device)

    metrics: dict[str, Any] = {}
    if cfg.do_train:
        metrics["train"] = train(cfg, model, info, out)
        best = load_checkpoint(out / "checkpoint_best.pt", map_location=info.device)
        model.load_state_dict(best["model"])  # evaluate exactly the weights that were saved
        metrics["train"]["evaluated_checkpoint"] = "checkpoint_best.pt"
    splits = [cfg.eval_split]
    if cfg.eval_split == "test" and has_val(cfg) and not cfg.do_train and cfg.do_eval:
        splits = ["val", "test"]
    for split in splits:
        res = evaluate(model, get_split(cfg, split), cfg, info)
        if cfg.select_on_test and cfg.do_train:
            res["selected_on_test"] = True
        metrics[split] = res
        log.info(
            "%s results (%s, eval_block=%s, %d texts x %d videos):\n%s",
            split,
            cfg.datatype,
            res["eval_block"],
            res["num_texts"],
            res["num_videos"],
            format_table(res),
        )
    if info.is_main:
        save_json(metrics, out / "metrics.json")
        log.info("metrics written to %s", out / "metrics.json")
    dist.cleanup()
    return metrics


if __name__ == "__main__":
    main()
