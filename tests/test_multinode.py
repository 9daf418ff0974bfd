"""Two "nodes" on localhost: two torchrun agents, ``--nnodes 2``, c10d rendezvous on 127.0.0.1, gloo.

Each agent starts one process, so every process has LOCAL_RANK 0 while the global ranks are 0 and 1:
rank-0-only work (logging to the file, config, checkpoints, metrics, the frame-cache build) must follow
the global rank: the shared output folder's log must hold each line once, all from rank 0 (with the
local rank, both processes would write it). The output folder is shared, as on a cluster's shared file
system: every rank reads the selected checkpoint back from it after training. The run matches a
one-process run on the same global batch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from emcl.data.synthetic import make_synthetic

ROOT = Path(__file__).resolve().parents[1]
MODULE = "video_retrieval.emcl_net.main_task_retrieval"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flags(data: Path, out: Path) -> list[str]:
    return [
        "--config", str(ROOT / "configs/synthetic.yaml"), "--datatype", "msvd",
        "--anno_path", str(data / "annotations"), "--video_path", str(data / "videos"),
        "--output_dir", str(out), "--batch_size", "8", "--batch_size_val", "16", "--workers", "0",
        "--max_frames", "4", "--epochs", "1", "--max_steps", "2", "--n_display", "1", "--device", "cpu",
    ]  # fmt: skip


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syn_multinode")  # the data of test_retrieval_run's 2-process test
    make_synthetic(out, 30, seed=1, format="msvd", split_sizes=(16, 6, 8), frames=8, fps=4, size=32)
    return out


def test_two_nodes_on_localhost_match_one_process(data, tmp_path):
    one = tmp_path / "one"
    proc = subprocess.run(
        [sys.executable, "-m", MODULE, *_flags(data, one)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

    port = _free_port()
    two = tmp_path / "two"
    agents = []
    for node_rank in range(2):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--node_rank", str(node_rank), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
            "--rdzv_id", f"emcl_test_{port}", "--max_restarts", "0", "-m", MODULE, *_flags(data, two),
        ]  # fmt: skip
        agents.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True))  # fmt: skip
    logs = []
    try:
        for a in agents:
            logs.append(a.communicate(timeout=300)[0])
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    for a in agents:
        assert a.returncode == 0, "\n\n".join(x[-6000:] for x in logs)

    # rank-0 work happened once, by global rank 0 (both processes have LOCAL_RANK 0)
    log = (two / "train.log").read_text()
    assert "[rank1]" not in log and "[rank0]" in log
    for step in (1, 2):
        assert sum(f"step {step}/2" in line for line in log.splitlines()) == 1, log
    assert "2 process(es)" in log
    main = two

    a, b = _load(one / "checkpoint_last.pt"), _load(main / "checkpoint_last.pt")
    assert a["step"] == b["step"] == 2
    loss_a, loss_b = a["best"]["history"][0]["loss"], b["best"]["history"][0]["loss"]
    assert abs(loss_a - loss_b) < 1e-4 * abs(loss_a)
    for k, va in a["model"].items():  # tolerances as tests/test_retrieval_run.py explains
        if k == "emcl.mu":
            continue
        diff = (va.float() - b["model"][k].float()).abs()
        assert diff.max() < 2e-4, k
        assert (diff > 2e-5).float().mean() < 1e-3, k
    assert torch.allclose(a["model"]["emcl.mu"], b["model"]["emcl.mu"], atol=5e-4)
    m1, m2 = json.loads((one / "metrics.json").read_text()), json.loads((main / "metrics.json").read_text())
    assert m1["test"]["t2v"] == pytest.approx(m2["test"]["t2v"], abs=1e-6)


def test_dist_info_rank_is_global_local_rank_only_picks_the_device():
    from emcl.dist import DistInfo

    second_node = DistInfo(rank=8, world_size=16, local_rank=0, device=torch.device("cpu"), is_main=False)
    assert second_node.is_local_main and not second_node.is_main


@pytest.mark.parametrize(
    "launcher,expected",
    [
        ([], ["--standalone", "--nnodes=1", "--nproc_per_node=4", "--output_dir runs/msrvtt_4gpu"]),
        (
            ["--nnodes", "2", "--rdzv_endpoint", "h0:29500", "--rdzv_id", "j1"],
            ["--nnodes=2", "--rdzv_endpoint=h0:29500", "--rdzv_id=j1", "--rdzv_backend=c10d", "2x4gpu"],
        ),
        (
            ["--nnodes", "2", "--node_rank", "1", "--rdzv_endpoint", "h0:29500"],
            ["--rdzv_backend=static", "--node_rank=1", "--nproc_per_node=4"],
        ),
    ],
)
def test_train_sh_launch_commands(launcher, expected):
    cmd = [str(ROOT / "scripts/train.sh"), *launcher, "msrvtt", "anno", "videos", "4", "--epochs", "1"]
    proc = subprocess.run(cmd, env={**_env(), "EMCL_DRY_RUN": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith("torchrun ") and line.endswith("--epochs 1")
    for part in expected:
        assert part in line, (part, line)


def test_train_sh_multinode_needs_an_endpoint():
    cmd = [str(ROOT / "scripts/train.sh"), "--nnodes", "2", "msrvtt", "anno", "videos"]
    proc = subprocess.run(cmd, env={**_env(), "EMCL_DRY_RUN": "1"}, capture_output=True, text=True)
    assert proc.returncode == 2 and "--rdzv_endpoint" in proc.stderr
