"""Figures drawn from runs: the modality-gap figure, retrieval examples and training curves.

Every figure goes through :mod:`emcl.viz.plot` (matplotlib, Agg backend, one style, atomic PNG writes).
The figure commands that read a trained run load it with :func:`load_figure_run`, write into a folder of
their own (:func:`figure_output`: ``RUN/<command>/`` unless ``--out``, never the run folder itself) and read
the split with :func:`split_features`.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class SplitFeatures:
    """A loaded run (:class:`emcl.train.runs.LoadedRun`), one split of its data and the split's features
    (text, per-frame video features, frame masks, video validity), where its figures go and its name."""

    run: Any
    split: Any
    features: tuple[Any, ...]
    out: Path
    name: str


def run_parser(doc: str | None) -> argparse.ArgumentParser:
    """A figure command's parser with the flags of a finished run (``add_run_arguments``); a bad flag is
    a one-line error."""
    from emcl.errors import OneLineParser
    from emcl.train.runs import add_run_arguments

    p = OneLineParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p)
    return p


def load_figure_run(args: argparse.Namespace) -> Any:
    """The run named by a figure command's flags (:func:`run_parser`); a checkpoint of another task than
    EMCL-Net (question answering, MMT) is refused in one line naming both tasks."""
    from emcl.train.runs import load_run_from_args

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run = load_run_from_args(args)
    for name in ("score_fn", "load_split", "encode"):
        run.need(name)
    return run


def figure_output(args: argparse.Namespace, run: Any, tool: str, own: tuple[str, ...]) -> Any:
    """The figure command's output folder, to use as ``with figure_output(...) as claim``: ``--out``, else
    the folder ``tool`` inside the run folder (or the checkpoint's folder). Never the run folder itself.
    Its lock is held while the command works; earlier results there are replaced only with ``--overwrite``
    (:class:`emcl.train.outdir.ToolOutput`)."""
    from emcl.errors import UserError
    from emcl.train.outdir import ToolOutput

    home = run.run_dir if run.run_dir is not None else run.checkpoint.parent
    out = Path(args.out) if args.out else Path(home) / tool
    if out.resolve() == Path(home).resolve():
        raise UserError(f"--out {out} is the run's own folder; {tool} writes into a folder of its own "
                        f"(by default {Path(home) / tool}): choose another --out")
    return ToolOutput(out, overwrite=args.overwrite, own=own, flag="--out", tool=tool)


def split_features(args: argparse.Namespace, run: Any, out: Path) -> SplitFeatures:
    """The features of the run's ``--split``, with where its figures go (``out``) and the run's name."""
    split = run.split(args.split)
    features = run.features(split)
    name = run.run_dir.name if run.run_dir is not None else run.checkpoint.name
    return SplitFeatures(run, split, features, Path(out), name)
