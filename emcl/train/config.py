"""Flags and YAML configs: a config file sets defaults, flags given on the command line override it."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ValueError(f"config {path}: expected a mapping of option names to values, got {kind}")
    return data


def parse_args(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    extra_keys: Iterable[str] = (),
) -> argparse.Namespace:
    """Parse ``argv``; values from ``--config FILE.yaml`` become the defaults that flags override.

    Keys of the file must be flag names (without dashes) or one of ``extra_keys`` (nested settings such
    as a model config); anything else is an error naming the file and the key.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    extra_keys = set(extra_keys)
    extras: dict[str, Any] = {k: None for k in extra_keys}
    if known.config:
        data = load_yaml(known.config)
        flags = {a.dest for a in parser._actions}
        unknown = sorted(set(data) - flags - extra_keys)
        if unknown:
            raise ValueError(f"config {known.config}: unknown option(s) {', '.join(unknown)}")
        parser.set_defaults(**{k: v for k, v in data.items() if k in flags})
        extras.update({k: v for k, v in data.items() if k in extra_keys})
    args = parser.parse_args(argv)
    for k, v in extras.items():
        setattr(args, k, v)
    return args
