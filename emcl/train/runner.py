"""The one run loop every trainer shares (EMCL-Net, EMCL-QA, joint training).

A task is a :class:`~emcl.train.task.Task` subclass: its flags, model, training loader, one training
step, the evaluation of a split and the key that ranks two evaluations. :func:`run` does the rest, once
for every task:

- flags over ``--config`` (the task's shared groups and its own), torchrun setup, seeding;
- the output folder: one run per folder (a lock held for the whole run), no silent reuse of a finished
  run (``--resume`` continues, ``--overwrite`` starts again);
- checkpoints compared with the current settings before anything is loaded (``--init_model``,
  ``--resume``); eval-only runs take the settings that define the scores from the checkpoint;
- every split the run will use parsed and its videos checked before the first step;
- the epoch loop: progress bar, log lines, skipped-video counting, a non-finite guard, optional
  TensorBoard; checkpoints every epoch, selection on a split, resume;
- the final evaluation, ``metrics.json`` (strict JSON, atomic) and the task's report (training curves).

An eval-only task (the inference module) gets the same flags, lock, logging, cleanup and
``metrics.json`` around its one evaluation.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from emcl import dist
from emcl.amp import autocast
from emcl.errors import UserError
from emcl.fileio import save_json, save_torch, save_yaml
from emcl.train.checkpoint import load_checkpoint
from emcl.train.config import parse_args
from emcl.train.finite import check_finite_steps, check_finite_weights
from emcl.train.lock import RunLock
from emcl.train.logs import setup_logging
from emcl.train.outdir import RESULT_FILES, check_output_dir
from emcl.train.settings import check_settings, setting_diffs, state_dict_mismatch
from emcl.train.task import EvalOnlyTask, Task

__all__ = ["Task", "build_parser", "check_skip_fraction", "explicit_flags", "parse", "prepare_output", "run"]

log = logging.getLogger("emcl.run")


def build_parser(task: type[Task], description: str | None = None) -> argparse.ArgumentParser:
    """The task's flags (shared groups and its own); abbreviations are refused (``--lam`` is not
    ``--lamd``)."""
    p = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    task.add_arguments(p)
    return p


def explicit_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The options given on the command line (not from ``--config`` nor defaults)."""
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kw: dict[str, Any] = {"dest": action.dest, "default": argparse.SUPPRESS}
            if action.nargs == 0:
                kw["action"] = "store_const"
                kw["const"] = True
            else:
                kw["nargs"] = action.nargs
            probe.add_argument(*action.option_strings, **kw)
    known, _ = probe.parse_known_args(list(argv))
    return set(vars(known))


def parse(
    task: type[Task], argv: Sequence[str] | None = None, description: str | None = None
) -> argparse.Namespace:
    """Flags over ``--config``; ``cfg._explicit`` holds the names given on the command line.

    An explicit ``--do_eval 1`` without an explicit ``--do_train`` means evaluation only, as users of the
    reference expect, whatever the config file says.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(task, description)
    cfg = parse_args(parser, argv, task.config_blocks)
    cfg._explicit = explicit_flags(parser, argv)
    cfg.task = task.name
    cfg.task_module = task.module
    if not task.trains:
        if not cfg.output_dir:
            raise UserError("--output_dir is required (on the command line or in the config file)")
        task.check_flags(cfg)
        return cfg
    if "do_eval" in cfg._explicit and cfg.do_eval and "do_train" not in cfg._explicit:
        cfg.do_train = 0
    if not (cfg.do_train or cfg.do_eval):
        raise UserError("nothing to do: pass --do_train 1 and/or --do_eval 1")
    if cfg.do_eval and not cfg.do_train and not cfg.init_model:
        raise UserError("--do_eval 1 without training needs --init_model CHECKPOINT")
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume and --overwrite contradict each other: pass one")
    task.check_flags(cfg)
    return cfg


def config_dict(cfg: argparse.Namespace) -> dict[str, Any]:
    """The run's settings as saved in ``config.yaml`` and checkpoints (private keys left out)."""
    return {k: v for k, v in vars(cfg).items() if not k.startswith("_")}


# ----------------------------------------------------------------------------------------- checkpoints
def unwrap(model: nn.Module) -> nn.Module:
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


