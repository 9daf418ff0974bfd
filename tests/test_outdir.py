"""The output folder (emcl.train.outdir): no silent reuse of an earlier run, --resume / --overwrite,
unwritable folders, the result files a run writes."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from emcl.errors import UserError
from emcl.fileio import save_json
from emcl.train import outdir
from emcl.train.lock import RunLock
from emcl.train.outdir import RESULT_FILES, check_output_dir


def _write_run(folder: Path, finished: bool, last: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_json({"finished": finished, "test": {"t2v": {"R1": 1.0}}}, folder / "metrics.json")
    for name in ("config.yaml", "train.log", "curves.png", "checkpoint_best.pt", ".metrics.json.x.tmp"):
        (folder / name).write_text("x")
    if last:
        (folder / "checkpoint_last.pt").write_text("x")
    (folder / "notes.txt").write_text("mine")


def test_empty_or_new_folder_is_fine(tmp_path):
    assert check_output_dir(tmp_path / "new" / "deeper", resume=False, overwrite=False) == []
    assert (tmp_path / "new" / "deeper").is_dir()
    (tmp_path / "new" / "deeper" / "train.log").write_text("a run that stopped before training")
    check_output_dir(tmp_path / "new" / "deeper", resume=False, overwrite=False)


@pytest.mark.parametrize("finished", [True, False])
def test_earlier_run_needs_resume_or_overwrite(tmp_path, finished):
    _write_run(tmp_path, finished)
    with pytest.raises(UserError) as e:
        check_output_dir(tmp_path, resume=False, overwrite=False)
    msg = str(e.value)
    assert str(tmp_path) in msg and "--resume" in msg and "--overwrite" in msg
    assert ("finished run" if finished else "unfinished run") in msg
    check_output_dir(tmp_path, resume=True, overwrite=False)  # continue (or extend) it
    assert (tmp_path / "metrics.json").exists()


def test_overwrite_removes_exactly_the_result_files(tmp_path, caplog):
    _write_run(tmp_path, True)
    (tmp_path / ".run.lock").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="emcl.guards"):
        removed = check_output_dir(tmp_path, resume=False, overwrite=True)
    assert {p.name for p in removed} == {"metrics.json", "config.yaml", "train.log", "curves.png",
                                         "checkpoint_best.pt", "checkpoint_last.pt", ".metrics.json.x.tmp"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.lock", "notes.txt"]
    assert "--overwrite: removed 7 file(s)" in caplog.text


def test_resume_without_checkpoint_over_old_results_and_both_flags(tmp_path):
    _write_run(tmp_path, True, last=False)
    with pytest.raises(UserError, match="no checkpoint_last.pt to resume from"):
        check_output_dir(tmp_path, resume=True, overwrite=False)
    with pytest.raises(UserError, match="pass one"):
        check_output_dir(tmp_path, resume=True, overwrite=True)
    check_output_dir(tmp_path / "fresh", resume=True, overwrite=False)  # requeue: nothing there yet


def test_old_metrics_without_finished_flag_count_as_results(tmp_path):
    (tmp_path / "metrics.json").write_text('{"loss": NaN}')
    with pytest.raises(UserError, match="results of an earlier run"):
        check_output_dir(tmp_path, resume=False, overwrite=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_fails_first(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(UserError, match=f"output folder {ro} is not writable"):
            check_output_dir(ro, resume=False, overwrite=False)
        with pytest.raises(UserError, match="not writable"):
            RunLock(ro).acquire()
    finally:
        ro.chmod(0o755)


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        check_output_dir(tmp_path / "f", resume=False, overwrite=False)


def test_result_files_constant_covers_what_a_run_writes():
    for name in ("metrics.json", "checkpoint_best.pt", "checkpoint_last.pt", "config.yaml", "train.log",
                 "curves.png"):
        assert any(Path(name).match(p) for p in RESULT_FILES), name


def test_unwritable_folder_message_without_chmod(tmp_path, monkeypatch):
    # root ignores permission bits; a read-only mount fails the probe file like this
    def refuse(*a, **k):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(outdir.tempfile, "mkstemp", refuse)
    msg = f"output folder {tmp_path} is not writable \\(Read-only file system\\)"
    with pytest.raises(UserError, match=msg):
        check_output_dir(tmp_path, resume=False, overwrite=False)
