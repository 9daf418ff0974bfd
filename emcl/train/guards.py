"""Guards that keep a run from reporting a wrong result.

- :class:`RunLock`: one run per output folder (``.run.lock``, created atomically, held for the whole run).
- :func:`check_output_dir`: a folder holding an earlier run is reused only with ``--resume`` or
  ``--overwrite``; a folder that cannot be written fails before any work.
- :func:`setting_diffs` / :func:`check_settings`: a checkpoint's saved settings against the current ones.
- :func:`nonfinite_tensors`: non-finite weights are errors, never results.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import json
import logging
import math
import os
import shlex
import signal
import socket
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emcl.errors import UserError
from emcl.fileio import nonfinite_paths

if TYPE_CHECKING:
    import torch

__all__ = [
    "LOCK_NAME",
    "RESULT_FILES",
    "RunLock",
    "check_output_dir",
    "check_settings",
    "nonfinite_paths",
    "nonfinite_tensors",
    "setting_diffs",
]

log = logging.getLogger("emcl.guards")

LOCK_NAME = ".run.lock"

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


# ------------------------------------------------------------------------------------------------ lock
def _now() -> str:
    return _dt.datetime.now(_dt.UTC).astimezone().isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (epoch seconds), from /proc on Linux; None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 (starttime), counted after "pid (comm)"
        with open("/proc/stat") as fh:
            btime = next(int(line.split()[1]) for line in fh if line.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _started_epoch(started: Any) -> float | None:
    try:
        return _dt.datetime.fromisoformat(str(started)).timestamp()
    except (TypeError, ValueError):
        return None


_HELD: set[str] = set()  # lock files this process holds


class RunLock:
    """``output_dir/.run.lock``, created atomically (O_CREAT | O_EXCL), holding JSON
    ``{pid, host, started, argv, token}``; removed on exit.

    ``acquire`` raises :class:`UserError` when another run holds the folder (naming its pid, host and start
    time) or when a dead run on this host left the lock behind (stale: the message gives the ``rm`` command
    that clears it). The lock is released by ``release`` / leaving the ``with`` block, on exceptions
    (Ctrl-C included), on SIGTERM / SIGHUP (turned into ``SystemExit(128 + signal)`` when no other handler
    is installed, so the ``with`` block unwinds) and at interpreter exit. Only the process that took it
    removes it (DataLoader workers forked from it do not), and only while the file is still its own.
    """

    def __init__(self, output_dir: str | os.PathLike[str]) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_NAME
        self.held = False
        self.removed: list[Path] = []  # what check_output_dir removed (--overwrite), for the run's log
        self._owner_pid: int | None = None
        self._token: str | None = None
        self._old_handlers: dict[int, Any] = {}
        self._atexit_registered = False

    # -- the holder's record
    def _record(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _now(),
            "argv": list(sys.argv),
            "token": self._token,
        }

    def read(self) -> dict[str, Any] | None:
        """The current lock file's record, or None if there is none or it cannot be parsed."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _rm(self) -> str:
        return f"rm {shlex.quote(str(self.path))}"

    def _describe(self, rec: Mapping[str, Any]) -> str:
        argv = rec.get("argv")
        cmd = " ".join(shlex.quote(str(a)) for a in argv) if isinstance(argv, list) else "?"
        return (f"pid {rec.get('pid')} on host {rec.get('host')}, started {rec.get('started')} "
                f"(command: {cmd})")

    def _stale(self, rec: dict[str, Any]) -> bool:
        """Whether the lock's holder ran on this host and is gone (or its pid was reused since)."""
        if rec.get("host") != socket.gethostname():
            return False
        try:
            pid = int(rec.get("pid", -1))
        except (TypeError, ValueError):
            pid = -1
        # our own pid but not a lock this process holds: a pid reused after a restart (containers)
        stale = not _pid_alive(pid) or (pid == os.getpid() and str(self.path.resolve()) not in _HELD)
        if not stale:  # a live pid may be a reused one: compare its start with the lock's
            began, locked = _process_start(pid), _started_epoch(rec.get("started"))
            stale = began is not None and locked is not None and began > locked + 2.0
        return stale

    def _holder_error(self, rec: dict[str, Any] | None) -> UserError:
        if rec is None:
            return UserError(
                f"output folder {self.output_dir} is locked by another run, but its lock file {self.path} "
                f"cannot be read; if no run uses this folder, clear it with: {self._rm()}"
            )
        if rec.get("host") == socket.gethostname():
            if self._stale(rec):
                return UserError(
                    f"output folder {self.output_dir} has a stale lock: the run that took it "
                    f"({self._describe(rec)}) is no longer running. Pass --resume to continue that run "
                    f"(it takes the lock over), or check its results and clear the lock with: {self._rm()}"
                )
            return UserError(
                f"output folder {self.output_dir} is in use by another run: {self._describe(rec)}. "
                "Wait for it, stop it, or choose another --output_dir"
            )
        return UserError(
            f"output folder {self.output_dir} is in use by a run on another host: {self._describe(rec)}. "
            f"Wait for it or choose another --output_dir; if that run is gone, clear the lock with: "
            f"{self._rm()}"
        )

    # -- acquire / release
    def acquire(self, take_stale: bool = False) -> RunLock:
        """Take the lock or raise :class:`UserError` naming the holder (or the stale lock).

        ``take_stale`` (``--resume``: a requeued job continuing after its predecessor was killed) takes
        over a stale lock of this host with a warning instead of refusing.
        """
        if self.held:
            return self
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create output folder {self.output_dir}: {e.strerror or e}") from None
        self._token = uuid.uuid4().hex
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            rec = self.read()
            if rec is None:  # another run is between creating and writing it: look again shortly
                for _ in range(20):
                    threading.Event().wait(0.05)
                    rec = self.read()
                    if rec is not None or not self.path.exists():
                        break
            if take_stale and rec is not None and self._stale(rec):
                if self._remove_stale(rec):
                    log.warning("taking over the stale lock of a run that is gone (%s)", self._describe(rec))
                    return self.acquire()
                rec = self.read()  # another run took it over first
            raise self._holder_error(rec) from None
        except OSError as e:
            raise UserError(f"output folder {self.output_dir} is not writable: cannot create "
                            f"{self.path} ({e.strerror or e})") from None
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(self._record(), fh)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        self.held = True
        self._owner_pid = os.getpid()
        _HELD.add(str(self.path.resolve()))
        self._install_handlers()
        if not self._atexit_registered:
            import atexit

            atexit.register(self.release)
            self._atexit_registered = True
        return self

    def _remove_stale(self, rec: dict[str, Any]) -> bool:
        """Remove the lock file if it still holds the stale record ``rec``; two runs taking over the same
        stale lock cannot both succeed (the file is renamed away first, atomically)."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale.{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True  # someone else removed it: race for a fresh one
        try:
            same = json.loads(aside.read_text()) == rec
        except (OSError, ValueError):
            same = False
        if same:
            aside.unlink(missing_ok=True)
            return True
        with contextlib.suppress(FileExistsError):  # a fresh lock of another run: put it back (no clobber)
            os.link(aside, self.path)
        aside.unlink(missing_ok=True)
        return False

    def release(self) -> None:
        """Remove the lock if this process holds it and the file is still the one it wrote."""
        if not self.held or os.getpid() != self._owner_pid:
            return
        self.held = False
        _HELD.discard(str(self.path.resolve()))
        self._restore_handlers()
        rec = self.read()
        if rec is None or rec.get("token") == self._token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        else:
            log.warning("%s now belongs to another run (%s); left in place", self.path, self._describe(rec))

    # -- signals: SIGTERM / SIGHUP unwind the stack like Ctrl-C does, so files close and the lock goes
    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for name in ("SIGTERM", "SIGHUP"):
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            try:
                old = signal.getsignal(sig)
                if old not in (signal.SIG_DFL, None):
                    continue  # someone else handles it: leave theirs alone
                signal.signal(sig, _raise_exit)
                self._old_handlers[sig] = old
            except (ValueError, OSError):
                continue

    def _restore_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, old in self._old_handlers.items():
            with contextlib.suppress(ValueError, OSError):
                if signal.getsignal(sig) is _raise_exit:
                    signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old_handlers.clear()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _raise_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


# ---------------------------------------------------------------------------------------- output folder
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


# ------------------------------------------------------------------------------------- settings compare
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


# ------------------------------------------------------------------------------------------ non-finite
def nonfinite_tensors(tensors: torch.nn.Module | Mapping[str, Any], limit: int = 10) -> list[str]:
    """Names of (at most ``limit``) floating-point parameters, buffers or state-dict entries holding a
    NaN or infinite value."""
    import torch

    items = tensors.state_dict().items() if isinstance(tensors, torch.nn.Module) else tensors.items()
    bad = []
    for name, t in items:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.append(str(name))
            if len(bad) >= limit:
                break
    return bad


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


# --------------------------------------------------------------------------------------------- preflight
def _argv_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def refuse_busy_output_dir(argv: list[str]) -> None:
    """Exit with status 2 at once when another live run holds ``--output_dir``'s lock.

    Called by the entry points before their heavy imports (torch, open_clip: seconds), so a second run
    started on a busy folder stops within a second. Only a live holder is refused here; a stale lock,
    a free folder or an unreadable config go on to the full checks of the run loop.
    """
    out = _argv_value(argv, "--output_dir")
    config = _argv_value(argv, "--config")
    if out is None and config:
        try:
            import yaml

            with open(config) as fh:
                out = (yaml.safe_load(fh) or {}).get("output_dir")
        except Exception:  # the run loop reports a bad config properly
            return
    if not out:
        return
    lock = RunLock(out)
    rec = lock.read()
    if rec is None or lock._stale(rec):
        return
    print(f"error: {lock._holder_error(rec)}", file=sys.stderr, flush=True)
    raise SystemExit(2)
