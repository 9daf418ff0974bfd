"""What the table scripts (``scripts/multiseed.py``, ``emcl_table.py``, ``paper_table.py``) share: launching
training runs as sub-processes, reading what a finished run wrote (``metrics.json``, ``config.yaml``),
markdown tables, and writing a table as ``.md`` + ``.json``, each atomically.

A sub-run is a command line (``python -m MODULE ...``, or through torchrun), never an import: each run
gets its own process, its own log and its own exit status.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from emcl.fileio import save_bytes, save_json

T = TypeVar("T")
R = TypeVar("R")


# ------------------------------------------------------------------------------------------ sub-runs
def module_command(module: str, argv: Sequence[str], nproc_per_node: int = 1) -> list[str]:
    """``python -m module argv...``; with ``nproc_per_node > 1`` through ``torch.distributed.run
    --standalone`` (torchrun), one process per device."""
    launch = [sys.executable, "-m", module]
    if nproc_per_node > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc_per_node", str(nproc_per_node), "-m", module]
    return [*launch, *argv]


@dataclass
class SubRun:
    """One training run launched by a table script: its name in messages (``seed 1``), its command, its
    output folder and, when given, the file that takes its stdout and stderr (else they go to ours)."""

    name: str
    cmd: list[str]
    run_dir: Path
    log: Path | None = None


def launch(run: SubRun, cwd: str | os.PathLike, env: dict[str, str] | None = None,
           runner: Callable[..., Any] = subprocess.run) -> float:
    """Run one sub-run to its end; returns its seconds. A failed run stops the script (``SystemExit``)
    naming the run, its exit status and where to look. ``runner`` is called like ``subprocess.run(cmd,
    cwd=...)`` (tests pass a fake)."""
    kwargs: dict[str, Any] = {} if env is None else {"env": env}
    t0 = time.perf_counter()
    if run.log is None:
        proc = runner(run.cmd, cwd=str(cwd), **kwargs)
    else:
        with open(run.log, "w") as fh:
            proc = runner(run.cmd, cwd=str(cwd), stdout=fh, stderr=subprocess.STDOUT, **kwargs)
    if proc.returncode != 0:
        raise SystemExit(f"{run.name} failed (exit status {proc.returncode}); see {run.log or run.run_dir}")
    return time.perf_counter() - t0


def run_lanes(lanes: Sequence[Sequence[T]], work: Callable[[T], R], jobs: int = 1) -> list[R]:
    """``work`` over every item: the lanes side by side on ``jobs`` threads, each lane's items one after
    the other (a lane's later runs may reuse what its first wrote). Results in lane order, then item
    order; the first failure is raised once its lane stops."""
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        done = pool.map(lambda lane: [work(item) for item in lane], lanes)
        return [r for lane in done for r in lane]


# -------------------------------------------------------------------------------------- run files
class RunFileError(ValueError):
    """A file of a run that cannot be used (missing, not JSON, not YAML, lacking results); the message
    names it."""


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object from ``path`` (a run's ``metrics.json``); :class:`RunFileError` naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise RunFileError(f"{path}: cannot read: {e}") from None
    except ValueError as e:
        raise RunFileError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RunFileError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's ``config.yaml`` as a dict; ``{}`` when there is none (or it holds no mapping)."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RunFileError(f"{path}: not valid YAML: {e}") from None
    return data if isinstance(data, dict) else {}


def has_results(run_dir: str | os.PathLike, split: str) -> bool:
    """Whether the run's ``metrics.json`` holds results for ``split`` (a finished run)."""
    try:
        return isinstance(read_json(Path(run_dir) / "metrics.json").get(split), dict)
    except RunFileError:
        return False


def numbers(row: dict[str, Any], keys: Sequence[str] | None = None) -> dict[str, float]:
    """The numeric entries of a result row (``{"R1": 46.8, ...}``) as floats, booleans not counted; only
    ``keys``, in that order, when given."""
    keys = list(row) if keys is None else keys
    return {k: float(row[k]) for k in keys
            if isinstance(row.get(k), int | float) and not isinstance(row.get(k), bool)}


# ---------------------------------------------------------------------------------------- tables
def markdown_row(cells: Sequence[str]) -> str:
    """``| a | b | c |``."""
    return "| " + " | ".join(cells) + " |"


def markdown_table(
    head: Sequence[str], rows: Sequence[Sequence[str]], right_from: int | None = None
) -> list[str]:
    """The lines of a markdown table; columns from ``right_from`` on are right-aligned (``---:``)."""
    align = ["---" if right_from is None or i < right_from else "---:" for i in range(len(head))]
    return [markdown_row(head), "|" + "".join(a + "|" for a in align), *(markdown_row(r) for r in rows)]


def number_cell(value: float | None, signed: bool = False) -> str:
    """One decimal (with its sign when ``signed``); ``-`` for a number that is not there."""
    if value is None:
        return "-"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def write_table(stem: str | os.PathLike, markdown: str, data: Any) -> tuple[Path, Path]:
    """``STEM.md`` and ``STEM.json``, each written atomically (the JSON first: it refuses NaN, and then
    neither is written). Returns (markdown path, JSON path)."""
    stem = Path(stem)
    js = save_json(data, stem.with_name(stem.name + ".json"))
    md = save_bytes(markdown.encode(), stem.with_name(stem.name + ".md"))
    return md, js
