"""Loading a finished run (or a checkpoint) for tools that use a trained model: figures, search.

The training layer does not import a task: the task module is named by the config key ``task_module``
(default :data:`DEFAULT_TASK_MODULE`) and imported with :mod:`importlib`; its ``TASK`` is the task's
:class:`~emcl.train.task.Task` class, bound here to the run's settings. Tools then use the task's
methods: ``load_split``, ``video_source``, ``encode``, ``score_fn``.

    run = load_run("runs/demo")                       # config.yaml + checkpoint_best.pt (else _last)
    run = load_run(checkpoint="ck.pt", config="c.yaml")  # the checkpoint's saved config, C over it
    t, f, m, ok = run.features("test")
"""

from __future__ import annotations

import argparse
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from emcl.dist import DistInfo
from emcl.errors import UserError, describe_task
from emcl.train.checkpoint import check_checkpoint_task, load_checkpoint
from emcl.train.config import load_yaml
from emcl.train.task import Task

DEFAULT_TASK_MODULE = "video_retrieval.emcl_net.main_task_retrieval"
CHECKPOINT_NAMES = ("checkpoint_best.pt", "checkpoint_last.pt")


@dataclass
class LoadedRun:
    """A model with its weights loaded (eval mode, on ``device``), its config and its task."""

    cfg: argparse.Namespace
    model: torch.nn.Module
    task: Task
    checkpoint: Path
    run_dir: Path | None
    device: torch.device

    def split(self, split: str) -> Any:
        """The task's annotation split."""
        return self.need("load_split")(split)

    def video_source(self) -> Any:
        """Where the run's clips come from (the frame cache or the video folder)."""
        return self.need("video_source")()

    @torch.no_grad()
    def features(self, split: str | Any) -> tuple[torch.Tensor, ...]:
        """The task's features of a split (by name or an already loaded split object): for EMCL-Net text
        (A, D), per-frame video features (V, T, D), frame masks (V, T), video validity."""
        data = self.split(split) if isinstance(split, str) else split
        self.model.eval()
        return self.need("encode")(self.model, data)

    def need(self, name: str) -> Any:
        """The task's method ``name``; a task without it cannot serve the tool (one line naming both)."""
        fn = getattr(self.task, name, None)
        if fn is None or getattr(type(self.task), name, None) is getattr(Task, name, None):
            raise UserError(
                f"{self.checkpoint} is a checkpoint of task '{self.task.name}', not of EMCL-Net "
                f"('retrieval'): this tool reads EMCL-Net runs (it needs the task's {name})"
            )
        return fn


def find_checkpoint(run_dir: str | os.PathLike) -> Path:
    """``checkpoint_best.pt`` of a run folder, else ``checkpoint_last.pt``; an error if neither exists."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist")
    for name in CHECKPOINT_NAMES:
        if (run_dir / name).is_file():
            return run_dir / name
    raise UserError(f"run folder {run_dir} has neither {' nor '.join(CHECKPOINT_NAMES)}")


def import_task(cfg: argparse.Namespace | dict) -> type[Task]:
    """The task class (``TASK``) of the module named by the config's ``task_module`` (default EMCL-Net)."""
    name = cfg.get("task_module") if isinstance(cfg, dict) else getattr(cfg, "task_module", None)
    name = name or DEFAULT_TASK_MODULE
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise UserError(f"config key task_module: cannot import {name!r}: {e}") from e
    task = getattr(module, "TASK", None)
    if not (isinstance(task, type) and issubclass(task, Task)):
        raise UserError(f"config key task_module: {name} has no TASK class")
    return task


def task_defaults(task: type[Task]) -> dict[str, Any]:
    """Every flag's default of a task, plus its nested config keys as None."""
    from emcl.train.runner import build_parser

    parser = build_parser(task)
    out: dict[str, Any] = {k: None for k in task.config_blocks}
    out.update(
        {
            a.dest: a.default
            for a in parser._actions
            if a.dest != "help" and a.default is not argparse.SUPPRESS
        }
    )
    return out


