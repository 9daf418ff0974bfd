"""A checkpoint's settings against the current ones: :func:`setting_diffs`, :func:`check_settings`, and
:func:`state_dict_mismatch` for weights that do not fit the model."""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from emcl.errors import UserError

__all__ = ["check_settings", "setting_diffs", "state_dict_mismatch"]

log = logging.getLogger("emcl.guards")  # the name train.log has always shown for these lines

_MISSING = object()


def _fmt(v: Any) -> str:
    if v is _MISSING:
        return "unset"
    if isinstance(v, str):
        return v if v and v.strip() == v else repr(v)
    return str(v)


def _same_path(a: str, b: str) -> bool:
    try:
        return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))
    except (OSError, ValueError):
        return False


def _same(a: Any, b: Any, rel_tol: float, abs_tol: float) -> bool:
    if a is _MISSING or b is _MISSING:
        return a is b
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if isinstance(a, float) or isinstance(b, float):
            if math.isnan(a) or math.isnan(b):
                return math.isnan(a) and math.isnan(b)
            return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)
        return a == b
    if isinstance(a, (str, os.PathLike)) and isinstance(b, (str, os.PathLike)):
        sa, sb = os.fspath(a), os.fspath(b)
        return sa == sb or (bool(sa) and bool(sb) and _same_path(sa, sb))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y, rel_tol, abs_tol) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(_same(a[k], b[k], rel_tol, abs_tol) for k in a)
    return a == b


def setting_diffs(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    keys: Iterable[str],
    rel_tol: float = 1e-6,
    abs_tol: float = 1e-12,
) -> list[str]:
    """``"key: old → new"`` for each of ``keys`` whose value differs between ``saved`` and ``current``.

    Floats agree within ``rel_tol`` / ``abs_tol``; ints and floats compare by value (``3`` = ``3.0``);
    strings that differ are compared again as resolved paths; a key absent on one side shows as
    ``unset``. Nested mappings (e.g. ``clip_config``) are compared key by key, shown as ``outer.inner``.
    """
    out: list[str] = []
    for key in keys:
        old, new = saved.get(key, _MISSING), current.get(key, _MISSING)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            out += [f"{key}.{line}" for line in setting_diffs(old, new, sorted(set(old) | set(new), key=str),
                                                               rel_tol, abs_tol)]
        elif not _same(old, new, rel_tol, abs_tol):
            out.append(f"{key}: {_fmt(old)} → {_fmt(new)}")
    return out


def check_settings(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    must_match: Iterable[str],
    may_change: Iterable[str],
    source: str,
    action: str,
) -> list[str]:
    """Raise :class:`UserError` listing every ``must_match`` setting that differs; log the others.

    ``source`` names where ``saved`` comes from (``"checkpoint runs/a/checkpoint_last.pt"``), ``action``
    says what to do about a mismatch (``"use the same settings to --resume it, or another --output_dir"``).
    Returns the allowed changes (``may_change`` keys that differ), which are logged.
    """
    bad = setting_diffs(saved, current, must_match)
    if bad:
        raise UserError(f"{source} was trained with other settings (old → this run): {'; '.join(bad)}. "
                        f"{action}")
    changed = setting_diffs(saved, current, may_change)
    if changed:
        log.info("%s: allowed change(s) from its settings: %s", source, "; ".join(changed))
    return changed



def state_dict_mismatch(expected: Mapping[str, Any], loaded: Mapping[str, Any], limit: int = 5) -> str:
    """One line saying why ``loaded`` does not fit a model whose state dict is ``expected``: tensors of
    another shape, missing and unexpected keys (the first ``limit`` of each); "" when it fits."""
    shape = [
        f"{k}: {tuple(v.shape)} in the file, {tuple(expected[k].shape)} in the model"
        for k, v in loaded.items()
        if k in expected and hasattr(v, "shape") and hasattr(expected[k], "shape")
        and tuple(v.shape) != tuple(expected[k].shape)
    ]
    missing = [k for k in expected if k not in loaded]
    unexpected = [k for k in loaded if k not in expected]
    parts = []

    def some(keys: list[str]) -> str:
        return ", ".join(keys[:limit]) + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")

    if shape:
        parts.append(f"{len(shape)} tensor(s) of another shape: " + "; ".join(shape[:limit])
                     + (f" (and {len(shape) - limit} more)" if len(shape) > limit else ""))
    if missing:
        parts.append(f"{len(missing)} missing: {some(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {some(unexpected)}")
    return "; ".join(parts)


def config_dict(cfg: argparse.Namespace) -> dict[str, Any]:
    """The run's settings as saved in ``config.yaml`` and checkpoints (private keys left out)."""
    return {k: v for k, v in vars(cfg).items() if not k.startswith("_")}


def saved_config(ck: dict, path: str | Path) -> dict[str, Any] | None:
    """The settings a checkpoint was made with (None, with a warning, when it holds none)."""
    saved = ck.get("config") if isinstance(ck, dict) else None
    if saved is None:
        log.warning("%s holds no saved config: its settings cannot be checked against this run's", path)
    return saved
