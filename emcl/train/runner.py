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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emcl import dist
from emcl.errors import UserError
from emcl.fileio import save_yaml
from emcl.train.checkpoint import check_checkpoint_task, load_checkpoint
from emcl.train.config import OneLineParser, parse_args
from emcl.train.lock import RunLock
from emcl.train.logs import setup_logging
from emcl.train.loop import load_resume_checkpoint, train
from emcl.train.outdir import RESULT_FILES, check_output_dir
from emcl.train.settings import check_settings, config_dict, saved_config, setting_diffs, state_dict_mismatch
from emcl.train.task import EvalOnlyTask, Task

__all__ = ["Task", "build_parser", "config_dict", "explicit_flags", "parse", "prepare_output", "run"]

log = logging.getLogger("emcl.run")


def build_parser(task: type[Task], description: str | None = None) -> argparse.ArgumentParser:
    """The task's flags (shared groups and its own); abbreviations are refused (``--lam`` is not
    ``--lamd``); a bad flag is one line, ``error: argument --lamd: ...``, exit status 2."""
    p = OneLineParser(
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
    if cfg.do_eval and not cfg.do_train and not cfg.init_model and not task.zero_shot:
        raise UserError("--do_eval 1 without training needs --init_model CHECKPOINT")
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume and --overwrite contradict each other: pass one")
    task.check_flags(cfg)
    return cfg


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


# ------------------------------------------------------------------------------------------------- run
def prepare_output(out: Path, info: dist.DistInfo, *, resume: bool, overwrite: bool,
                   result_patterns: Sequence[str] = RESULT_FILES,
                   resumable: bool = True) -> RunLock | None:
    """Rank 0 takes the output folder's lock, then checks the folder (another run's results are refused
    unless ``--resume`` or ``--overwrite``); an error reaches every rank. Every tool that writes results
    goes through here; the caller releases the returned lock (rank 0) when it ends, however it ends."""

    def take() -> RunLock:
        # the lock first: --overwrite must never delete the files of a run that is still going
        lock = RunLock(out, resumable=resumable)
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
    cfg.zero_shot = bool(cfg.do_eval and not cfg.do_train and not cfg.init_model)
    if cfg.zero_shot:  # pretrained weights evaluated as they are
        task.prepare_zero_shot()
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
    if cfg.zero_shot:
        metrics["zero_shot"] = True
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
    check_checkpoint_task(init_ck, cfg.init_model, task.name, "--init_model")  # before any other check
    foreign = task.adopt_checkpoint(init_ck, str(cfg.init_model), configured_keys(cfg))
    if foreign is not None:
        return None, foreign
    saved = saved_config(init_ck, cfg.init_model)
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