def _saved_config(ck: dict, path: str | Path) -> dict[str, Any] | None:
    saved = ck.get("config") if isinstance(ck, dict) else None
    if saved is None:
        log.warning("%s holds no saved config: its settings cannot be checked against this run's", path)
    return saved


def apply_checkpoint_settings(
    task: type[Task], cfg: argparse.Namespace, saved: dict[str, Any], path: str
) -> None:
    """Eval-only runs: the settings that define the weights and the scores come from the checkpoint.

    A weight-defining setting given explicitly with another value is an error (the weights cannot be
    loaded into that model); a score setting given explicitly wins, with a warning naming it.
    """
    explicit = cfg._explicit
    arch_conflicts = []
    arch_keys = task.arch_keys()
    for key in dict.fromkeys((*arch_keys, *task.score_keys())):
        if key not in saved:
            continue
        old, new = saved[key], getattr(cfg, key, None)
        if setting_diffs({key: old}, {key: new}, [key]) == []:
            continue
        if key in explicit:
            if key in arch_keys:
                arch_conflicts.append(f"{key}: {old!r} in the checkpoint, {new!r} given")
            else:
                log.warning(
                    "%s: %s=%r given explicitly; the checkpoint was trained with %r", path, key, new, old
                )
        else:
            log.info("%s: %s=%r taken from the checkpoint (the config says %r)", path, key, old, new)
            setattr(cfg, key, old)
    if arch_conflicts:
        raise UserError(f"{path} cannot be evaluated with these settings: " + "; ".join(arch_conflicts))


# ---------------------------------------------------------------------------------------------- helpers
def _all_ranks(fn: Callable[[], Any], info: dist.DistInfo, rank0_only: bool = False) -> Any:
    """Run ``fn`` (on rank 0 only if asked); a UserError on any rank is raised on every rank."""
    err, out = None, None
    try:
        if not rank0_only or info.is_main:
            out = fn()
    except UserError as e:
        err = str(e)
    if info.world_size > 1:
        errs = [e for e in dist.all_gather_object_list(err) if e]
        err = errs[0] if errs else None
    if err:
        raise UserError(err)
    return out


def _splits_used(task: Task, cfg: argparse.Namespace) -> list[str]:
    splits = []
    if cfg.do_train:
        splits.append("train")
        if cfg.select_on_test:
            splits.append("test")
        elif task.has_split("val"):
            splits.append("val")
    splits.append(cfg.eval_split)
    if cfg.do_eval and not cfg.do_train and cfg.eval_split == "test" and task.has_split("val"):
        splits.append("val")
    return list(dict.fromkeys(splits))


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


def check_skip_fraction(skipped_ids: set[str] | list[str], total: int, what: str, cfg) -> None:
    """Stop once more than ``--max_skip_fraction`` of a split's videos proved unreadable (the rule and the
    message are :class:`emcl.data.sources.SkipBudget`'s)."""
    if total:
        from emcl.data.sources import SkipBudget

        SkipBudget(total, cfg.max_skip_fraction, what).add(sorted(skipped_ids))


# ------------------------------------------------------------------------------------------- training
def load_resume_checkpoint(
    task: Task, cfg: argparse.Namespace, info: dist.DistInfo, out: Path
) -> dict | None:
    """``--resume``: ``checkpoint_last.pt`` with its saved settings checked against this run's (before
    anything is written into the folder); None when there is nothing to resume."""
    last = out / "checkpoint_last.pt"
    if not (cfg.do_train and cfg.resume and last.is_file()):
        return None
    ck = load_checkpoint(last, map_location=info.device)
    saved = _saved_config(ck, last)
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
        log.info("resumed from %s at epoch %d, step %d", last, ck["epoch"], ck["step"])
        return ck["epoch"], ck["step"], ck["best"], str(last)
    if cfg.resume:
        log.warning("--resume: no %s yet, starting from scratch", last)
    return 0, 0, {}, None


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
    bar = tqdm(tr.loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not info.is_main)
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
    if info.is_main:
        state = checkpoint_state(model, tr.optimizer, tr.scheduler, epoch + 1, tr.step, tr.best, cfg)
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