def load_run(
    run_dir: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    config: str | os.PathLike | dict | None = None,
    device: str | torch.device = "cpu",
    overrides: dict[str, Any] | None = None,
    expect: tuple[str, str] | None = None,
) -> LoadedRun:
    """Build a run's model and load its weights.

    Config, lowest to highest precedence: the task's defaults (:func:`task_defaults`, so that a run made
    before a setting existed still loads); the checkpoint's saved ``config``; ``run_dir/config.yaml``;
    ``config`` (a YAML file or a dict); ``overrides``. Checkpoint: ``checkpoint``, else the run folder's
    ``checkpoint_best.pt``, else its ``checkpoint_last.pt``. A checkpoint of a foreign layout that the task
    reads (the authors' EMCL-Net files) brings its architecture; the config then gives the rest. Errors
    name the file or key at fault. ``expect`` (task name, flag): a checkpoint of another of our tasks is
    refused before any model is built, in one line naming both tasks and the flag.
    """
    if run_dir is None and checkpoint is None:
        raise UserError("give a run folder or a checkpoint")
    run_path = Path(run_dir) if run_dir is not None else None
    ck_path = Path(checkpoint) if checkpoint is not None else find_checkpoint(run_path)
    try:
        ck = load_checkpoint(ck_path, map_location="cpu")
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(str(e)) from e
    if expect is not None:
        check_checkpoint_task(ck, ck_path, *expect)
    values: dict[str, Any] = {}
    if isinstance(ck, dict) and isinstance(ck.get("config"), dict):
        values.update(ck["config"])
    given = _user_settings(run_path, config)
    described = bool(values or given)  # a config says which model the weights are for (overrides do not)
    given.update(overrides or {})
    values.update(given)
    task_cls = import_task(values)
    # settings added to the task since the run was made take their defaults
    cfg = argparse.Namespace(**{**task_defaults(task_cls), **values})
    dev = torch.device(device)
    task = task_cls(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=dev, is_main=True))
    foreign = task.adopt_checkpoint(ck, str(ck_path), set(given))
    if foreign is None and not described:
        if expect is not None:  # an entry point's flag: its --config gives no model settings
            raise UserError(f"{expect[1]} {ck_path} is not a checkpoint of {describe_task(expect[0])}: it "
                            "has no 'config' entry (ours have one) and is not in the authors' layout")
        where = f"{run_path / 'config.yaml'} or " if run_path is not None else ""
        raise UserError(f"no config: {where}the checkpoint {ck_path} has no 'config' entry; pass --config")
    try:
        model = task.build_model()
    except AttributeError as e:  # a key the task needs is missing from the saved config
        raise UserError(f"config of {ck_path} lacks a setting task '{task.name}' needs: {e}") from e
    if foreign is not None:
        foreign.load_into(model)
    else:
        state = ck["model"] if isinstance(ck, dict) and "model" in ck else ck
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise UserError(f"checkpoint {ck_path} does not fit the model its config describes: {e}") from e
    model.to(dev).eval()
    return LoadedRun(cfg=cfg, model=model, task=task, checkpoint=ck_path, run_dir=run_path, device=dev)


def _user_settings(run_path: Path | None, config: str | os.PathLike | dict | None) -> dict[str, Any]:
    """``run_dir/config.yaml``, then ``config`` (YAML file or dict): what the user set."""
    values: dict[str, Any] = {}
    if run_path is not None and (run_path / "config.yaml").is_file():
        values.update(load_yaml(run_path / "config.yaml"))
    if isinstance(config, dict):
        values.update(config)
    elif config is not None:
        try:
            values.update(load_yaml(config))
        except (FileNotFoundError, ValueError) as e:
            raise UserError(str(e)) from e
    return values


def score_function(run: LoadedRun, policy: str) -> Any:
    """``score_fn(t, f, mask) -> (..., A, B)`` of the run's model under an evaluation policy: with its EMCL
    layer for ``paper``/``query``, without for ``none`` (the task's ``score_fn``)."""
    if policy not in ("paper", "query", "none"):
        raise UserError(f"evaluation policy must be paper, query or none, got {policy!r}")
    return run.need("score_fn")(run.model, policy)


def similarity(
    run: LoadedRun, t: torch.Tensor, f: torch.Tensor, mask: torch.Tensor | None, policy: str | None = None
) -> torch.Tensor:
    """The (A, V) score matrix under ``policy`` (default: the run's ``eval_block``), single process."""
    from emcl.scoring import score_matrix

    policy = policy or getattr(run.cfg, "eval_block", "query")
    block = int(getattr(run.cfg, "eval_block_size", 32))
    return score_matrix(score_function(run, policy), t, f, mask, mode=policy, block=block)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The flags every tool that reads a finished run takes (figures, examples): where the run is, which
    split, where to write (a folder of the tool's own) and whether to replace its earlier results there,
    the device."""
    p.add_argument("--run", default=None, help="run folder (config.yaml + checkpoint_best.pt)")
    p.add_argument("--checkpoint", default=None, help="checkpoint (its saved config is used)")
    p.add_argument("--config", default=None, help="YAML whose settings override the saved config")
    p.add_argument("--split", default="test")
    p.add_argument("--out", default=None,
                   help="output folder (default: a folder named after the command inside the run folder)")
    p.add_argument("--overwrite", action="store_true", help="replace this command's earlier results there")
    p.add_argument("--device", default="cpu")
    p.add_argument("--debug", action="store_true")


def load_run_from_args(args: argparse.Namespace) -> LoadedRun:
    """:func:`load_run` from the flags of :func:`add_run_arguments`."""
    if args.run is None and args.checkpoint is None:
        raise UserError("give --run DIR or --checkpoint CK [--config C]")
    return load_run(args.run, args.checkpoint, args.config, device=args.device)
