"""The output folder's run lock (emcl.train.lock): exclusive, names its holder, stale locks, signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from emcl.errors import UserError
from emcl.train.lock import RunLock, refuse_busy_output_dir

ROOT = Path(__file__).resolve().parents[1]


def test_lock_is_exclusive_names_the_holder_and_is_released(tmp_path):
    with RunLock(tmp_path / "out") as lock:
        rec = json.loads(lock.path.read_text())
        assert rec["pid"] == os.getpid() and rec["host"] == socket.gethostname()
        assert rec["started"] and isinstance(rec["argv"], list)
        with pytest.raises(UserError) as e:
            RunLock(tmp_path / "out").acquire()
        msg = str(e.value)
        assert "in use by another run" in msg and f"pid {os.getpid()}" in msg and rec["started"] in msg
        assert socket.gethostname() in msg
    assert not (tmp_path / "out" / ".run.lock").exists()
    RunLock(tmp_path / "out").acquire().release()  # free again


def test_lock_released_on_exception_and_keyboard_interrupt(tmp_path):
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with RunLock(tmp_path):
                raise exc
        assert not (tmp_path / ".run.lock").exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_lock_of_a_dead_process_says_how_to_clear_it(tmp_path):
    rec = {"pid": _dead_pid(), "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00",
           "argv": ["train.py", "--seed", "1"], "token": "x"}
    (tmp_path / ".run.lock").write_text(json.dumps(rec))
    with pytest.raises(UserError) as e:
        RunLock(tmp_path).acquire()
    msg = str(e.value)
    assert "stale lock" in msg and f"rm {tmp_path / '.run.lock'}" in msg and str(rec["pid"]) in msg
    assert (tmp_path / ".run.lock").exists()  # reported, not removed behind the user's back


def test_lock_of_another_host_or_unreadable(tmp_path):
    rec = {"pid": 1, "host": "elsewhere-node-7", "started": "2026-01-01T00:00:00+00:00", "argv": []}
    (tmp_path / ".run.lock").write_text(json.dumps(rec))
    with pytest.raises(UserError, match="another host.*elsewhere-node-7.*rm "):
        RunLock(tmp_path).acquire()
    (tmp_path / ".run.lock").write_text("{")
    with pytest.raises(UserError, match="cannot be read"):
        RunLock(tmp_path).acquire()


def test_own_pid_in_a_lock_this_process_does_not_hold_is_stale(tmp_path):
    # after a container restart the new run can get the pid of the run that died
    rec = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00"}
    (tmp_path / ".run.lock").write_text(json.dumps(rec))
    with pytest.raises(UserError, match="stale lock"):
        RunLock(tmp_path).acquire()


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    lock = RunLock(tmp_path).acquire()
    lock.path.write_text(json.dumps({"pid": 1, "host": "h", "token": "someone else"}))
    lock.release()
    assert lock.path.exists()


def test_sigterm_releases_the_lock(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time
        from emcl.train.lock import RunLock
        with RunLock({str(tmp_path)!r}):
            print("locked", flush=True)
            time.sleep(30)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    assert (tmp_path / ".run.lock").exists()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    assert not (tmp_path / ".run.lock").exists()


def test_sigterm_handler_is_restored_after_release(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with RunLock(tmp_path):
        pass
    assert signal.getsignal(signal.SIGTERM) == before


def test_lock_second_process_fails_fast(tmp_path):
    script = f"from emcl.train.lock import RunLock; RunLock({str(tmp_path)!r}).acquire()"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with RunLock(tmp_path):
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                              timeout=120)
    assert proc.returncode != 0 and "in use by another run" in proc.stderr


def test_take_stale_takes_over_only_a_dead_holder(tmp_path):
    dead = {"pid": _dead_pid(), "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00",
            "argv": [], "token": "old"}
    (tmp_path / ".run.lock").write_text(json.dumps(dead))
    with pytest.raises(UserError, match="Pass --resume to continue that run"):
        RunLock(tmp_path).acquire()
    with RunLock(tmp_path).acquire(take_stale=True) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        with pytest.raises(UserError, match="in use by another run"):  # a live holder is never taken
            RunLock(tmp_path).acquire(take_stale=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_remove_stale_puts_back_a_lock_that_changed(tmp_path):
    # two requeued jobs race for the same stale lock: the one that finds a fresh lock must not remove it
    lock = RunLock(tmp_path)
    fresh = {"pid": os.getpid(), "host": "h", "token": "fresh"}
    lock.path.write_text(json.dumps(fresh))
    assert lock._remove_stale({"pid": 1, "host": "h", "token": "stale"}) is False
    assert json.loads(lock.path.read_text()) == fresh
    assert [p.name for p in tmp_path.iterdir()] == [".run.lock"]
    assert lock._remove_stale(fresh) is True and list(tmp_path.iterdir()) == []


def test_lock_module_imports_without_torch():
    # the entry points call refuse_busy_output_dir before torch is imported: a busy folder stops them at once
    script = ("import sys; import emcl.train.lock; from emcl.train.lock import refuse_busy_output_dir; "
              "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_refuse_busy_output_dir_stops_only_for_a_live_holder(tmp_path, capsys):
    refuse_busy_output_dir(["--output_dir", str(tmp_path)])  # free: the run loop checks the rest
    with RunLock(tmp_path):
        with pytest.raises(SystemExit) as e:
            refuse_busy_output_dir([f"--output_dir={tmp_path}"])
    assert e.value.code == 2 and "in use by another run" in capsys.readouterr().err
    refuse_busy_output_dir(["--output_dir", str(tmp_path)])  # released
