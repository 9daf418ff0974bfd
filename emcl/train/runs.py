"""Loading a finished run (or a checkpoint) for tools that use a trained model: figures, search.

The core layer does not import a task at module import time: the task module is named by the config
key ``task_module`` (default :data:`DEFAULT_TASK_MODULE`) and imported with :mod:`importlib`. It must
provide ``build_model(cfg)``; tools that read data also use its ``get_split(cfg, split)``,
``video_source(cfg)`` and ``extract_features(model, split, cfg, info)``.

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
from types import ModuleType
from typing import Any

import torch

from emcl.errors import UserError
from emcl.train.checkpoint import load_checkpoint
from emcl.train.config import load_yaml

DEFAULT_TASK_MODULE = "video_retrieval.emcl_net.main_task_retrieval"
CHECKPOINT_NAMES = ("checkpoint_best.pt", "checkpoint_last.pt")


@dataclass
class LoadedRun:
    """A model with its weights loaded (eval mode, on ``device``), its config and its task module."""

    cfg: argparse.Namespace
    model: torch.nn.Module
    task: ModuleType
    checkpoint: Path
    run_dir: Path | None
    device: torch.device

    def dist_info(self) -> Any:
        """A single-process :class:`emcl.dist.DistInfo` on this run's device."""
        from emcl.dist import DistInfo

        return DistInfo(rank=0, world_size=1, local_rank=0, device=self.device, is_main=True)

    def split(self, split: str) -> Any:
        """The task's annotation split (``get_split(cfg, split)``)."""
        return _need(self.task, "get_split")(self.cfg, split)

    def video_source(self) -> Any:
        """Where the run's clips come from (``video_source(cfg)``: the frame cache or the video folder)."""
        return _need(self.task, "video_source")(self.cfg)

    @torch.no_grad()
    def features(self, split: str | Any) -> tuple[torch.Tensor, ...]:
        """The task's cached features of a split (by name or an already loaded split object):
        for EMCL-Net text (A, D), per-frame video features (V, T, D), frame masks (V, T), video validity."""
        data = self.split(split) if isinstance(split, str) else split
        self.model.eval()
        return _need(self.task, "extract_features")(self.model, data, self.cfg, self.dist_info())


def _need(module: ModuleType, name: str) -> Any:
    fn = getattr(module, name, None)
    if fn is None:
        raise UserError(f"task module {module.__name__} has no {name}(); it cannot be used by this tool")
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


def import_task(cfg: argparse.Namespace | dict) -> ModuleType:
    """The task module named by the config's ``task_module`` (default EMCL-Net retrieval)."""
    name = (cfg.get("task_module") if isinstance(cfg, dict) else getattr(cfg, "task_module", None))
    name = name or DEFAULT_TASK_MODULE
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise UserError(f"config key task_module: cannot import {name!r}: {e}") from e


def task_defaults(task: ModuleType) -> dict[str, Any]:
    """Every flag's default of a task run through :mod:`emcl.train.runner` (its module's ``TASK``), plus its
    nested config keys as None; empty for other tasks."""
    spec = getattr(task, "TASK", None)
    if spec is None:
        return {}
    from emcl.train.runner import build_parser

    parser = build_parser(spec)
    out: dict[str, Any] = {k: None for k in getattr(spec, "extra_config_keys", ())}
    out.update({a.dest: a.default for a in parser._actions
                if a.dest != "help" and a.default is not argparse.SUPPRESS})
    return out


