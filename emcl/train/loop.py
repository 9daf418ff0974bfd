"""The training loop of :func:`emcl.train.runner.run`: epochs, steps, the non-finite guard, skipped
videos, selection on a split, ``checkpoint_last.pt`` / ``checkpoint_best.pt`` and exact resume.

The task supplies the loader, the optimiser, one step's loss and the evaluation; this module does the
rest, the same for every task.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from emcl import dist
from emcl.amp import autocast
from emcl.errors import UserError
from emcl.fileio import save_json, save_torch
from emcl.progress import bar as progress_bar
from emcl.train.checkpoint import check_checkpoint_task, load_checkpoint, random_states, restore_random_states
from emcl.train.finite import check_finite_steps, check_finite_weights
from emcl.train.settings import check_settings, config_dict, saved_config
from emcl.train.sources import check_skip_fraction
from emcl.train.task import Task

log = logging.getLogger("emcl.run")


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def checkpoint_state(model, optimizer, scheduler, epoch: int, step: int, best: dict, cfg,
                     rng: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """What a checkpoint holds: the weights, optimiser and schedule, where training stands, the selection
    state, the settings, the task's name and (``checkpoint_last.pt``) every rank's random states."""
    return {
        "task": getattr(cfg, "task", None),
        "rng": rng,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "step": step,
        "best": best,
        "config": config_dict(cfg),
    }



def _head_lr(optimizer) -> float:
    """The learning rate of the new parameters (the group named ``new*``; else the first group), not the
    backbone's ``lr * coef_lr``, for logs and curves."""
    groups = optimizer.param_groups
    return float(next((g["lr"] for g in groups if str(g.get("name", "")).startswith("new")), groups[0]["lr"]))


class _TensorBoard:
    """Optional TensorBoard scalars on rank 0 (``--tensorboard``)."""

    def __init__(self, out: Path, enabled: bool) -> None:
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
            self.writer = SummaryWriter(str(out / "tensorboard"))

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def load_resume_checkpoint(
    task: Task, cfg: argparse.Namespace, info: dist.DistInfo, out: Path
) -> dict | None:
    """``--resume``: ``checkpoint_last.pt`` with its saved settings checked against this run's (before
    anything is written into the folder); None when there is nothing to resume."""
    last = out / "checkpoint_last.pt"
    if not (cfg.do_train and cfg.resume and last.is_file()):
        return None
    ck = load_checkpoint(last, map_location=info.device)
    check_checkpoint_task(ck, last, task.name, "--resume:")
    saved = saved_config(ck, last)
    if saved is not None:
        check_settings(
            saved,
            config_dict(cfg),
            must_match=(*task.arch_keys(), *task.experiment_keys()),
            may_change=("epochs", "max_steps", "workers", "n_display", "batch_size_val", "eval_split"),
            source=f"checkpoint {last}",
            action="--resume continues a run with its own settings: use them, or another --output_dir",
        )
    return ck


@dataclass
class _Training:
    """What one training run carries from epoch to epoch (:func:`_setup_training` builds it)."""

    loader: Any
    optimizer: Any
    scheduler: Any
    ddp: nn.Module  # the model, wrapped in DistributedDataParallel when there are several processes
    total_steps: int
    num_train_videos: int
    select_split: str | None  # None: no selection split, the last epoch is the model
    tb: _TensorBoard
    last: Path  # checkpoint_last.pt
    start_epoch: int
    step: int
    best: dict
    history: list
    skipped_all: set[str]
    resumed_from: str | None


@dataclass
class _Epoch:
    """One epoch's counts on this rank (summed over the ranks by :func:`_close_epoch`)."""

    index: int  # 0-based
    t0: float
    loss_sum: torch.Tensor
    first_bad: torch.Tensor  # the first step with a non-finite loss or gradient norm, -1 while none
    seen: int = 0
    skipped: int = 0
    skipped_ids: set[str] = field(default_factory=set)
    n_steps: int = 0


