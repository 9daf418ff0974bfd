"""Errors a user can fix: bad input, a bad flag or a bad setting.

:class:`UserError` lives here, below every other package, so that ``emcl.data`` and ``emcl.clip`` can raise
it without importing ``emcl.train``; :func:`emcl.train.errors.cli_main` prints it as one line and exits 2.
Subclasses that also derive from a built-in error (``ValueError``, ``RuntimeError``) keep older
``except ValueError`` callers working.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input, a bad flag or a bad setting: the message names what to fix."""


class UserValueError(UserError, ValueError):
    """A :class:`UserError` that is also a ``ValueError`` (bad values in a user's file or config)."""
