"""What the table scripts (``scripts/multiseed.py``, ``emcl_table.py``, ``paper_table.py``) share: launching
training runs as sub-processes, reading what a finished run wrote (``metrics.json``, ``config.yaml``),
markdown tables, writing a table as ``.md`` + ``.json``, each atomically, and the table's folder
(:class:`TableFolder`) with its record of the runs it started (:class:`SubRuns`).

A sub-run is a command line (``python -m MODULE ...``, or through torchrun), never an import: each run
gets its own process, its own log and its own exit status.

The table's folder follows the rule of every tool that writes results: the script holds its lock while it
works (a second call on it is refused at once), a folder holding a finished table is refused unless
``--overwrite``, and files are written atomically. The script never passes ``--overwrite`` to a sub-run.
Each sub-run folder is one of three things:

- empty or absent: the run is started (and recorded in ``OUT/sub_runs.json`` first);
- recorded in ``sub_runs.json`` with the very same command (and the same settings files) and holding its
  results: it is reused, not run again (an interrupted table continues where it stopped);
- anything else holding results (a run the table did not start, one started with other settings, an
  unfinished one): refused, naming the folder, before any run starts.

``--overwrite`` given to the table removes the table's own files and the sub-run folders its record
names (only those: a folder the table did not start is never removed), then starts every run afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from emcl.errors import UserError
from emcl.fileio import save_bytes, save_json
from emcl.train.outdir import ToolOutput, result_files

log = logging.getLogger("emcl.train.tables")

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


# ----------------------------------------------------------------------------------- the table folder
RECORD = "sub_runs.json"
RECORD_FORMAT = "emcl-table-sub-runs"
#: What marks a folder as holding a run's results.
RUN_RESULTS = ("metrics.json", "checkpoint_*.pt")
SETTINGS_ENDINGS = (".yaml", ".yml", ".json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class SubRuns:
    """The table's record of the runs it started, ``OUT/sub_runs.json``: per sub-run folder (by name) the
    command (the interpreter and the ``--output_dir`` value left out) and the sha256 of every settings file
    the command names (``.yaml``, ``.yml``, ``.json``). See the module's docstring for how it is used."""

    def __init__(self, out: str | os.PathLike, cwd: str | os.PathLike) -> None:
        self.out, self.cwd = Path(out), Path(cwd)
        self.path = self.out / RECORD
        self.runs: dict[str, dict[str, Any]] = self._read()
        self.removed: set[str] = set()
        self._forgotten: list[Path] = []
        self._lock = threading.Lock()

    def _read(self) -> dict[str, dict[str, Any]]:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            data = None
        runs = data.get("runs") if isinstance(data, dict) and data.get("format") == RECORD_FORMAT else None
        if not isinstance(runs, dict):
            raise UserError(f"{self.path}: not a readable record of the table's runs; move the folder away "
                            "or choose another --output_dir")
        return runs

    def entry(self, cmd: Sequence[str]) -> dict[str, Any]:
        """What is recorded of a run started with ``cmd``."""
        argv = list(cmd[1:])
        for i, arg in enumerate(argv[:-1]):
            if arg == "--output_dir":
                argv[i + 1] = "OUT"
        files = {}
        for arg in argv:
            path = Path(arg) if os.path.isabs(arg) else self.cwd / arg
            if arg.endswith(SETTINGS_ENDINGS) and path.is_file():
                files[arg] = _sha256(path)
        return {"command": argv, "settings_files": files}

    def plan(self, name: str, cmd: Sequence[str], finished: Callable[[Path], bool]) -> bool:
        """Whether sub-run folder ``name`` holds this very run, finished (True: reuse it) or nothing (False:
        run it); :class:`UserError` naming the folder when it holds any other results."""
        folder = self.out / name
        found = result_files(folder, RUN_RESULTS)
        if not found or name in self.removed:
            return False
        held = f"sub-run folder {folder} holds results ({', '.join(p.name for p in found)})"
        recorded = self.runs.get(name)
        if recorded is None:
            raise UserError(f"{held} of a run this table did not start (it is not in {self.path}); the table "
                            "neither reuses nor removes it: move it away, or choose another --output_dir")
        want = self.entry(cmd)
        if {k: recorded.get(k) for k in want} != want:
            changed = [f for f in ("command", "settings_files") if recorded.get(f) != want[f]]
            raise UserError(f"{held} of a run started with other settings ({' and '.join(changed)} "
                            "differ); pass --overwrite to the table to start its runs again, or choose "
                            "another --output_dir")
        if not finished(folder):
            raise UserError(f"{held} of an unfinished run; finish it with the same command and --resume, "
                            "or pass --overwrite to the table to start its runs again")
        return True

    def started(self, name: str, cmd: Sequence[str]) -> None:
        """Record a run before it starts."""
        with self._lock:
            self.runs[name] = {**self.entry(cmd), "finished": False}
            self._save()

    def finished(self, name: str, seconds: float) -> None:
        """Mark a recorded run finished, with its seconds."""
        with self._lock:
            self.runs[name].update(finished=True, seconds=round(seconds, 1))
            self._save()

    def seconds(self, name: str) -> float | None:
        """The recorded seconds of a finished run; None when unknown."""
        return self.runs.get(name, {}).get("seconds")

    def _save(self) -> None:
        save_json({"format": RECORD_FORMAT, "version": 1, "runs": self.runs}, self.path)

    def forget(self) -> list[Path]:
        """``--overwrite``: treat the recorded runs as gone (their folders are to be run afresh) without
        removing anything yet; :meth:`remove_forgotten` removes them. Returns their folders."""
        self.removed |= set(self.runs)
        self._forgotten = [self.out / n for n in self.runs if Path(n).name == n and (self.out / n).is_dir()
                           and not (self.out / n).is_symlink()]
        self.runs = {}
        return self._forgotten

    def remove_forgotten(self) -> list[Path]:
        """Remove the folders of the runs :meth:`forget` set aside (folders directly in the table's folder,
        not links), and the record; returns them."""
        folders, self._forgotten = self._forgotten, []
        for folder in folders:
            shutil.rmtree(folder)
        self.path.unlink(missing_ok=True)
        if folders:
            log.warning("--overwrite: removed the table's earlier runs: %s", ", ".join(map(str, folders)))
        return folders


