"""Atomic file writes: through a temporary file in the same folder, then a rename, so a reader (or a
crash) never leaves half a file. Used for checkpoints, result files and generated annotation files."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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
    return atomic_write(path, lambda fh: torch.save(obj, fh))


def save_json(obj: Any, path: str | os.PathLike) -> Path:
    """JSON (indented, sorted keys kept in insertion order) written atomically."""
    return atomic_write(path, lambda fh: fh.write((json.dumps(obj, indent=2) + "\n").encode()))


def save_yaml(obj: Any, path: str | os.PathLike) -> Path:
    """YAML written atomically."""
    return atomic_write(path, lambda fh: fh.write(yaml.safe_dump(obj, sort_keys=False).encode()))