def train(
    task: Task,
    cfg: argparse.Namespace,
    model: nn.Module,
    info: dist.DistInfo,
    out: Path,
    resume_ck: dict | None = None,
) -> dict:
    """Train for ``epochs``, checkpoint every epoch, select on val (or test with --select_on_test).

    ``resume_ck``: the checked ``checkpoint_last.pt`` (:func:`load_resume_checkpoint`) to continue from."""
    tr = _setup_training(task, cfg, model, info, out, resume_ck)
    for epoch in range(tr.start_epoch, cfg.epochs):
        if cfg.max_steps and tr.step >= cfg.max_steps:
            break
        ep = _train_epoch(task, cfg, model, info, tr, epoch)
        _close_epoch(cfg, model, info, tr, ep)
        _end_epoch(task, cfg, model, info, out, tr, ep)
    tr.tb.close()
    dist.barrier()
    evaluated = "checkpoint_best.pt" if tr.select_split is not None else "checkpoint_last.pt"
    return {
        "history": tr.history,
        "skipped_videos": len(tr.skipped_all),
        "skipped_video_ids": sorted(tr.skipped_all),
        "selected_epoch": tr.best.get("epoch"),
        "selected_on": tr.select_split or "last_epoch",
        "evaluated_checkpoint": evaluated,
        "resumed_from": tr.resumed_from,
    }


def _setup_training(
    task: Task,
    cfg: argparse.Namespace,
    model: nn.Module,
    info: dist.DistInfo,
    out: Path,
    resume_ck: dict | None,
) -> _Training:
    """The training loader, optimiser and schedule, the state of the run resumed, DDP and TensorBoard."""
    device = info.device
    if cfg.batch_size % info.world_size:
        raise UserError(f"--batch_size {cfg.batch_size} is not divisible by the {info.world_size} processes")
    loader = task.loader("train")
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise UserError("the training loader yields no batch: fewer training samples than --batch_size?")
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    optimizer, scheduler = task.build_optimizer(model, total_steps, steps_per_epoch)
    start_epoch, step, best, resumed_from = _resume_training(
        task, cfg, model, info, out, optimizer, scheduler, resume_ck
    )
    ddp = model
    if info.world_size > 1:
        ddp = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True
        )
    return _Training(
        loader=loader,
        optimizer=optimizer,
        scheduler=scheduler,
        ddp=ddp,
        total_steps=total_steps,
        num_train_videos=getattr(loader.dataset, "num_videos", 0),
        select_split="test" if cfg.select_on_test else ("val" if task.has_split("val") else None),
        tb=_TensorBoard(out, cfg.tensorboard and info.is_main),
        last=out / "checkpoint_last.pt",
        start_epoch=start_epoch,
        step=step,
        best=best,
        history=best.get("history", []),
        skipped_all=set(best.get("skipped_ids", [])),
        resumed_from=resumed_from,
    )


def _resume_training(
    task: Task,
    cfg: argparse.Namespace,
    model: nn.Module,
    info: dist.DistInfo,
    out: Path,
    optimizer: Any,
    scheduler: Any,
    resume_ck: dict | None,
) -> tuple[int, int, dict, str | None]:
    """``--resume``: weights, optimiser and schedule from ``checkpoint_last.pt``; returns the epoch and step
    to continue from, the selection state and the checkpoint's path (0, 0, {}, None for a fresh run)."""
    last = out / "checkpoint_last.pt"
    if cfg.resume and last.is_file():
        ck = resume_ck if resume_ck is not None else load_resume_checkpoint(task, cfg, info, out)
        unwrap(model).load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        _restore_rng(ck.get("rng"), info, last)
        log.info("resumed from %s at epoch %d, step %d", last, ck["epoch"], ck["step"])
        return ck["epoch"], ck["step"], ck["best"], str(last)
    if cfg.resume:
        log.warning("--resume: no %s yet, starting from scratch", last)
    return 0, 0, {}, None


def _restore_rng(states: list[dict[str, Any]] | None, info: dist.DistInfo, last: Path) -> None:
    """This rank's random states as the checkpoint saved them, so the next epoch's dropout draws what an
    uninterrupted run draws. A checkpoint without them, or of another number of processes, only warns."""
    if states is None:
        log.warning("%s holds no random states: the resumed run draws other dropout masks", last)
    elif len(states) != info.world_size:
        log.warning("%s was written by %d process(es), not %d: random states not restored", last,
                    len(states), info.world_size)
    else:
        restore_random_states(states[info.rank])


