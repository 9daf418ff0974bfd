"""End-to-end runs of the EMCL-Net entry point on tiny synthetic datasets (CPU, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from emcl.data.synthetic import make_synthetic

ROOT = Path(__file__).resolve().parents[1]
MODULE = "video_retrieval.emcl_net.main_task_retrieval"


@pytest.fixture(scope="module")
def msvd_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syn_msvd")
    make_synthetic(out, 30, seed=1, format="msvd", split_sizes=(16, 6, 8), frames=8, fps=4, size=32)
    return out


@pytest.fixture(scope="module")
def msrvtt_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syn_msrvtt")
    make_synthetic(out, 24, seed=2, format="msrvtt", split_sizes=(16, 0, 8), frames=8, fps=4, size=32)
    return out


def flags(data: Path, out: Path, *extra: str) -> list[str]:
    fmt = json.loads((data / "synthetic_attributes.json").read_text())["format"]
    return [
        "--datatype", fmt,
        "--config", str(ROOT / "configs/synthetic.yaml"), "--anno_path", str(data / "annotations"),
        "--video_path", str(data / "videos"), "--output_dir", str(out), "--batch_size", "8",
        "--batch_size_val", "16", "--workers", "0", "--max_frames", "4", "--epochs", "2", "--n_display", "1",
        "--device", "cpu", *extra,
    ]  # fmt: skip


# the trainer, killed with SIGKILL (like a job the scheduler kills) once epoch N is saved
KILL_AFTER_EPOCH = """
import os, signal, sys
from emcl.errors import cli_main
from emcl.train import loop
from video_retrieval.emcl_net.main_task_retrieval import main

N = int(sys.argv.pop(1))
end_epoch = loop._end_epoch

def end_then_die(task, cfg, model, info, out, tr, ep):
    end_epoch(task, cfg, model, info, out, tr, ep)
    if ep.index + 1 == N:
        os.kill(os.getpid(), signal.SIGKILL)

