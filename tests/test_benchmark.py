"""scripts/benchmark.py runs end to end on the CPU with --tiny (and --e2e: the real CLI on a frame cache
made on the spot), writes its JSON report and exits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_tiny_cpu(tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/benchmark.py"),
            "--device",
            "cpu",
            "--tiny",
            "--paper_loop",
            "--e2e",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for key in (
        "device",
        "train_clips_per_s",
        "peak_mem_gb",
        "eval_clips_per_s",
        "similarity_s",
        "similarity_query_s",
        "similarity_paper_loop_s",
        "parity_loss_rel_diff",
        "compile",
        "torch",
        "eval_host_clips_per_s",
        "e2e_clips_per_s",
        "e2e_vs_bare",
    ):
        assert key in res, key
    assert res["compile"] is False and res["compile_mode"] == "auto"  # auto: compiled on CUDA only
    assert res["e2e_clips_per_s"] > 0 and res["e2e_timed_steps"] >= 1
    assert res["train_clips_per_s"] > 0 and res["eval_clips_per_s"] > 0 and res["similarity_s"] > 0
    # the bf16 fast path agrees with plain fp32 on the same inputs
    assert res["parity_loss_rel_diff"] < 2e-2 and res["parity_similarity_max_abs_diff"] < 5e-2
    assert "train_clips_per_s" in proc.stdout  # the printed table

    # the speed-memory table of scripts/perf_sweep.py reads these reports
    sys.path.insert(0, str(ROOT / "scripts"))
    import perf_sweep

    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "e2e.json").write_text(out.read_text())
    (tmp_path / "sweep" / "eager.err").write_text("Traceback ...\nexit status 1\n")
    md = perf_sweep.table(tmp_path / "sweep", ["e2e", "eager", "lean"])
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert (
        f"{res['train_clips_per_s']:,.0f}" in rows["e2e"] and f"{res['e2e_clips_per_s']:,.0f}" in rows["e2e"]
    )
    assert "exit status 1" in rows["eager"] and "not run" in rows["lean"]
    assert res["device"] in md
