"""Errors a user can fix, reported as one line with exit status 2 (the traceback only with ``--debug``)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from emcl.errors import UserError, UserValueError

__all__ = ["UserError", "UserValueError", "cli_main", "fail"]

T = TypeVar("T")


def cli_main(main: Callable[[list[str] | None], T], argv: Sequence[str] | None = None) -> T:
    """Run ``main(argv)``; a :class:`UserError` (or a missing file) prints ``error: ...`` and exits 2.

    With ``--debug`` among the arguments the exception propagates with its traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(args)
    except (UserError, FileNotFoundError) as e:
        if "--debug" in args:
            raise
        logging.getLogger("emcl").debug("user error", exc_info=True)
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def fail(message: str, *args: Any) -> None:
    """Raise a :class:`UserError` with ``message % args``."""
    raise UserError(message % args if args else message)