def _train_epoch(
    task: Task, cfg: argparse.Namespace, model: nn.Module, info: dist.DistInfo, tr: _Training, epoch: int
) -> _Epoch:
    """One pass over the training loader on this rank: skipped videos counted, steps taken, the progress
    bar and the log lines every ``--n_display`` steps; stops at ``--max_steps``."""
    from emcl.data.loader import set_epoch

    device = info.device
    check_every_step = device.type != "cuda"  # a host sync per step is free on the CPU
    model.train()
    set_epoch(tr.loader, epoch)
    bar = progress_bar(tr.loader, show=info.is_main, desc=f"epoch {epoch + 1}/{cfg.epochs}")
    ep = _Epoch(
        index=epoch,
        t0=time.perf_counter(),
        loss_sum=torch.zeros((), device=device),
        first_bad=torch.full((), -1, dtype=torch.long, device=device),
    )
    for batch in bar:
        ep.skipped += batch.get("num_skipped", 0)
        if batch.get("skipped_ids"):  # stop as soon as this rank alone has seen too many
            ep.skipped_ids.update(batch["skipped_ids"])
            check_skip_fraction(ep.skipped_ids, tr.num_train_videos, "train", cfg)
        if batch.get("empty"):  # every clip of this batch was unreadable
            if info.world_size > 1:
                raise UserError(
                    f"rank {info.rank}: every clip of a batch was unreadable: "
                    f"{', '.join(batch.get('skipped_ids', ()))}"
                )
            continue
        loss = _train_step(task, cfg, model, info, tr, ep, batch, check_every_step)
        if tr.step % cfg.n_display == 0 or tr.step == tr.total_steps:
            _log_progress(cfg, info, tr, ep, bar, loss)
        if cfg.max_steps and tr.step >= cfg.max_steps:
            break
    return ep


def _train_step(
    task: Task,
    cfg: argparse.Namespace,
    model: nn.Module,
    info: dist.DistInfo,
    tr: _Training,
    ep: _Epoch,
    batch: dict,
    check_now: bool,
) -> torch.Tensor:
    """One optimisation step on ``batch``; a non-finite loss or gradient norm is recorded in ``ep`` (and
    raised at once when ``check_now``). Returns the loss."""
    with autocast(info.device, cfg.precision):
        loss = task.step(tr.ddp, batch)
    tr.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = task.clip_grad(model)
    finite = torch.isfinite(loss.detach())
    if norm is not None:
        finite = finite & torch.isfinite(norm)
    ep.first_bad = torch.where((ep.first_bad < 0) & ~finite, tr.step + 1, ep.first_bad)
    if check_now:
        check_finite_steps(ep.first_bad, ep.index, cfg)
    tr.optimizer.step()
    tr.scheduler.step()
    task.after_step(model)
    tr.step += 1
    ep.n_steps += 1
    ep.seen += int(batch.get("batch_size", 0)) * info.world_size
    ep.loss_sum += loss.detach().float()
    return loss


def _log_progress(
    cfg: argparse.Namespace, info: dist.DistInfo, tr: _Training, ep: _Epoch, bar: Any, loss: torch.Tensor
) -> None:
    """The ``--n_display`` line: progress bar, log and TensorBoard, after the non-finite check."""
    check_finite_steps(ep.first_bad, ep.index, cfg)
    rate = ep.seen / (time.perf_counter() - ep.t0)
    eta = (tr.total_steps - tr.step) * cfg.batch_size / max(rate, 1e-9)
    mem = torch.cuda.max_memory_allocated() / 2**30 if info.device.type == "cuda" else 0.0
    lr_now = _head_lr(tr.optimizer)
    msg = dict(
        loss=f"{loss.item():.4f}",
        lr=f"{lr_now:.2e}",
        clips_s=f"{rate:.1f}",
        eta=f"{eta / 60:.1f}m",
        mem_gb=f"{mem:.1f}",
    )
    bar.set_postfix(msg)
    log.info(
        "epoch %d step %d/%d %s",
        ep.index + 1,
        tr.step,
        tr.total_steps,
        " ".join(f"{k}={v}" for k, v in msg.items()),
    )
    tr.tb.scalar("train/loss", loss.item(), tr.step)
    tr.tb.scalar("train/lr", lr_now, tr.step)


