"""Flags, declared once, each marked with what it defines.

A flag's kind says what a checkpoint made with it depends on:

- ``arch``: the weights' shapes (a checkpoint loads only into a model built with the same value);
- ``score``: the scores an evaluation computes (an eval-only run takes the checkpoint's value unless the
  flag is given);
- ``experiment``: the training run itself (``--resume`` refuses another value).

A flag may have several kinds, or none (where results go, workers, logging). The groups every task shares
(the run, data, training, evaluation, precision, EM, frames) are built here; a task lists the groups it
takes, with its own defaults, beside its own flags.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from emcl.em import EMSettings
from emcl.train.config import fraction, nonneg_float, nonneg_int, positive_float, positive_int

ARCH, SCORE, EXPERIMENT = "arch", "score", "experiment"
KINDS = (ARCH, SCORE, EXPERIMENT)
EVAL_POLICIES = ("paper", "query", "none")


@dataclass(frozen=True)
class Flag:
    """One option: its names (the first gives ``dest``), its kinds and argparse's keywords."""

    names: tuple[str, ...]
    kinds: frozenset[str]
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def dest(self) -> str:
        return self.kwargs.get("dest") or self.names[0].lstrip("-")


@dataclass(frozen=True)
class Group:
    """Flags shown together in ``--help``."""

    title: str
    flags: tuple[Flag, ...]

    def defaults(self, **values: Any) -> Group:
        """The same flags with other defaults (e.g. a task's EM settings); unknown names are an error."""
        known = {f.dest for f in self.flags}
        bad = set(values) - known
        if bad:
            raise KeyError(f"{self.title}: no flag {', '.join(sorted(bad))}")
        return replace(
            self,
            flags=tuple(
                replace(f, kwargs={**f.kwargs, "default": values[f.dest]}) if f.dest in values else f
                for f in self.flags
            ),
        )

    def without(self, *dests: str) -> Group:
        return replace(self, flags=tuple(f for f in self.flags if f.dest not in dests))

    def kinds(self, kinds: str, *dests: str) -> Group:
        """The same flags with ``dests`` re-marked as ``kinds`` (space-separated)."""
        new = _kinds(kinds)
        return replace(self, flags=tuple(replace(f, kinds=new) if f.dest in dests else f for f in self.flags))


def _kinds(kinds: str) -> frozenset[str]:
    out = frozenset(kinds.split())
    if not out <= set(KINDS):
        raise ValueError(f"flag kinds must be among {KINDS}, got {kinds!r}")
    return out


def flag(*names: str, kind: str = "", **kwargs: Any) -> Flag:
    """A flag: ``flag("--centerK", kind="arch", type=positive_int, default=32, help=...)``."""
    return Flag(tuple(names), _kinds(kind), kwargs)


def group(title: str, *flags: Flag) -> Group:
    return Group(title, tuple(flags))


def add_groups(parser: argparse.ArgumentParser, groups: Iterable[Group]) -> None:
    """Every group's flags on ``parser``; a flag declared twice is a programming error."""
    seen: set[str] = set()
    for g in groups:
        target = parser.add_argument_group(g.title)
        for f in g.flags:
            if f.dest in seen:
                raise ValueError(f"flag --{f.dest} declared twice")
            seen.add(f.dest)
            target.add_argument(*f.names, **f.kwargs)


def keys_of(groups: Iterable[Group], kind: str) -> tuple[str, ...]:
    """The flags of ``kind``, in declaration order."""
    return tuple(f.dest for g in groups for f in g.flags if kind in f.kinds)


# ----------------------------------------------------------------------------------- shared groups
def run_group(output_dir: str | None = "runs/emcl") -> Group:
    """Where results go and how the process runs: every entry point. ``output_dir=None``: no default, the
    run loop asks for one (the command line or the config file may give it)."""
    out = {"default": output_dir, "help": None if output_dir else "required (here or in --config)"}
    return group(
        "run",
        flag("--config", default=None, help="YAML file of option defaults; flags given here override it"),
        flag("--output_dir", **out),
        flag("--overwrite", action="store_true", help="replace the results of an earlier run in output_dir"),
        flag("--seed", kind="experiment", type=int, default=42),
        flag(
            "--threads",
            type=nonneg_int,
            default=0,
            help="torch's CPU threads per process (0: torch's default); tiny models on a busy CPU run "
            "fastest with 1",
        ),
        flag("--debug", action="store_true", help="show tracebacks of errors a user can fix"),
    )


def _compile_mode(value: str) -> str:
    v = str(value).lower()
    table = {"auto": "auto", "1": "1", "true": "1", "on": "1", "0": "0", "false": "0", "off": "0"}
    if v not in table:
        raise argparse.ArgumentTypeError(f"must be auto, 1 or 0, got {value!r}")
    return table[v]


def precision_group(compile: bool = True) -> Group:
    """The device and the numbers of the encoders (scoring is always float32)."""
    flags = [
        flag("--device", default=None, choices=("cpu", "cuda")),
        flag(
            "--precision",
            default="auto",
            choices=("auto", "bf16", "fp32"),
            help="encoders: auto is bf16 autocast on CUDA; scoring is always float32",
        ),
    ]
    if compile:
        flags.append(
            flag(
                "--compile",
                type=_compile_mode,
                default="auto",
                help="torch.compile: auto (on for CUDA), 1 or 0",
            )
        )
    return group("device and precision", *flags)


