"""The output folder: :func:`check_output_dir` reuses a folder holding an earlier run only with ``--resume``
or ``--overwrite``, and fails on a folder that cannot be written before any work; :data:`RESULT_FILES` are
the files a run writes there (what ``--overwrite`` removes, :func:`result_files` finds them)."""

from __future__ import annotations

import glob
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from emcl.errors import UserError

__all__ = ["RESULT_FILES", "check_output_dir", "result_files"]

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
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--output_dir {folder} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write_test.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"output folder {folder} is not writable ({e.strerror or e}); fix its permissions "
                        "or choose another --output_dir") from None

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

