"""The output folder: :func:`check_output_dir` reuses a folder holding an earlier run only with ``--resume``
or ``--overwrite``, and fails on a folder that cannot be written before any work; :data:`RESULT_FILES` are
the files a run writes there (what ``--overwrite`` removes, :func:`result_files` finds them)."""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from emcl.errors import UserError
from emcl.train.lock import RunLock

__all__ = ["RESULT_FILES", "RUN_MARKERS", "ToolOutput", "check_output_dir", "check_tool_output",
           "prepare_tool_folder", "remove_files", "result_files"]

log = logging.getLogger("emcl.guards")  # the name train.log has always shown for these lines

#: What a run writes into its output folder (glob patterns); ``--overwrite`` removes exactly these.
RESULT_FILES: tuple[str, ...] = (
    "metrics.json",
    "checkpoint_*.pt",
    "config.yaml",
    "train.log",
    "curves.png",
    "events.out.tfevents.*",
    ".*.tmp",  # leftovers of atomic writes (emcl.fileio) from a killed run
)


def _finished(metrics: Path) -> bool | None:
    """True / False from ``metrics.json``'s ``finished``; None when the file cannot be read as a mapping."""
    try:
        data = json.loads(metrics.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return data.get("finished") is True


def result_files(output_dir: str | os.PathLike[str], patterns: Iterable[str] = RESULT_FILES) -> list[Path]:
    """The files of ``output_dir`` (not below it) that match ``patterns``, sorted."""
    folder = Path(output_dir)
    found: set[Path] = set()
    for pattern in patterns:
        for p in glob.glob(os.path.join(glob.escape(str(folder)), pattern)):
            path = Path(p)
            if path.is_file() or path.is_symlink():
                found.add(path)
    return sorted(found)


def check_output_dir(
    output_dir: str | os.PathLike[str],
    resume: bool,
    overwrite: bool,
    result_patterns: Iterable[str] = RESULT_FILES,
    resumable: bool = True,
) -> list[Path]:
    """Make sure ``output_dir`` can take this run; returns the files ``--overwrite`` removed.

    - The folder is created if needed and must be writable (checked by creating a file in it), else
      :class:`UserError` naming it, before any work.
    - A folder holding a finished run (``metrics.json`` with ``"finished": true``), an unfinished one
      (``checkpoint_last.pt``) or other results of an earlier run (``metrics.json``, ``checkpoint_*.pt``)
      is not reused silently: without ``--resume`` or ``--overwrite`` this raises :class:`UserError`
      explaining both. ``--resume`` needs ``checkpoint_last.pt`` when earlier results are there (else it
      would start afresh over them).
    - With ``--overwrite`` the earlier run's result files (``result_patterns``, default
      :data:`RESULT_FILES`) are removed, each logged. Call this while holding the :class:`RunLock` and
      before opening ``train.log``. Tools that cannot resume (``resumable=False``) offer only
      ``--overwrite`` in the message.
    """
    folder = Path(output_dir)
    if resume and overwrite:
        raise UserError("--resume continues the run in the output folder, --overwrite discards it: pass one")
    prepare_tool_folder(folder, "--output_dir", subject=f"output folder {folder}", file_hint="")

    metrics, last = folder / "metrics.json", folder / "checkpoint_last.pt"
    checkpoints = sorted(p.name for p in folder.glob("checkpoint_*.pt"))
    finished = _finished(metrics) if metrics.is_file() else None
    if finished:
        what = "a finished run (metrics.json says finished)"
    elif last.is_file():
        what = "an unfinished run (checkpoint_last.pt)"
    elif metrics.is_file() or checkpoints:
        what = f"results of an earlier run ({', '.join(['metrics.json'] * metrics.is_file() + checkpoints)})"
    else:
        return []

    if overwrite:
        removed = result_files(folder, result_patterns)
        for path in removed:
            path.unlink(missing_ok=True)
        log.warning("--overwrite: removed %d file(s) of the earlier run in %s: %s", len(removed), folder,
                    ", ".join(p.name for p in removed))
        return removed
    if resume:
        if last.is_file():
            return []
        raise UserError(
            f"output folder {folder} holds {what} but no checkpoint_last.pt to resume from; pass "
            "--overwrite to replace it, or choose another --output_dir"
        )
    if not resumable:
        raise UserError(f"output folder {folder} already holds {what}. Pass --overwrite to replace its "
                        "results, or choose another --output_dir")
    raise UserError(
        f"output folder {folder} already holds {what}. Pass --resume to continue it from "
        "checkpoint_last.pt (settings that define the model or the experiment must match), --overwrite to "
        "delete its results and start again, or choose another --output_dir"
    )



# ---------------------------------------------------------------------- tools that write results
#: Files that mark a folder as holding a run's results (a trainer's, an evaluation's, a search index): a
#: tool never writes its own results beside them, and never removes them.
RUN_MARKERS: tuple[str, ...] = ("metrics.json", "checkpoint_*.pt", "index.json", "features.pt")


def _names(paths: Iterable[Path]) -> str:
    return ", ".join(p.name for p in paths)


def prepare_tool_folder(folder: str | os.PathLike[str], flag: str = "--out", *, subject: str | None = None,
                        file_hint: str = "; give a folder") -> Path:
    """Create ``folder`` if needed; :class:`UserError` naming ``flag`` when it is a file, cannot be created
    or is not writable. Called before the folder's lock is taken, so that these are said plainly."""
    folder = Path(folder)
    subject = subject or f"{flag} {folder}"
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} exists and is not a folder{file_hint}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write_test.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{subject} is not writable ({e.strerror or e}); fix its permissions or "
                        f"choose another {flag}") from None
    return folder


