"""Flags and YAML configs: a config file sets defaults, flags given on the command line override it.

Values from a config file go through the same checks as the command line: each is run through its flag's
argparse ``type`` (e.g. :func:`positive_int`) and ``choices``, and ``store_true`` flags take YAML booleans.
A bad value is a :class:`~emcl.errors.UserValueError` (a ``UserError`` and a ``ValueError``) naming the
file and the key. Shortened flags
(``--lam`` for ``--lamd``) are refused: parsers get ``allow_abbrev=False``.
"""

from __future__ import annotations

import argparse
import difflib
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from emcl.errors import OneLineParser, UserValueError

__all__ = [
    "OneLineParser",
    "check_keys",
    "fraction",
    "load_yaml",
    "nonneg_float",
    "nonneg_int",
    "parse_args",
    "positive_float",
    "positive_int",
]


# ------------------------------------------------------------------------------ range-checked types
def _number(kind: type, text: str | int | float, allowed: str) -> int | float:
    """``text`` as an int / finite float, else ArgumentTypeError saying what is allowed."""
    if isinstance(text, bool):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number ({allowed})")
    try:
        if kind is int:
            if isinstance(text, float):
                raise ValueError
            value: int | float = int(str(text).strip())
        else:
            value = float(text)
    except ValueError:
        name = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {name} ({allowed})") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number ({allowed})")
    return value


def _ranged(kind: type, ok: Callable[[Any], bool], allowed: str, name: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        value = _number(kind, text, allowed)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range ({allowed})")
        return value

    convert.__name__ = name
    convert.__doc__ = f"argparse type: {allowed}."
    convert.allowed = allowed  # type: ignore[attr-defined]
    return convert


positive_int = _ranged(int, lambda v: v > 0, "an integer >= 1", "positive_int")
nonneg_int = _ranged(int, lambda v: v >= 0, "an integer >= 0", "nonneg_int")
positive_float = _ranged(float, lambda v: v > 0, "a number > 0", "positive_float")
nonneg_float = _ranged(float, lambda v: v >= 0, "a number >= 0", "nonneg_float")
fraction = _ranged(float, lambda v: 0 <= v <= 1, "a number from 0 to 1", "fraction")


# ------------------------------------------------------------------------------------------ YAML
def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        problem = getattr(e, "problem", None) or e
        raise UserValueError(f"config {path}: not valid YAML{at}: {problem}") from None
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise UserValueError(f"config {path}: expected a mapping of option names to values, got {kind}")
    return data


def _is_flag(action: argparse.Action) -> bool:
    """store_true / store_false style: takes no value on the command line."""
    return action.nargs == 0 and isinstance(action.const, bool)


def _convert_one(action: argparse.Action, value: Any) -> Any:
    """One YAML value through ``action.type`` like a command-line string; raises ValueError(reason)."""
    if isinstance(value, (dict, list)):
        raise ValueError(f"expected a single value, got a {'mapping' if isinstance(value, dict) else 'list'}")
    convert = action.type
    if convert is None or convert is str:
        if isinstance(value, bool):
            raise ValueError(f"expected text, got {str(value).lower()}")
        return value if isinstance(value, str) else str(value)
    if isinstance(value, bool):
        # YAML's true/false for an option that takes a value: the command line could not say that either
        raise ValueError(f"expected a {getattr(convert, '__name__', 'value')}, got {str(value).lower()}"
                         + (" (use 1 or 0)" if convert is int else ""))
    if convert is int and isinstance(value, float):
        raise ValueError(f"invalid int value: {value!r} (expected an integer)")
    text = value if isinstance(value, str) else repr(value) if isinstance(value, float) else str(value)
    try:
        return convert(text)
    except argparse.ArgumentTypeError as e:
        raise ValueError(str(e)) from None
    except (TypeError, ValueError):
        name = getattr(convert, "__name__", repr(convert))
        raise ValueError(f"invalid {name} value: {value!r}") from None


def _validate(action: argparse.Action, key: str, value: Any, source: str) -> Any:
    """A config value checked and converted exactly as the command line would; UserError otherwise."""
    try:
        if _is_flag(action):
            if not isinstance(value, bool):
                raise ValueError(f"expected true or false, got {value!r}")
            return value
        if value is None:
            if action.default is None:
                return None
            raise ValueError("null is not allowed (leave the key out for the default "
                             f"{action.default!r})")
        if action.nargs in ("*", "+") or isinstance(action.nargs, int):
            items = value if isinstance(value, list) else [value]
            if action.nargs == "+" and not items:
                raise ValueError("expected at least one value")
            if isinstance(action.nargs, int) and len(items) != action.nargs:
                raise ValueError(f"expected {action.nargs} values, got {len(items)}")
            converted: Any = [_convert_one(action, v) for v in items]
            bad = [v for v in converted if action.choices is not None and v not in action.choices]
        else:
            converted = _convert_one(action, value)
            bad = [converted] if action.choices is not None and converted not in action.choices else []
        if bad:
            choices = ", ".join(repr(c) for c in action.choices)
            raise ValueError(f"invalid choice: {bad[0]!r} (choose from {choices})")
        return converted
    except ValueError as e:
        raise UserValueError(f"config {source}: {key}: {e}") from None


def _unknown_keys(unknown: list[str], known: Iterable[str], what: str = "key(s)") -> str:
    """``unknown key(s) 'lamda' (did you mean 'lamd'?)``."""
    known = sorted(known)
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1)
        parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"unknown {what} {', '.join(parts)}"


