"""Figures drawn from runs: the modality-gap figure, retrieval examples and training curves.

Every figure goes through :mod:`emcl.viz.plot` (matplotlib, Agg backend, one style, atomic PNG writes).
The figure commands that read a trained run start with :func:`load_split_features`.
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
    """A figure command's parser with the flags of a finished run (``add_run_arguments``)."""
    from emcl.train.runs import add_run_arguments

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p)
    return p


def load_split_features(args: argparse.Namespace) -> SplitFeatures:
    """The run named by a figure command's flags (:func:`run_parser`) and the features of its ``--split``;
    figures go to ``--out``, else the run folder, else the checkpoint's."""
    from emcl.train.runs import load_run_from_args

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run = load_run_from_args(args)
    split = run.split(args.split)
    features = run.features(split)
    out = Path(args.out) if args.out else (run.run_dir or run.checkpoint.parent)
    name = run.run_dir.name if run.run_dir is not None else run.checkpoint.name
    return SplitFeatures(run, split, features, out, name)