def check_tool_output(
    folder: str | os.PathLike[str],
    overwrite: bool,
    own: Iterable[str],
    flag: str = "--out",
    tool: str = "this tool",
    markers: Iterable[str] | None = None,
) -> list[Path]:
    """Make sure a tool's results may go to ``folder`` (call it holding the folder's lock); returns the
    earlier results of the tool that ``--overwrite`` replaces (the tool removes them when it writes).

    ``own`` (glob patterns) are the files the tool writes there; ``markers`` those of them that mean an
    earlier result is there (default: any of ``own`` except ``.*.tmp`` leftovers). A folder holding a run's
    results (:data:`RUN_MARKERS` that are not the tool's own) is refused even with ``--overwrite``: the
    tool never removes what it did not write. Its own earlier results are refused without ``--overwrite``.
    """
    folder = Path(folder)
    own = tuple(own)
    mine = result_files(folder, own)
    foreign = [p for p in result_files(folder, RUN_MARKERS) if p not in mine]
    if foreign:
        raise UserError(f"{flag} {folder} holds another run's results ({_names(foreign)}); {tool} writes "
                        f"into a folder of its own: choose another {flag}")
    marked = [p for p in mine if not p.name.endswith(".tmp")] if markers is None else result_files(folder,
                                                                                                   markers)
    if marked and not overwrite:
        raise UserError(f"{flag} {folder} already holds results of {tool} ({_names(marked)}). Pass "
                        f"--overwrite to replace them, or choose another {flag}")
    return mine if overwrite else []


def remove_files(paths: Iterable[Path], why: str = "--overwrite") -> list[Path]:
    """Remove ``paths`` (files an earlier call of a tool wrote), each logged; returns them."""
    removed = [p for p in paths if p.is_file() or p.is_symlink()]
    for path in removed:
        path.unlink(missing_ok=True)
    if removed:
        log.warning("%s: removed %d earlier file(s) in %s: %s", why, len(removed), removed[0].parent,
                    _names(removed))
    return removed


class ToolOutput:
    """The output folder of a tool that writes results (a table, a search index, figures), held for the
    tool's whole run: ``with ToolOutput(out, overwrite=..., own=(...)) as claim: ...; claim.clear(); write``.

    Entering checks the folder plainly (:func:`prepare_tool_folder`), takes its :class:`RunLock` (a second
    call on the same folder is refused at once, naming the holder) and checks its contents
    (:func:`check_tool_output`). :meth:`clear` removes the tool's earlier results (``--overwrite``) just
    before the new ones are written, so a call that fails before then keeps them. Leaving releases the
    lock however the tool ends, and removes the folder again when this call created it and it is empty.
    """

    def __init__(self, folder: str | os.PathLike[str], *, overwrite: bool, own: Iterable[str],
                 flag: str = "--out", tool: str = "this tool", markers: Iterable[str] | None = None) -> None:
        self.folder = Path(folder)
        self.overwrite, self.own, self.flag, self.tool = overwrite, tuple(own), flag, tool
        self.markers = None if markers is None else tuple(markers)
        self.earlier: list[Path] = []
        self.lock = RunLock(self.folder, flag=flag, resumable=False)
        self._created = False

    def __enter__(self) -> ToolOutput:
        self._created = not self.folder.exists()
        prepare_tool_folder(self.folder, self.flag)
        try:
            self.lock.acquire()
            self.earlier = check_tool_output(self.folder, self.overwrite, self.own, self.flag, self.tool,
                                             self.markers)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def clear(self) -> list[Path]:
        """Remove the earlier results that ``--overwrite`` replaces (once), the files that mark a result
        first (a crash in between leaves no marker beside half a result); returns them."""
        marks = self.markers or self.own
        first = sorted(self.earlier, key=lambda p: not any(fnmatch.fnmatch(p.name, m) for m in marks))
        removed, self.earlier = remove_files(first), []
        return removed

    def __exit__(self, *exc: Any) -> None:
        self.lock.release()
        if self._created and exc[0] is not None:
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # only when empty: nothing was written