def load_run(
    run_dir: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    config: str | os.PathLike | dict | None = None,
    device: str | torch.device = "cpu",
    overrides: dict[str, Any] | None = None,
) -> LoadedRun:
    """Build a run's model and load its weights.

    Config, lowest to highest precedence: the task's defaults (:func:`task_defaults`, so that a run made
    before a setting existed still loads); the checkpoint's saved ``config``; ``run_dir/config.yaml``;
    ``config`` (a YAML file or a dict); ``overrides``. Checkpoint: ``checkpoint``, else the run folder's
    ``checkpoint_best.pt``, else its ``checkpoint_last.pt``. A checkpoint of a foreign layout that the task
    reads (the authors' EMCL-Net files) brings its architecture; the config then gives the rest. Errors
    name the file or key at fault.
    """
    if run_dir is None and checkpoint is None:
        raise UserError("give a run folder or a checkpoint")
    run_path = Path(run_dir) if run_dir is not None else None
    ck_path = Path(checkpoint) if checkpoint is not None else find_checkpoint(run_path)
    try:
        ck = load_checkpoint(ck_path, map_location="cpu")
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(str(e)) from e
    values: dict[str, Any] = {}
    if isinstance(ck, dict) and isinstance(ck.get("config"), dict):
        values.update(ck["config"])
    given = _user_settings(run_path, config, overrides)
    values.update(given)
    task = import_task(values)
    # settings added to the task since the run was made take their defaults
    cfg = argparse.Namespace(**{**task_defaults(task), **values})
    adopt = getattr(getattr(task, "TASK", None), "adopt_checkpoint", None)
    foreign = adopt(ck, str(ck_path), cfg, set(given)) if adopt is not None else None
    if foreign is None and not values:
        where = f"{run_path / 'config.yaml'} or " if run_path is not None else ""
        raise UserError(f"no config: {where}the checkpoint {ck_path} has no 'config' entry; pass --config")
    try:
        model = _need(task, "build_model")(cfg)
    except AttributeError as e:  # a key the task needs is missing from the saved config
        raise UserError(f"config of {ck_path} lacks a setting {task.__name__}.build_model needs: {e}") from e
    if foreign is not None:
        foreign.load_into(model)
    else:
        state = ck["model"] if isinstance(ck, dict) and "model" in ck else ck
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise UserError(f"checkpoint {ck_path} does not fit the model its config describes: {e}") from e
    dev = torch.device(device)
    model.to(dev).eval()
    return LoadedRun(cfg=cfg, model=model, task=task, checkpoint=ck_path, run_dir=run_path, device=dev)


def _user_settings(run_path: Path | None, config: str | os.PathLike | dict | None,
                   overrides: dict[str, Any] | None) -> dict[str, Any]:
    """``run_dir/config.yaml``, then ``config`` (YAML file or dict), then ``overrides``: what the user set."""
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
    values.update(overrides or {})
    return values


def score_function(run: LoadedRun, policy: str) -> Any:
    """``score_fn(t, f, mask) -> (..., A, B)`` of the run's model under an evaluation policy: with its EMCL
    layer for ``paper``/``query``, without for ``none``. The task module's ``score_fn(model, cfg, policy)``
    when it has one; otherwise EMCL-Net's ``emcl_scores`` from the task module."""
    if policy not in ("paper", "query", "none"):
        raise UserError(f"evaluation policy must be paper, query or none, got {policy!r}")
    own = getattr(run.task, "score_fn", None)
    if own is not None:
        return own(run.model, run.cfg, policy)
    emcl_scores = _need(run.task, "emcl_scores")
    emcl = getattr(run.model, "emcl", None) if policy != "none" else None
    temp = run.model.temp

    def score_fn(t: torch.Tensor, f: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return emcl_scores(t, f, mask, emcl, temp)

    return score_fn


def similarity(run: LoadedRun, t: torch.Tensor, f: torch.Tensor, mask: torch.Tensor | None,
               policy: str | None = None) -> torch.Tensor:
    """The (A, V) score matrix under ``policy`` (default: the run's ``eval_block``), single process."""
    from emcl.scoring import score_matrix

    policy = policy or getattr(run.cfg, "eval_block", "query")
    block = int(getattr(run.cfg, "eval_block_size", 32))
    return score_matrix(score_function(run, policy), t, f, mask, mode=policy, block=block)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The flags every tool that reads a finished run takes (figures, examples): where the run is, which
    split, where to write, the device."""
    p.add_argument("--run", default=None, help="run folder (config.yaml + checkpoint_best.pt)")
    p.add_argument("--checkpoint", default=None, help="checkpoint (its saved config is used)")
    p.add_argument("--config", default=None, help="YAML whose settings override the saved config")
    p.add_argument("--split", default="test")
    p.add_argument("--out", default=None, help="output folder (default: the run folder / the checkpoint's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--debug", action="store_true")


def load_run_from_args(args: argparse.Namespace) -> LoadedRun:
    """:func:`load_run` from the flags of :func:`add_run_arguments`."""
    if args.run is None and args.checkpoint is None:
        raise UserError("give --run DIR or --checkpoint CK [--config C]")
    return load_run(args.run, args.checkpoint, args.config, device=args.device)
