"""How worker processes start: the one place every DataLoader or pool that decodes video takes it from.

A process that has decoded video is multi-threaded (FFmpeg's decoder threads, torch's thread pool). A
child *forked* from it inherits locks that other threads held at that instant and can deadlock on them:
with PyAV 19, a DataLoader worker forked after the parent decoded a clip hangs for good inside
``frame.to_ndarray``. So workers start from a clean process instead:

- ``forkserver`` (the default where the platform has it, and Python 3.14's own default on Linux): one
  single-threaded server process is started once, imports torch and the data layer, and forks each
  worker from itself, so a worker starts in milliseconds without re-importing torch;
- ``spawn`` elsewhere (macOS, Windows).

``EMCL_WORKER_START=fork|forkserver|spawn`` overrides the choice (``fork`` is safe only in a parent that
has not decoded anything). Datasets and everything they hold must be picklable: workers receive them
pickled.
"""

from __future__ import annotations

import multiprocessing
import os
from multiprocessing.context import BaseContext

from emcl.errors import UserValueError

__all__ = ["START_ENV", "loader_context", "start_method", "worker_context"]

START_ENV = "EMCL_WORKER_START"
# imported once by the fork server, so the workers it forks start with them in memory
_PRELOAD = ["__main__", "torch", "numpy", "emcl.data.datasets", "emcl.data.cache", "emcl.data.frames",
            "emcl.data.sources"]


def start_method() -> str:
    """The start method for worker processes: ``$EMCL_WORKER_START``, else forkserver, else spawn."""
    available = multiprocessing.get_all_start_methods()
    chosen = os.environ.get(START_ENV, "").strip()
    if chosen:
        if chosen not in available:
            raise UserValueError(f"{START_ENV}={chosen!r}: this platform offers {', '.join(available)}")
        return chosen
    return "forkserver" if "forkserver" in available else "spawn"


def worker_context() -> BaseContext:
    """The multiprocessing context for DataLoader workers and process pools (see the module docstring)."""
    method = start_method()
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(_PRELOAD)  # takes effect when the server first starts
    return ctx


def loader_context(workers: int) -> BaseContext | None:
    """``DataLoader(multiprocessing_context=...)`` for ``workers`` worker processes (None without any)."""
    return worker_context() if workers > 0 else None
