"""Loading the checkpoints that training writes (atomically, with :func:`emcl.fileio.save_torch`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from emcl.errors import UserError


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file that cannot be read (corrupt, truncated or not a checkpoint)."""


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_torch`, with an error that names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # corrupt or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
