"""One run per output folder: :class:`RunLock` (``.run.lock``, created atomically, held for the whole run,
released on exit, exceptions and SIGTERM / SIGHUP) and :func:`refuse_busy_output_dir`, the entry points'
check before their heavy imports.

This module imports neither torch nor anything that does: the entry points call
:func:`refuse_busy_output_dir` before torch is loaded.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import shlex
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from emcl.errors import UserError

__all__ = ["LOCK_NAME", "RunLock", "refuse_busy_output_dir"]

log = logging.getLogger("emcl.guards")  # the name train.log has always shown for these lines

LOCK_NAME = ".run.lock"


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

    def __init__(self, output_dir: str | os.PathLike[str], flag: str = "--output_dir",
                 resumable: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.flag = flag  # the flag that names the folder, in messages
        self.resumable = resumable  # whether --resume can take a stale lock over (trainers)
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
                resume = "Pass --resume to continue that run (it takes the lock over), or check" \
                    if self.resumable else "Check"
                return UserError(
                    f"output folder {self.output_dir} has a stale lock: the run that took it "
                    f"({self._describe(rec)}) is no longer running. {resume} its results and clear the "
                    f"lock with: {self._rm()}"
                )
            return UserError(
                f"output folder {self.output_dir} is in use by another run: {self._describe(rec)}. "
                f"Wait for it, stop it, or choose another {self.flag}"
            )
        return UserError(
            f"output folder {self.output_dir} is in use by a run on another host: {self._describe(rec)}. "
            f"Wait for it or choose another {self.flag}; if that run is gone, clear the lock with: "
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
        if self.output_dir.exists() and not self.output_dir.is_dir():
            kind = "a file, not a folder" if self.output_dir.is_file() else "not a folder"
            raise UserError(f"--output_dir {self.output_dir} is {kind}: choose another --output_dir")
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
