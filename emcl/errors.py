"""Errors a user can fix (bad input, a bad flag or a bad setting), and how entry points report them.

:class:`UserError` lives here, below every other package, so that every layer can raise it without
importing a higher one; :func:`cli_main` prints it as one line and exits 2. Subclasses that also derive
from a built-in error (``ValueError``, ``RuntimeError``) keep older ``except ValueError`` callers working.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn, TypeVar

__all__ = ["TASK_TITLES", "OneLineParser", "UserError", "UserValueError", "cli_main", "describe_task"]

T = TypeVar("T")


class UserError(Exception):
    """Bad input, a bad flag or a bad setting: the message names what to fix."""


class UserValueError(UserError, ValueError):
    """A :class:`UserError` that is also a ``ValueError`` (bad values in a user's file or config)."""


#: How messages name the tasks whose checkpoints a user may mix up (a checkpoint's ``task``).
TASK_TITLES = {"retrieval": "EMCL-Net", "qa": "EMCL-QA", "joint": "MMT joint training"}


def describe_task(name: str) -> str:
    """``EMCL-QA (task 'qa')``: a task as error messages name it."""
    title = TASK_TITLES.get(name)
    return f"{title} (task '{name}')" if title else f"task '{name}'"


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``error: argument --lr: ...`` (exit status 2), like
    every other error a user can fix: no usage block of forty lines to scroll past (``--help`` has it).
    Sub-command parsers made by ``add_subparsers`` are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}\n")


def cli_main(main: Callable[[list[str] | None], T], argv: Sequence[str] | None = None) -> T:
    """Run ``main(argv)``; a :class:`UserError` (or a missing file) prints ``error: ...`` and exits 2,
    Ctrl-C prints one line and exits 130. With ``--debug`` among the arguments the exception propagates
    with its traceback.
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
    except KeyboardInterrupt:
        if "--debug" in args:
            raise
        print("interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