# ------------------------------------------------------------------------------------------------- run
def prepare_output(out: Path, info: dist.DistInfo, *, resume: bool, overwrite: bool,
                   result_patterns: Sequence[str] = RESULT_FILES,
                   resumable: bool = True) -> RunLock | None:
    """Rank 0 takes the output folder's lock, then checks the folder (another run's results are refused
    unless ``--resume`` or ``--overwrite``); an error reaches every rank. Every tool that writes results
    goes through here; the caller releases the returned lock (rank 0) when it ends, however it ends."""

    def take() -> RunLock:
        # the lock first: --overwrite must never delete the files of a run that is still going
        lock = RunLock(out)
        lock.acquire(take_stale=resume)  # a requeued job resumes after its killed predecessor
        try:
            lock.removed = check_output_dir(out, resume, overwrite, result_patterns, resumable)
        except BaseException:
            lock.release()
            raise
        return lock

    return _all_ranks(take, info, rank0_only=True)


def run(
    task_cls: type[Task], argv: Sequence[str] | None = None, description: str | None = None
) -> dict[str, Any]:
    """Parse, set up, train and/or evaluate; returns the metrics written to ``metrics.json``."""
    cfg = parse(task_cls, argv, description)
    info = dist.init_distributed(cfg.device)
    out = Path(cfg.output_dir)
    lock = None
    try:
        lock = prepare_output(out, info, resume=getattr(cfg, "resume", False), overwrite=cfg.overwrite,
                              result_patterns=task_cls.result_files, resumable=task_cls.trains)
        setup_logging(out, info.rank, name=task_cls.log_name)
        if lock is not None and lock.removed:  # said again, now that the log exists
            log.warning("--overwrite: removed the earlier run's %s", ", ".join(p.name for p in lock.removed))
        task = task_cls(cfg, info, out)
        return _run(task, cfg, info, out) if task.trains else _evaluate_only(task, cfg, info, out)
    finally:
        if lock is not None:
            lock.release()
        if "emcl.train.compile" in sys.modules:  # inductor's worker pool must not hold the process at exit
            sys.modules["emcl.train.compile"].release_compile_workers()
        dist.cleanup()


def _setup(task: Task, cfg: argparse.Namespace, info: dist.DistInfo) -> None:
    """Seeds, threads and the task's data preparation (every rank)."""
    dist.seed_everything(cfg.seed, info.rank)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _all_ranks(task.prepare_data, info)


def _evaluate_only(task: EvalOnlyTask, cfg: argparse.Namespace, info: dist.DistInfo,
                   out: Path) -> dict[str, Any]:
    """An eval-only task: one evaluation; ``config.yaml`` and ``metrics.json`` written by rank 0."""
    _setup(task, cfg, info)
    if info.is_main:
        save_yaml(config_dict(cfg), out / "config.yaml")
    metrics = task.metrics(task.evaluate(None, "test"))
    task.write_metrics(metrics)
    dist.barrier()
    return metrics


def _run(task: Task, cfg: argparse.Namespace, info: dist.DistInfo, out: Path) -> dict[str, Any]:
    _setup(task, cfg, info)
    if cfg.eval_split == "val" and not task.has_split("val"):
        raise UserError(f"--eval_split val: {getattr(cfg, 'datatype', task.name)} has no validation split")

    init_ck, foreign = _read_init_model(task, cfg)
    resume_ck = load_resume_checkpoint(task, cfg, info, out)  # settings checked before anything is written
    splits = _splits_used(task, cfg)
    _all_ranks(lambda: task.check_data(splits), info, rank0_only=True)
    log.info("%s: device %s, %d process(es); output %s", task.name, info.device, info.world_size, out)

    model = task.build_model()
    _load_init_model(model, cfg, init_ck, foreign)
    del init_ck
    model.to(info.device)
    _compile(task, cfg, model, info.device)
    if info.is_main:  # once the settings have built a model (a bad clip_config leaves no config.yaml)
        save_yaml(config_dict(cfg), out / "config.yaml")

    metrics: dict[str, Any] = {"finished": False, "task": task.name}
    if cfg.init_model:
        metrics["init_model"] = str(cfg.init_model)
        if foreign is not None:
            metrics.update(foreign.metrics(cfg))
    if cfg.do_train:
        metrics["train"] = train(task, cfg, model, info, out, resume_ck)
        del resume_ck
        metrics["resumed_from"] = metrics["train"].pop("resumed_from")
        tested = out / metrics["train"]["evaluated_checkpoint"]
        model.load_state_dict(
            load_checkpoint(tested, map_location=info.device)["model"]
        )  # exactly the saved weights
    if cfg.do_eval:
        _final_evaluation(task, cfg, model, metrics)
    metrics["finished"] = True
    task.write_metrics(metrics)
    if info.is_main and cfg.do_train:
        _after_training(task, out)
    dist.barrier()
    return metrics


