"""Loading the checkpoints that training writes (atomically, with :func:`emcl.fileio.save_torch`)."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emcl.errors import TASK_TITLES, UserError, describe_task


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file that cannot be read (corrupt, truncated or not a checkpoint)."""


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_torch`, with an error that names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # corrupt or foreign file: one line
        why = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {why}") from e


def checkpoint_task(checkpoint: Any) -> str | None:
    """The task that trained one of our checkpoints: its top-level ``task``, else (older checkpoints) its
    config's; None for anything else (the authors' files, a bare state dict)."""
    if not isinstance(checkpoint, dict):
        return None
    task = checkpoint.get("task")
    config = checkpoint.get("config")
    if not task and isinstance(config, dict):
        task = config.get("task")
    return str(task) if task else None


def check_checkpoint_task(checkpoint: Any, path: str | os.PathLike, expected: str, flag: str) -> None:
    """A checkpoint of another of our tasks given to ``flag`` is one line naming both tasks (and the entry
    point that reads it), before any model is built; checkpoints that name no task pass."""
    found = checkpoint_task(checkpoint)
    if found is None or found == expected:
        return
    module = checkpoint["config"].get("task_module") if isinstance(checkpoint.get("config"), dict) else None
    where = f" (python -m {module} reads it)" if module else ""
    title = TASK_TITLES.get(found, f"task '{found}'")
    raise UserError(f"{flag} {path} is a checkpoint of {describe_task(found)}, not of "
                    f"{describe_task(expected)}: its weights fit only {title}'s model{where}")


def random_states() -> dict[str, Any]:
    """This process's random states: Python, NumPy, torch's CPU generator and every CUDA device's. Saved
    in ``checkpoint_last.pt`` so that a resumed run draws what the uninterrupted run drew (dropout)."""
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_random_states(states: dict[str, Any]) -> None:
    """Undo :func:`random_states`: the generators continue where the checkpointed run left them."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])
