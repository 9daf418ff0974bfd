"""Run logging: a log file in the output folder on rank 0, console on every rank (warnings only off 0)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def setup_logging(output_dir: str | Path | None, rank: int = 0, name: str = "train.log") -> logging.Logger:
    """Configure the root logger once per process and return the ``emcl`` logger."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    root.addHandler(console)
    if output_dir is not None and rank == 0:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(Path(output_dir) / name)
        fh.setFormatter(fmt)
        root.addHandler(fh)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    return logging.getLogger("emcl")
