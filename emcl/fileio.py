"""Atomic file writes: through a temporary file in the same folder, then a rename, so a reader (or a
crash) never leaves half a file. Used for checkpoints, result files and generated annotation files."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are as readable as any new file
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Bytes written atomically."""
    return atomic_write(path, lambda fh: fh.write(data))


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically."""
    import torch  # here, so that the JSON/YAML writers (and the run lock) load without torch

    return atomic_write(path, lambda fh: torch.save(obj, fh))


def nonfinite_paths(obj: Any, prefix: str = "") -> list[str]:
    """Where ``obj`` (nested dicts, lists, tuples) holds a NaN or infinite float: ``"a.b[2]=nan"`` each."""
    found: list[str] = []
    if isinstance(obj, float):
        if not math.isfinite(obj):
            found.append(f"{prefix or '<value>'}={obj}")
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            found += nonfinite_paths(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found += nonfinite_paths(v, f"{prefix}[{i}]")
    return found


def save_json(obj: Any, path: str | os.PathLike) -> Path:
    """Strict JSON (indented, keys in insertion order) written atomically.

    A NaN or infinite float is refused, not written: ``ValueError`` naming the file and each key path
    (``train.history[0].loss=nan``). Results must never hold NaN, and ``NaN`` is not JSON; the run loop
    stops on a non-finite loss before it gets here. Nothing is written when this raises.
    """
    bad = nonfinite_paths(obj)
    if bad:
        shown = ", ".join(bad[:10]) + (f" (and {len(bad) - 10} more)" if len(bad) > 10 else "")
        raise ValueError(f"{path}: refusing to write non-finite value(s) to JSON: {shown}")
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    return atomic_write(path, lambda fh: fh.write(text.encode()))


def save_yaml(obj: Any, path: str | os.PathLike) -> Path:
    """YAML written atomically."""
    return atomic_write(path, lambda fh: fh.write(yaml.safe_dump(obj, sort_keys=False).encode()))
