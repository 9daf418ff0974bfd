"""Progress bars drawn only on a terminal.

With output redirected (a SLURM job, ``> run.log``), tqdm's carriage-return updates would land in the file
as thousands of lines. There the periodic log lines carry the progress instead (training: step, loss,
clips/s, ETA every ``--n_display`` steps), so a bar is drawn only when standard error is a terminal.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

__all__ = ["bar", "on_terminal"]


def on_terminal() -> bool:
    """Whether standard error is a terminal (where a progress bar can redraw itself in place)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def bar(iterable: Iterable[Any] | None = None, *, show: bool = True, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``, disabled unless ``show`` and standard error is a terminal."""
    return tqdm(iterable, disable=not (show and on_terminal()), **kwargs)