def _final_evaluation(task: Task, cfg: argparse.Namespace, model: nn.Module, metrics: dict[str, Any]) -> None:
    """``--eval_split`` (an eval-only run on test also reports val) into ``metrics``."""
    eval_splits = [cfg.eval_split]
    if not cfg.do_train and cfg.eval_split == "test" and task.has_split("val"):
        eval_splits = ["val", "test"]
    for split in eval_splits:
        res = task.evaluate(model, split)
        if cfg.select_on_test and cfg.do_train:
            res["selected_on_test"] = True
        metrics[split] = res
        log.info("%s results:\n%s", split, task.format_results(res))


def configured_keys(cfg: argparse.Namespace) -> set[str]:
    """Settings the user gave (config file or command line), as opposed to defaults."""
    return set(getattr(cfg, "_explicit", ())) | set(getattr(cfg, "_config_keys", ()))


def _read_init_model(task: Task, cfg: argparse.Namespace) -> tuple[dict | None, Any]:
    """``--init_model``: (our checkpoint, None) with its settings checked (fine-tuning) or taken (eval-only);
    (None, adopted) for a foreign layout the task reads (its architecture then settled in ``cfg``)."""
    if not cfg.init_model:
        return None, None
    init_ck = load_checkpoint(cfg.init_model)
    foreign = task.adopt_checkpoint(init_ck, str(cfg.init_model), configured_keys(cfg))
    if foreign is not None:
        return None, foreign
    saved = _saved_config(init_ck, cfg.init_model)
    if saved is not None:
        if cfg.do_train:  # fine-tuning: the weights must fit the model being built
            check_settings(
                saved,
                config_dict(cfg),
                must_match=task.arch_keys(),
                may_change=(),
                source=f"--init_model {cfg.init_model}",
                action="Its weights fit only a model built with the same settings: use them",
            )
        else:
            apply_checkpoint_settings(task, cfg, saved, cfg.init_model)
    return init_ck, None


def _load_init_model(model: nn.Module, cfg: argparse.Namespace, init_ck: dict | None, foreign: Any) -> None:
    """The ``--init_model`` weights into the freshly built model; a mismatch names the keys."""
    if foreign is not None:
        foreign.load_into(model)
    elif init_ck is not None:
        state = init_ck["model"] if "model" in init_ck else init_ck
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            why = state_dict_mismatch(model.state_dict(), state) or str(e).splitlines()[0]
            raise UserError(f"{cfg.init_model} does not fit the model these settings build: {why}") from e
    else:
        return
    log.info("loaded %s", cfg.init_model)


def _compile(task: Task, cfg: argparse.Namespace, model: nn.Module, device: torch.device) -> None:
    """``--compile`` (auto: on CUDA): the task's modules compiled in place (keys unchanged), for training
    and evaluation alike; a failed compile falls back to eager with one warning."""
    if not (cfg.compile == "1" or (cfg.compile == "auto" and device.type == "cuda")):
        return
    from emcl.train.compile import compile_modules, set_activation_memory_budget

    set_activation_memory_budget(getattr(cfg, "memory_budget", None))
    targets = task.compile_targets(model)
    cfg._compiled = compile_modules(targets, cfg.compile, device)


def _after_training(task: Task, out: Path) -> None:
    """The task's report on a finished training run (the training curves); a failure only warns: a
    figure must never cost a finished run its result."""
    try:
        path = task.after_training(out)
        if path is not None:
            log.info("wrote %s", path)
    except ImportError as e:
        log.warning("no training curves: %s", e)
    except Exception as e:
        log.warning("could not draw the training curves: %s", e)