def _unknown_message(source: str, unknown: list[str], known: Iterable[str]) -> str:
    return f"config {source}: {_unknown_keys(unknown, known, 'option(s)')}"


def _alias_keys(data: dict[str, Any], parser: argparse.ArgumentParser, source: str) -> dict[str, Any]:
    """A config's keys by the options' ``dest``: a key may be any long name of an option, as on the command
    line (``K`` for ``--centerK`` where ``--K`` is its other name); two keys naming one option are an
    error."""
    dests = {a.dest for a in parser._actions}
    alias = {s[2:]: a.dest for a in parser._actions for s in a.option_strings
             if s.startswith("--") and s[2:] != a.dest and s[2:] not in dests}
    out: dict[str, Any] = {}
    named: dict[str, str] = {}
    for key, value in data.items():
        dest = alias.get(key, key)
        if dest in named:
            raise UserValueError(f"config {source}: {named[dest]!r} and {key!r} both set --{dest} "
                                 f"(they name the same option): keep one")
        named[dest] = key
        out[dest] = value
    return out


def parse_args(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    extra_keys: Iterable[str] = (),
) -> argparse.Namespace:
    """Parse ``argv``; values from ``--config FILE.yaml`` become the defaults that flags override.

    Keys of the file must be flag names (without dashes; any of an option's long names) or one of
    ``extra_keys`` (nested settings such as a model config); anything else is an error naming the file
    and the key. Each value is validated as the command line validates it (``type``, ``choices``,
    booleans for ``store_true`` flags): a bad one is a :class:`UserError` naming the file and the key.
    Abbreviated flags are refused.
    """
    parser.allow_abbrev = False
    pre = OneLineParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    extra_keys = list(dict.fromkeys(extra_keys))  # in the task's order: saved configs keep one key order
    extras: dict[str, Any] = {k: None for k in extra_keys}
    config_keys: set[str] = set()
    if known.config:
        data = _alias_keys(load_yaml(known.config), parser, known.config)
        actions = {a.dest: a for a in parser._actions if a.dest not in (argparse.SUPPRESS, "help")}
        unknown = sorted(str(k) for k in set(data) - set(actions) - set(extra_keys))
        if unknown:
            raise UserValueError(_unknown_message(known.config, unknown, set(actions) | set(extra_keys)))
        defaults = {k: _validate(actions[k], k, v, known.config) for k, v in data.items()
                    if k in actions and k != "config"}
        parser.set_defaults(**defaults)
        extras.update({k: v for k, v in data.items() if k in extra_keys})
        config_keys = {str(k) for k in data}
    args = parser.parse_args(argv)
    for k, v in extras.items():
        setattr(args, k, v)
    args._config_keys = config_keys  # what the file set, as opposed to defaults (not saved: private)
    return args


def check_keys(
    mapping: Any, allowed: Iterable[str], source: str, required: Iterable[str] = ()
) -> dict[str, Any]:
    """A nested config mapping (e.g. ``synthetic:``) with only ``allowed`` keys and every ``required`` one;
    else :class:`~emcl.errors.UserValueError` naming ``source``, the key (with a close match) and the
    allowed keys. Returns it as a dict."""
    if not isinstance(mapping, dict):
        raise UserValueError(f"{source}: expected a mapping, got {type(mapping).__name__}")
    allowed = list(allowed)
    unknown = [str(k) for k in mapping if k not in allowed]
    if unknown:
        listed = ", ".join(allowed)
        raise UserValueError(f"{source}: {_unknown_keys(unknown, allowed)}; allowed keys: {listed}")
    missing = [k for k in required if k not in mapping]
    if missing:
        raise UserValueError(f"{source}: missing required key(s) {', '.join(missing)}")
    return dict(mapping)