class TableFolder(ToolOutput):
    """A table script's output folder (``--output_dir``), held for the script's whole run:
    ``with TableFolder(out, ...) as table:`` takes its lock, refuses a folder holding a finished table
    (``table_files``) unless ``overwrite`` and one holding a run's results at its top level always, and
    reads the record of its sub-runs (``table.record``). The script then checks every sub-run folder
    (``table.record.plan``) and calls :meth:`begin`, which with ``overwrite`` removes the table's own files
    (the table, the run logs ``logs``, the record) and its recorded sub-run folders: a refusal comes before
    anything is removed."""

    def __init__(self, out: str | os.PathLike, *, overwrite: bool, table_files: Sequence[str], tool: str,
                 cwd: str | os.PathLike, logs: Sequence[str] = ()) -> None:
        super().__init__(out, overwrite=overwrite, own=(*table_files, *logs, RECORD, ".*.tmp"),
                         flag="--output_dir", tool=tool, markers=table_files)
        self.cwd = Path(cwd)
        self.record = SubRuns(self.folder, self.cwd)

    def __enter__(self) -> TableFolder:
        super().__enter__()
        try:
            self.record = SubRuns(self.folder, self.cwd)  # read again, now that the folder is ours
            if self.overwrite:
                self.record.forget()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def begin(self) -> None:
        """After the sub-run folders were checked: with ``overwrite``, remove the earlier table."""
        if self.overwrite:
            self.record.remove_forgotten()
            self.clear()
