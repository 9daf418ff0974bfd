"""How entry points report errors a user can fix, and Ctrl-C (emcl.errors.cli_main)."""

from __future__ import annotations

import pytest

from emcl.errors import UserError, UserValueError, cli_main


def _raise(error: BaseException):
    def main(argv):
        raise error

    return main


@pytest.mark.parametrize("error,code,line", [
    (UserError("--lr: must be > 0"), 2, "error: --lr: must be > 0"),
    (UserValueError("a.yaml: key 'x' unknown"), 2, "error: a.yaml: key 'x' unknown"),
    (FileNotFoundError("videos/v1.mp4 not found"), 2, "error: videos/v1.mp4 not found"),
    (KeyboardInterrupt(), 130, "interrupted (Ctrl-C)"),
])  # fmt: skip
def test_one_line_and_exit_status(error, code, line, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(_raise(error), [])
    assert info.value.code == code
    assert capsys.readouterr().err.strip().splitlines() == [line]


def test_debug_shows_the_exception():
    with pytest.raises(KeyboardInterrupt):
        cli_main(_raise(KeyboardInterrupt()), ["--debug"])
    with pytest.raises(UserError):
        cli_main(_raise(UserError("x")), ["--debug"])
    assert cli_main(lambda argv: 7, []) == 7
