"""Progress bars only on a terminal: a run whose output is redirected (SLURM, ``> log``) leaves a log of
log lines, not thousands of carriage-return bar updates."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

from emcl.data.synthetic import make_synthetic
from emcl.progress import bar

ROOT = Path(__file__).resolve().parents[1]


class _Stream:
    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def test_bar_is_drawn_on_a_terminal_only(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Stream(tty=True))
    assert not bar(range(3)).disable
    assert bar(range(3), show=False).disable  # e.g. ranks other than 0
    monkeypatch.setattr(sys, "stderr", _Stream(tty=False))
    assert bar(range(3)).disable


def _train(data: Path, out: Path, stderr) -> None:
    cmd = [
        sys.executable, "-m", "video_retrieval.emcl_net.main_task_retrieval",
        "--config", str(ROOT / "configs/synthetic.yaml"), "--datatype", "msvd",
        "--anno_path", str(data / "annotations"), "--video_path", str(data / "videos"),
        "--output_dir", str(out), "--batch_size", "4", "--batch_size_val", "8", "--epochs", "2",
        "--workers", "0", "--max_frames", "4", "--n_display", "1", "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, cwd=ROOT, env=env, stdout=stderr, stderr=stderr, check=True, timeout=300)


def test_redirected_run_has_no_bar_lines_and_a_terminal_gets_bars(tmp_path):
    data = tmp_path / "data"
    make_synthetic(data, 12, seed=3, format="msvd", split_sizes=(8, 2, 2), frames=6, fps=4, size=32)
    log = tmp_path / "job.log"
    with log.open("w") as f:  # what `python -m ... > job.log 2>&1` does
        _train(data, tmp_path / "redirected", f)
    text = log.read_text()
    assert "\r" not in text and "it/s]" not in text
    assert "epoch 2 step 16/16 loss=" in text  # the log lines carry the progress instead
    # on a terminal the bars are drawn (the terminal is read while the run writes to it)
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    drawn = bytearray()
    reader = threading.Thread(target=_drain, args=(leader, drawn), daemon=True)
    reader.start()
    with os.fdopen(follower, "w") as tty:
        _train(data, tmp_path / "terminal", tty)
    reader.join(timeout=10)
    assert b"epoch 1/2" in drawn and b"\r" in drawn


def _drain(fd: int, into: bytearray) -> None:
    try:
        while chunk := os.read(fd, 65536):
            into += chunk
    except OSError:  # the terminal closed: the run ended
        pass