loop._end_epoch = end_then_die
cli_main(main)
"""


def run(args: list[str], nproc: int = 1, check: bool = True, kill_after_epoch: int = 0
        ) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            MODULE,
            *args,
        ]
    elif kill_after_epoch:
        cmd = [sys.executable, "-c", KILL_AFTER_EPOCH, str(kill_after_epoch), *args]
    else:
        cmd = [sys.executable, "-m", MODULE, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_two_processes_match_one_on_the_same_global_batch(msvd_data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # --multi_positive gathers the batch's video ids with the features (MSVD: several captions a video)
    run(flags(msvd_data, one, "--max_steps", "2", "--epochs", "1", "--multi_positive", "1"))
    # --skip_bad_videos switches the gathers to their variable-length form: same results
    run(
        flags(
            msvd_data, two, "--max_steps", "2", "--epochs", "1", "--skip_bad_videos", "--multi_positive", "1"
        ),
        nproc=2,
    )
    a, b = load(one / "checkpoint_last.pt"), load(two / "checkpoint_last.pt")
    assert a["step"] == b["step"] == 2
    loss_a, loss_b = a["best"]["history"][0]["loss"], b["best"]["history"][0]["loss"]
    assert abs(loss_a - loss_b) < 1e-4 * abs(loss_a)
    # Adam turns round-off in near-zero gradients into differences of up to a few % of one step's
    # update (lr 1e-3): allow a tenth of the two steps' update, and far less for almost every element
    for k, va in a["model"].items():
        if k == "emcl.mu":
            continue  # a buffer, compared below
        diff = (va.float() - b["model"][k].float()).abs()
        assert diff.max() < 2e-4, k
        assert (diff > 2e-5).float().mean() < 1e-3, k
    # the two runs see the global batch in another row order; EM's nearly tied bases amplify that
    # round-off (emcl/em.py), so mu agrees to ~1e-4 rather than 1e-7
    assert torch.allclose(a["model"]["emcl.mu"], b["model"]["emcl.mu"], atol=5e-4)
    init = load(one / "checkpoint_last.pt")["model"]["emcl.mu"]
    assert not torch.equal(init, torch.sign(init))  # mu moved away from its +-1 start
    m1, m2 = json.loads((one / "metrics.json").read_text()), json.loads((two / "metrics.json").read_text())
    assert m1["test"]["t2v"] == pytest.approx(m2["test"]["t2v"], abs=1e-6)
    assert m1["test"]["num_texts"] == m2["test"]["num_texts"] > 8


def test_resume_after_kill_gives_the_same_metrics(msrvtt_data, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    # RandAugment on: what each clip looks like must not depend on the restart
    run(flags(msrvtt_data, full, "--augment", "1", "--workers", "1"))
    proc = run(flags(msrvtt_data, killed, "--augment", "1"), check=False, kill_after_epoch=1)
    assert proc.returncode != 0
    assert load(killed / "checkpoint_last.pt")["epoch"] == 1
    assert "test" not in json.loads((killed / "metrics.json").read_text())
    run(flags(msrvtt_data, killed, "--augment", "1", "--resume"))
    a, b = json.loads((full / "metrics.json").read_text()), json.loads((killed / "metrics.json").read_text())
    for direction in ("t2v", "v2t", "t2v_dsl", "v2t_dsl"):
        assert a["test"][direction] == b["test"][direction]
    assert a["train"]["history"][-1]["loss"] == pytest.approx(b["train"]["history"][-1]["loss"], rel=1e-6)
    # MSR-VTT 1k-A has no val split: the last epoch is tested once
    assert a["train"]["selected_on"] == "last_epoch"
    assert (full / "config.yaml").is_file() and (full / "train.log").is_file()

    # no selection split: no copy of the last checkpoint, and the tested epoch is recorded
    assert not (full / "checkpoint_best.pt").exists()
    assert a["train"]["selected_epoch"] == 2 and a["train"]["evaluated_checkpoint"] == "checkpoint_last.pt"
    assert a["finished"] is True and b["resumed_from"] == str(killed / "checkpoint_last.pt")

    # evaluating the checkpoint alone reproduces the training run's numbers exactly, in every policy;
    # an explicit --do_eval 1 without --do_train means evaluation only, although the config trains
    ev = tmp_path / "eval"
    run(flags(msrvtt_data, ev, "--do_eval", "1", "--init_model", str(full / "checkpoint_last.pt")))
    c = json.loads((ev / "metrics.json").read_text())
    assert "train" not in c and not (ev / "checkpoint_last.pt").exists()
    for direction in ("t2v", "v2t", "t2v_dsl", "v2t_dsl"):
        assert c["test"][direction] == a["test"][direction]
    assert c["test"]["policies"] == a["test"]["policies"]
    assert c["test"]["eval_block"] == "query" and c["test"]["num_videos"] == 8


def test_bad_video_fails_by_default_and_is_skipped_on_request(tmp_path):
    data = tmp_path / "data"
    make_synthetic(data, 20, seed=3, format="msrvtt", split_sizes=(14, 0, 6), frames=8, fps=4, size=32)
    bad = data / "videos" / "video3.mp4"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    proc = run(flags(data, tmp_path / "default", "--epochs", "1"), check=False)
    assert proc.returncode != 0 and "video3" in (proc.stdout + proc.stderr)
    # 1 of 14 training videos is 7% of the split: over the default --max_skip_fraction of 5%
    proc = run(flags(data, tmp_path / "over", "--epochs", "1", "--skip_bad_videos"), check=False)
    assert proc.returncode == 2 and "max_skip_fraction" in proc.stderr and "video3" in proc.stderr
    run(flags(data, tmp_path / "skip", "--epochs", "1", "--skip_bad_videos", "--max_skip_fraction", "0.1"))
    m = json.loads((tmp_path / "skip" / "metrics.json").read_text())
    assert m["train"]["skipped_videos"] == 1 and m["train"]["skipped_video_ids"] == ["video3"]
    assert m["train"]["history"][0]["skipped_samples"] >= 1
    assert m["test"]["num_skipped_videos"] == 0  # the damaged clip is a training clip


def test_three_policies_side_by_side_and_eval_only_with_a_validation_split(msvd_data, tmp_path):
    """MSVD has a val split: selection on val, the selected checkpoint tested; all three policies are
    scored from the same features, and an eval-only run of checkpoint_best.pt reproduces them all."""
    out = tmp_path / "train"
    run(flags(msvd_data, out, "--eval_block", "paper", "--eval_block_size", "4"))
    m = json.loads((out / "metrics.json").read_text())
    test = m["test"]
    assert set(test["policies"]) == {"paper", "query", "none"}
    assert test["eval_block"] == "paper"
    for direction in ("t2v", "v2t", "t2v_dsl", "v2t_dsl"):
        assert test[direction] == test["policies"]["paper"][direction]
    assert m["train"]["selected_on"] == "val" and m["train"]["evaluated_checkpoint"] == "checkpoint_best.pt"
    assert m["train"]["selected_epoch"] in (1, 2)
    assert all("val" in record for record in m["train"]["history"])
    assert (out / "curves.png").is_file() or "no training curves" in (out / "train.log").read_text()

    # the config says temp 3 and K 32; the checkpoint's settings are used unless given explicitly
    ev = tmp_path / "eval"
    best = str(out / "checkpoint_best.pt")
    proc = run(flags(msvd_data, ev, "--do_train", "0", "--do_eval", "1", "--init_model", best))
    c = json.loads((ev / "metrics.json").read_text())
    assert c["init_model"] == best and c["finished"] is True
    # the headline policy and the block size come from the checkpoint too (the config says query, 32)
    assert c["test"]["policies"] == test["policies"]
    assert c["test"]["eval_block"] == "paper" and "val" in c
    assert "eval_block_size=4 taken from the checkpoint" in proc.stdout

    # an explicit score setting wins, with a warning that names it; a weight setting cannot change
    ev2 = tmp_path / "eval2"
    proc = run(
        flags(
            msvd_data, ev2, "--do_train", "0", "--do_eval", "1", "--init_model", best, "--temp", "5",
        )
    )  # fmt: skip
    assert "temp=5.0 given explicitly" in proc.stdout + proc.stderr
    proc = run(
        flags(
            msvd_data, tmp_path / "eval3", "--do_eval", "1", "--init_model", best, "--centerK", "16",
        ),
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "centerK" in proc.stderr and "Traceback" not in proc.stderr


def test_paper_configs_default_to_the_paper_policy():
    """The five configs that claim the paper's settings make `paper` the headline policy."""
    import yaml

    for name in ("msrvtt", "msvd", "lsmdc", "activitynet", "didemo"):
        cfg = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
        assert cfg["eval_block"] == "paper", name
        assert cfg.get("eval_block_size", 32) == 32, name  # the reference's 32 x 32 blocks
