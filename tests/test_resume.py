"""Exact resume in every trainer: Ctrl-C (SIGINT) in the middle of an epoch after the first, then
``--resume``, gives the uninterrupted run's test metrics, with dropout on (QA and joint training here;
EMCL-Net's resume after a kill is tests/test_retrieval_run.py's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# the trainer, sent SIGINT by itself at global step N (mid-epoch), with Python's own SIGINT handler in
# place even when the test runs as a background job (shells start those with SIGINT ignored)
INTERRUPT_AT_STEP = """
import importlib, os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from emcl.errors import cli_main
module = importlib.import_module(sys.argv.pop(1))
at = int(sys.argv.pop(1))
step, calls = module.TASK.step, []

def step_then_interrupt(self, ddp, batch):
    calls.append(1)
    if len(calls) == at:
        os.kill(os.getpid(), signal.SIGINT)
    return step(self, ddp, batch)

module.TASK.step = step_then_interrupt
cli_main(module.main)
"""


def _run(module: str, args: list[str], interrupt_at: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", INTERRUPT_AT_STEP, module, str(interrupt_at), *args] if interrupt_at else \
        [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _config(tmp: Path, base: str, **over) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / base).read_text())
    for key, value in over.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg.get(key, {}), **value}
        else:
            cfg[key] = value
    path = tmp / base
    path.write_text(yaml.safe_dump(cfg))
    return path


def _interrupt_and_resume(module: str, config: Path, tmp: Path) -> None:
    full, cut = tmp / "full", tmp / "cut"
    done = _run(module, ["--config", str(config), "--output_dir", str(full)])
    assert done.returncode == 0, done.stderr[-3000:]
    steps_per_epoch = json.loads((full / "metrics.json").read_text())["train"]["history"][0]["step"]
    assert steps_per_epoch >= 2
    at = steps_per_epoch + steps_per_epoch // 2 + 1  # the middle of epoch 2
    stopped = _run(module, ["--config", str(config), "--output_dir", str(cut)], interrupt_at=at)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert stopped.stderr.strip().splitlines()[-1].startswith("interrupted")
    progress = json.loads((cut / "metrics.json").read_text())
    assert not progress["finished"] and len(progress["train"]["history"]) == 1
    resumed = _run(module, ["--config", str(config), "--output_dir", str(cut), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (full, cut))
    assert [h["loss"] for h in a["train"]["history"]] == [h["loss"] for h in b["train"]["history"]]
    strip = ("seconds",)
    assert {k: v for k, v in a["test"].items() if k not in strip} == {
        k: v for k, v in b["test"].items() if k not in strip
    }
    assert b["resumed_from"] == str(cut / "checkpoint_last.pt")


def test_joint_training_resumes_exactly_after_ctrl_c(tmp_path):
    config = _config(
        tmp_path, "mmt_synthetic.yaml", dropout=0.3, epochs=3, iters_per_epoch=6, batch_size=16,
        synthetic={"out": str(tmp_path / "experts"), "num_videos": 120, "split_sizes": [80, 40]},
    )  # fmt: skip
    _interrupt_and_resume("video_retrieval.joint_training.main_task_joint", config, tmp_path)


def test_qa_resumes_exactly_after_ctrl_c(tmp_path):
    config = _config(
        tmp_path, "synthetic_qa.yaml", dropout=0.3, epochs=3, batch_size=16, batch_size_val=64,
        synthetic={"out": str(tmp_path / "qa"), "num_videos": 60, "split_sizes": [40, 8, 12]},
    )  # fmt: skip
    _interrupt_and_resume("video_question_answering.main_task_qa", config, tmp_path)
