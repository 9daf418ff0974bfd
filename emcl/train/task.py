"""What a task is: a small class whose defaults cover the common case.

A task declares its flags (shared groups from :mod:`emcl.train.flags` plus its own) and, bound to a run's
settings and processes, supplies the pieces the run loop (:mod:`emcl.train.runner`) and the tools that
read finished runs call:

- data: ``prepare_data()``, ``has_split(split)``, ``check_data(splits)``, ``loader(split)``;
- model: ``build_model()``, ``adopt_checkpoint(...)`` (a foreign checkpoint layout), ``compile_targets``;
- training: ``build_optimizer``, ``step(ddp, batch)``, ``clip_grad``, ``after_step``;
- evaluation: ``encode(model, split)``, ``evaluate(model, split)``, ``select_key``, ``format_results``.

Retrieval tasks share :class:`emcl.train.retrieval.RetrievalTask`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from emcl import dist
from emcl.fileio import save_json
from emcl.train.flags import (
    ARCH,
    EXPERIMENT,
    SCORE,
    Group,
    data_group,
    evaluation_group,
    keys_of,
    precision_group,
    run_group,
    training_group,
)
from emcl.train.optim import build_optimizer, build_scheduler, param_groups
from emcl.train.outdir import RESULT_FILES

log = logging.getLogger("emcl.run")


class Task:
    """A trainer's model, data, step and evaluation, bound to ``cfg`` (the run's settings) and ``info``
    (this process's rank and device)."""

    name: ClassVar[str] = ""
    module: ClassVar[str] = ""  # importable module of the task, saved as ``task_module`` in configs
    groups: ClassVar[tuple[Group, ...]] = ()  # the task's own flag groups (the shared ones come first)
    common_groups: ClassVar[tuple[Group, ...]] = (
        run_group(),
        data_group(),
        training_group(),
        precision_group(),
    )
    evaluation: ClassVar[Group] = evaluation_group(policies=())  # retrieval tasks add the EM policies
    config_blocks: ClassVar[tuple[str, ...]] = ()  # nested config keys (``synthetic:``, ``clip_config:``)
    # settings that are no flag of the task's own groups, with their kinds: nested config blocks
    # (``{"clip_config": "arch"}``) and common flags that matter more here (MMT: ``{"faithful": "score"}``)
    setting_kinds: ClassVar[dict[str, str]] = {}
    logit_scale_max: ClassVar[float | None] = None  # clamp after every step (CLIP's 100)
    zero_shot: ClassVar[bool] = False  # eval-only without --init_model: pretrained weights as they are
    trains: ClassVar[bool] = True  # False: an eval-only task (one evaluation, no checkpoints)
    log_name: ClassVar[str] = "train.log"
    result_files: ClassVar[tuple[str, ...]] = RESULT_FILES  # what --overwrite removes of an earlier run

    def __init__(self, cfg: argparse.Namespace, info: dist.DistInfo, out: Path | None = None) -> None:
        self.cfg, self.info = cfg, info
        self.out = out  # the run folder; None for a run loaded by a tool

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        """``metrics.json`` in the run folder (rank 0; strict JSON, written atomically)."""
        if self.info.is_main and self.out is not None:
            save_json(metrics, self.out / "metrics.json")
            log.info("metrics written to %s", self.out / "metrics.json")

    def after_training(self, out: Path) -> Path | None:
        """A report on a finished training run (rank 0), e.g. the training curves; returns its path."""
        return None

    # ------------------------------------------------------------------------------------ flags
    @classmethod
    def all_groups(cls) -> tuple[Group, ...]:
        return (*cls.common_groups, cls.evaluation, *cls.groups)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        from emcl.train.flags import add_groups

        add_groups(parser, cls.all_groups())

    @classmethod
    def keys(cls, kind: str) -> tuple[str, ...]:
        """The settings of ``kind`` (arch, score or experiment)."""
        extra = [key for key, kinds in cls.setting_kinds.items() if kind in kinds.split()]
        return tuple(dict.fromkeys((*keys_of(cls.all_groups(), kind), *extra)))

    @classmethod
    def arch_keys(cls) -> tuple[str, ...]:
        return cls.keys(ARCH)

    @classmethod
    def score_keys(cls) -> tuple[str, ...]:
        return cls.keys(SCORE)

    @classmethod
    def experiment_keys(cls) -> tuple[str, ...]:
        return cls.keys(EXPERIMENT)

    @classmethod
    def check_flags(cls, cfg: argparse.Namespace) -> None:
        """Settings that contradict each other: a :class:`~emcl.errors.UserError` right after parsing,
        before the output folder is touched; may fill in what they imply."""

    # ------------------------------------------------------------------------------------- data
    def prepare_data(self) -> None:
        """Fill in what the settings leave open (e.g. generate the synthetic dataset); every rank."""

    def has_split(self, split: str) -> bool:
        """Whether the dataset has ``split`` (a validation split selects the epoch)."""
        return split in ("train", "test")

    def check_data(self, splits: list[str]) -> None:
        """Before the first step (rank 0): parse every split the run uses and find its inputs."""

    def loader(self, split: str) -> Any:
        """This rank's training loader (``split`` is ``"train"``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ model
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def prepare_zero_shot(self) -> None:
        """Settle ``cfg`` for a zero-shot evaluation (a task with ``zero_shot = True``)."""

    def adopt_checkpoint(self, checkpoint: Any, path: str, configured: set[str]) -> Any:
        """A checkpoint of a foreign layout: settle the architecture in ``cfg`` from it and return an
        object with ``load_into(model)``, ``format`` and ``metrics(cfg)``; None for our own checkpoints."""
        return None

    def compile_targets(self, model: nn.Module) -> list[nn.Module]:
        """Modules compiled in place (module trees and checkpoint keys stay as they are)."""
        return [model]

    # --------------------------------------------------------------------------------- training
    def build_optimizer(self, model: nn.Module, total_steps: int, steps_per_epoch: int) -> tuple[Any, Any]:
        """AdamW with backbone / new groups and warmup-cosine (``--faithful``: the reference's Adam)."""
        cfg = self.cfg
        groups = param_groups(model, cfg.lr, cfg.coef_lr, cfg.weight_decay, faithful=cfg.faithful)
        optimizer = build_optimizer(groups, faithful=cfg.faithful)
        return optimizer, build_scheduler(
            optimizer, total_steps, cfg.warmup_proportion, faithful=cfg.faithful
        )

    def step(self, ddp: nn.Module, batch: dict) -> torch.Tensor:
        """The loss of one training batch (``ddp``: the model, wrapped when there are several ranks)."""
        raise NotImplementedError

    def clip_grad(self, model: nn.Module) -> torch.Tensor | None:
        """Clip the gradients to ``--max_grad_norm``; returns the norm before clipping (None: no clip)."""
        if self.cfg.max_grad_norm > 0:
            return torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.max_grad_norm)
        return None

    def after_step(self, model: nn.Module) -> None:
        if self.logit_scale_max is not None:
            model.clamp_logit_scale(self.logit_scale_max)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Training features of every rank, with gradient (the ranks' batches may differ in length when
        videos are skipped); integer tensors without. ``--faithful``: the reference's unreduced gradients."""
        if not x.is_floating_point():
            return dist.gather_tensors_no_grad(x)
        return dist.all_gather_with_grad(
            x, reduce_grads=not self.cfg.faithful, variable=self.cfg.skip_bad_videos
        )

    # ------------------------------------------------------------------------------- evaluation
    def encode(self, model: nn.Module, split: Any) -> Any:
        """The features of a split, on every rank (search and figures use them too)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, split: str) -> dict[str, Any]:
        """The metrics of ``split`` ("val" or "test")."""
        raise NotImplementedError

    def select_key(self, results: dict[str, Any]) -> tuple:
        """Ranks two evaluations of the selection split: the larger is better."""
        raise NotImplementedError

    def format_results(self, results: dict[str, Any]) -> str:
        raise NotImplementedError


class EvalOnlyTask(Task):
    """A task that evaluates once and trains nothing (the inference module): the run's flags, the
    device, the lock and ``metrics.json`` come from the runner; ``evaluate(None, "test")`` does the rest."""

    trains = False
    common_groups = (run_group(output_dir=None), precision_group(compile=False))

    def metrics(self, results: dict[str, Any]) -> dict[str, Any]:
        """``metrics.json`` of a finished evaluation; ``write_metrics(metrics(part))`` may save a result
        early (e.g. before a long sweep that might fail)."""
        return {"finished": True, "task": self.name, **results}