def _close_epoch(cfg: argparse.Namespace, model: nn.Module, info: dist.DistInfo, tr: _Training,
                 ep: _Epoch) -> None:
    """The epoch's non-finite checks (steps and weights), its counts summed over the ranks, and the
    skipped videos reported (and held against ``--max_skip_fraction``)."""
    check_finite_steps(ep.first_bad, ep.index, cfg)
    check_finite_weights(unwrap(model), ep.index, tr.step, cfg)  # e.g. an update that overflowed
    if info.world_size > 1:  # every rank skipped its own samples
        ep.skipped = sum(dist.all_gather_object_list(ep.skipped))
        ep.skipped_ids = set().union(*dist.all_gather_object_list(sorted(ep.skipped_ids)))
        ep.n_steps = min(dist.all_gather_object_list(ep.n_steps))
    if ep.n_steps == 0:
        raise UserError(
            f"epoch {ep.index + 1} took no training step: every batch was skipped "
            f"({len(ep.skipped_ids)} unreadable video(s): {', '.join(sorted(ep.skipped_ids)[:10])})"
        )
    tr.skipped_all |= ep.skipped_ids
    if ep.skipped:
        log.warning(
            "epoch %d: skipped %d sample(s) of %d unreadable video(s): %s",
            ep.index + 1,
            ep.skipped,
            len(ep.skipped_ids),
            ", ".join(sorted(ep.skipped_ids)[:20]),
        )
        check_skip_fraction(ep.skipped_ids, tr.num_train_videos, "train", cfg)


def _end_epoch(task: Task, cfg: argparse.Namespace, model: nn.Module, info: dist.DistInfo, out: Path,
               tr: _Training, ep: _Epoch) -> None:
    """The epoch's record in the history, the selection on its split, ``checkpoint_last.pt`` and the
    unfinished ``metrics.json`` (rank 0)."""
    epoch = ep.index
    epoch_loss = float(ep.loss_sum / ep.n_steps)
    record: dict[str, Any] = {
        "epoch": epoch + 1,
        "step": tr.step,
        "loss": epoch_loss,
        "lr": _head_lr(tr.optimizer),
        "seconds": round(time.perf_counter() - ep.t0, 2),
        "skipped_videos": len(ep.skipped_ids),
        "skipped_samples": ep.skipped,
    }
    _select_epoch(task, cfg, model, info, out, tr, epoch, record)
    tr.history.append(record)
    tr.best.update(history=tr.history, skipped_ids=sorted(tr.skipped_all))
    rng = dist.all_gather_object_list(random_states())  # every rank's, in rank order
    if info.is_main:
        state = checkpoint_state(model, tr.optimizer, tr.scheduler, epoch + 1, tr.step, tr.best, cfg, rng)
        save_torch(state, tr.last)
        progress = {
            "finished": False,
            "train": {"history": tr.history, "skipped_videos": len(tr.skipped_all)},
            "resumed_from": tr.resumed_from,
        }
        save_json(progress, out / "metrics.json")
    log.info("epoch %d done: loss %.4f (%.0f s)", epoch + 1, epoch_loss, time.perf_counter() - ep.t0)
    dist.barrier()


def _select_epoch(task: Task, cfg: argparse.Namespace, model: nn.Module, info: dist.DistInfo, out: Path,
                  tr: _Training, epoch: int, record: dict[str, Any]) -> None:
    """Evaluate the selection split into ``record``; a better epoch becomes ``checkpoint_best.pt``. Without
    a selection split the last epoch is the model."""
    if tr.select_split is None:
        tr.best.update(epoch=epoch + 1)  # no selection split: the last epoch is the model
        return
    res = task.evaluate(model, tr.select_split)
    record[tr.select_split] = res
    log.info("epoch %d %s:\n%s", epoch + 1, tr.select_split, task.format_results(res))
    key = task.select_key(res)
    tr.tb.scalar(f"{tr.select_split}/select_key", float(key[0]), epoch + 1)
    if not tr.best.get("results") or key > task.select_key(tr.best["results"]):
        tr.best.update(results=res, epoch=epoch + 1)
        if info.is_main:
            state = checkpoint_state(model, tr.optimizer, tr.scheduler, epoch + 1, tr.step, tr.best, cfg)
            save_torch(state, out / "checkpoint_best.pt")