def data_group() -> Group:
    """Where a dataset's annotations and clips are, and what to do with unreadable videos."""
    return group(
        "data",
        flag("--anno_path", kind="experiment", default=None, help="folder of the dataset's annotation files"),
        flag("--video_path", kind="experiment", default=None, help="folder of the videos"),
        flag("--frame_cache", default=None, help="HDF5 frame store from scripts/cache_frames.py"),
        flag("--cache_in_memory", type=int, default=0, choices=(0, 1), help="hold the frame cache in RAM"),
        flag("--skip_bad_videos", action="store_true", help="log, count and skip unreadable videos"),
        flag(
            "--max_skip_fraction",
            type=fraction,
            default=0.05,
            help="with --skip_bad_videos: stop once more than this share of a split's videos is unreadable",
        ),
        flag("--workers", type=nonneg_int, default=4),
    )


def training_group() -> Group:
    """What to do, and the optimisation every trainer shares."""
    return group(
        "training",
        flag("--do_train", type=int, default=0, choices=(0, 1)),
        flag("--do_eval", type=int, default=0, choices=(0, 1)),
        flag(
            "--batch_size",
            kind="experiment",
            type=positive_int,
            default=128,
            help="global training batch, split across ranks",
        ),
        flag("--epochs", type=positive_int, default=5),
        flag(
            "--max_steps",
            type=nonneg_int,
            default=0,
            help="stop training after this many steps (0: all epochs)",
        ),
        flag("--lr", kind="experiment", type=positive_float, default=1e-4),
        flag(
            "--coef_lr", kind="experiment", type=nonneg_float, default=1e-3, help="backbone lr = lr * coef_lr"
        ),
        flag("--weight_decay", kind="experiment", type=nonneg_float, default=0.2),
        flag("--warmup_proportion", kind="experiment", type=fraction, default=0.1),
        flag("--max_grad_norm", kind="experiment", type=nonneg_float, default=1.0, help="0: no clipping"),
        flag("--init_model", default=None, help="checkpoint to start from or to evaluate"),
        flag("--resume", action="store_true", help="continue from output_dir/checkpoint_last.pt"),
        flag(
            "--faithful",
            kind="experiment",
            action="store_true",
            help="the reference's behaviour where ours differs (docs/reference.md)",
        ),
        flag("--n_display", type=positive_int, default=50, help="log every n steps"),
        flag("--tensorboard", action="store_true", help="also log to TensorBoard in output_dir/tensorboard"),
    )


def evaluation_group(
    block_size: int = 32, policies: Sequence[str] = EVAL_POLICIES, policy_help: str = ""
) -> Group:
    """Which split is evaluated, how, and (``policies`` non-empty) how EM scoring is blocked."""
    flags = [
        flag("--batch_size_val", type=positive_int, default=64, help="per-rank batch for evaluation"),
        flag("--eval_split", default="test", choices=("val", "test"), help="split of the final evaluation"),
        flag(
            "--select_on_test",
            action="store_true",
            help="select the epoch on the test split, as the reference did (results are labelled as such)",
        ),
    ]
    if policies:
        flags += [
            flag(
                "--eval_block",
                kind="score",
                default="paper",
                choices=tuple(policies),
                help=policy_help
                or "headline policy (all are reported): paper: EM per block as the "
                "reference; query: EM per text over all videos; none: no EM",
            ),
            flag(
                "--eval_block_size",
                kind="score",
                type=positive_int,
                default=block_size,
                help="block of the paper policy",
            ),
        ]
    return group("evaluation", *flags)


def em_group(
    centerK: int,
    stage_num: int,
    beta: float,
    *,
    lamd: float = 1.0,
    momentum: float = 0.9,
    scored: bool = True,
) -> Group:
    """The EMCL layer (docs/em_layer.md). ``scored``: the EM settings also define the evaluation scores."""
    em = "experiment score" if scored else "experiment"
    return group(
        "EMCL",
        flag("--use_emcl", kind="arch", type=int, default=1, choices=(0, 1)),
        flag("--centerK", kind="arch", type=positive_int, default=centerK, help="K, the number of bases"),
        flag("--stage_num", kind=em, type=positive_int, default=stage_num, help="T, the EM iterations"),
        flag(
            "--momentum",
            kind="experiment",
            type=fraction,
            default=momentum,
            help="moving average of the bases in training",
        ),
        flag("--lamd", kind=em, type=positive_float, default=lamd, help="lambda, the softmax temperature"),
        flag("--beta", kind=em, type=nonneg_float, default=beta, help="weight of the reconstruction"),
        flag(
            "--em_init",
            kind=em,
            default="upstream",
            choices=("upstream", "gaussian", "linspace"),
            help="initial bases: upstream is the reference's +-1 draw",
        ),
    )


def em_settings(cfg: Any) -> EMSettings | None:
    """The EMCL layer that :func:`em_group`'s flags describe (``None`` with ``--use_emcl 0``)."""
    if not cfg.use_emcl:
        return None
    return EMSettings(k=cfg.centerK, stage_num=cfg.stage_num, momentum=cfg.momentum, lamd=cfg.lamd,
                      beta=cfg.beta, init=cfg.em_init, seed=cfg.seed)


def frame_group(
    max_words: int = 32, max_frames: int = 12, video_framerate: float = 1.0, image_size: int = 224
) -> Group:
    """How captions are cut and clips sampled; they define both training and scores."""
    both = "score experiment"
    return group(
        "frames and words",
        flag("--max_words", kind=both, type=positive_int, default=max_words),
        flag("--max_frames", kind=both, type=positive_int, default=max_frames),
        flag("--video_framerate", kind=both, type=positive_float, default=video_framerate),
        flag("--image_size", kind=both, type=positive_int, default=image_size),
        flag("--decode_backend", default="pyav", choices=("pyav", "opencv")),
    )
