"""scripts/multiseed.py: mean ± std over seeds of every metric and policy, on fabricated metrics files."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from emcl.errors import UserError

try:  # tests/ may or may not be a package
    from tests._video_fixtures import REPO, load_script
except ImportError:
    from _video_fixtures import REPO, load_script

ms = load_script("multiseed")
KEYS = ("R1", "R5", "R10", "R50", "MdR", "MnR")


def _row(r1: float, mnr: float) -> dict[str, float]:
    return {"R1": r1, "R5": r1 + 30, "R10": r1 + 40, "R50": 100.0, "MdR": 2.0, "MnR": mnr}


def _metrics(seed: int, multi: bool = True, with_none: bool = True) -> dict:
    """A metrics.json as the runner writes it: headline rows follow eval_block, policies side by side."""
    base = {"paper": 30.0, "query": 28.0, "none": 25.0}
    policies = {}
    for name, r1 in base.items():
        if name == "none" and not with_none:
            continue
        directions = ["t2v", "v2t", "t2v_dsl", "v2t_dsl"]
        rows = {d: _row(r1 + seed + k, 4.0 + seed / 2) for k, d in enumerate(directions)}
        if multi:
            rows["v2t_captions"] = _row(r1 - 10 + seed, 9.0)
        policies[name] = rows
    test = {**policies["paper"], "eval_block": "paper", "num_videos": 150, "policies": policies}
    return {"train": {"history": [{"epoch": 1, "loss": 1.0}]}, "val": {"t2v": _row(50, 2)}, "test": test}


def test_aggregate_mean_and_sample_std_per_policy_and_direction():
    runs = {s: _metrics(s) for s in (0, 1, 2)}
    runs[2] = _metrics(2, with_none=False)  # one run without the 'none' policy: n=2 there
    out = ms.aggregate(runs)
    assert out["seeds"] == [0, 1, 2] and out["split"] == "test" and out["eval_block"] == "paper"
    groups = out["groups"]
    assert set(groups) == {"headline", "paper", "query", "none"}
    assert set(groups["headline"]) == {"t2v", "v2t", "t2v_dsl", "v2t_dsl", "v2t_captions"}
    cell = groups["query"]["v2t"]["R1"]  # 29, 30, 31
    assert cell["values"] == [29.0, 30.0, 31.0] and cell["mean"] == pytest.approx(30.0)
    assert cell["std"] == pytest.approx(statistics.stdev([29, 30, 31])) == pytest.approx(1.0)
    mnr = groups["paper"]["t2v"]["MnR"]
    assert mnr["mean"] == pytest.approx(4.5) and mnr["std"] == pytest.approx(0.5)
    assert groups["headline"]["t2v"]["R1"] == groups["paper"]["t2v"]["R1"]
    assert groups["none"]["t2v"]["R1"]["n"] == 2 and groups["none"]["t2v"]["R1"]["values"] == [25.0, 26.0]
    assert all(set(c) == set(KEYS) for c in groups["paper"].values())
    json.dumps(out, allow_nan=False)  # strict JSON

    one = ms.aggregate({7: _metrics(7)})
    assert one["groups"]["paper"]["t2v"]["R1"]["std"] is None  # no std from a single run
    assert "val" == ms.aggregate(runs, split="val")["split"]
    with pytest.raises(ValueError, match=r"seed 3: metrics.json has no 'test' results"):
        ms.aggregate({3: {"train": {}}})


def test_markdown_table():
    out = ms.aggregate({s: _metrics(s) for s in (0, 1, 2)})
    md = ms.format_markdown(out, title="configs/synthetic.yaml")
    lines = md.splitlines()
    assert lines[0] == "### configs/synthetic.yaml"
    assert "| policy | direction | R1 | R5 | R10 | R50 | MdR | MnR |" in lines
    assert "| paper (headline) | t2v | 31.0 ± 1.0 | 61.0 ± 1.0 | 71.0 ± 1.0 | 100.0 ± 0.0 | " \
           "2.0 ± 0.0 | 4.5 ± 0.5 |" in lines
    body = [line for line in lines if line.startswith("| ") and "policy" not in line]
    # the headline rows are the paper policy's: printed once; then query, none: 5 directions each
    assert [line.split(" | ")[0][2:] for line in body[::5]] == ["paper (headline)", "query", "none"]
    assert len(body) == 15
    # headline rows that are no policy's (e.g. an older metrics.json without policies): a group of their own
    old = {s: {"test": {k: v for k, v in _metrics(s)["test"].items() if k != "policies"}} for s in (0, 1)}
    md_old = ms.format_markdown(ms.aggregate(old))
    assert "| headline (eval_block=paper) | t2v | 30.5 ± 0.7 |" in md_old
    assert "v2t_captions: each video ranks all captions" in md
    partial = ms.format_markdown(ms.aggregate({0: _metrics(0), 1: _metrics(1, with_none=False)}))
    assert "| none | t2v | 25.0 (n=1) |" in partial


def _fake_runner(calls: list, fail_seed: int | None = None):
    def run(cmd, cwd=None):
        calls.append(cmd)
        seed = int(cmd[cmd.index("--seed") + 1])
        out = Path(cmd[cmd.index("--output_dir") + 1])
        if seed == fail_seed:
            return SimpleNamespace(returncode=3)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(_metrics(seed)))
        epochs = cmd[cmd.index("--epochs") + 1] if "--epochs" in cmd else "5"
        (out / "config.yaml").write_text(f"seed: {seed}\noutput_dir: {out}\nepochs: {epochs}\nlr: 0.001\n")
        return SimpleNamespace(returncode=0)

    return run


def test_main_runs_each_seed_passes_flags_and_writes_tables(tmp_path, capsys):
    calls: list = []
    argv = ["--config", "configs/synthetic.yaml", "--seeds", "0", "1", "2", "--output_dir", str(tmp_path),
            "--epochs", "2", "--eval_block", "paper"]
    assert ms.main(argv, runner=_fake_runner(calls)) == 0
    assert len(calls) == 3
    for seed, cmd in zip((0, 1, 2), calls):
        assert cmd[:3] == [sys.executable, "-m", "video_retrieval.emcl_net.main_task_retrieval"]
        assert cmd[cmd.index("--seed") + 1] == str(seed)
        assert cmd[cmd.index("--output_dir") + 1] == str(tmp_path / f"seed_{seed}")
        assert cmd[-4:] == ["--epochs", "2", "--eval_block", "paper"] and "--overwrite" not in cmd
    summary = json.loads((tmp_path / "multiseed.json").read_text())
    assert summary["groups"]["paper"]["t2v"]["R1"]["mean"] == pytest.approx(31.0)
    assert summary["extra_flags"] == ["--epochs", "2", "--eval_block", "paper"]
    assert (tmp_path / "multiseed.md").read_text().startswith("### configs/synthetic.yaml --epochs 2")
    assert "31.0 ± 1.0" in capsys.readouterr().out
    assert summary["config_differences"] == {}

    # a second call into the finished table is refused; removing the table (not the runs) lets it run
    # again, reusing the seeds it recorded: a run with other settings than its siblings is flagged
    with pytest.raises(UserError, match=r"already holds results of multiseed.py \(multiseed.json"):
        ms.main(argv, runner=_fake_runner(calls))
    (tmp_path / "seed_1" / "config.yaml").write_text("seed: 1\nepochs: 3\nlr: 0.001\n")
    for name in ("multiseed.md", "multiseed.json"):
        (tmp_path / name).unlink()
    calls.clear()
    ms.main(argv, runner=_fake_runner(calls))
    assert calls == []
    assert ms.config_differences(tmp_path, [0, 1, 2]) == {"epochs": {0: 2, 1: 3, 2: 2}}
    assert "differ in settings" in (tmp_path / "multiseed.md").read_text()
    assert "WARNING" in capsys.readouterr().err

    # finished seeds are not run again; a new seed is
    for name in ("multiseed.md", "multiseed.json"):
        (tmp_path / name).unlink()
    ms.main(argv[:3] + ["0", "1", "2", "3"] + argv[6:], runner=_fake_runner(calls))
    assert [c[c.index("--seed") + 1] for c in calls] == ["3"]
    # --overwrite: the recorded seed folders are removed, every seed runs afresh, never with --overwrite
    (tmp_path / "seed_0" / "left_by_the_old_run.txt").write_text("x")
    calls.clear()
    ms.main(argv + ["--overwrite"], runner=_fake_runner(calls))
    assert len(calls) == 3 and not any("--overwrite" in c for c in calls)
    assert not (tmp_path / "seed_0" / "left_by_the_old_run.txt").exists()
    assert not (tmp_path / "seed_3").exists()  # recorded by the earlier table: removed with it
    calls.clear()
    ms.main(argv[:6] + ["--nproc_per_node", "2"] + argv[6:] + ["--rerun"], runner=_fake_runner(calls))
    assert calls[0][:7] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                            "2", "-m"]
    assert not (tmp_path / ".run.lock").exists()


def test_main_errors(tmp_path):
    calls: list = []
    base = ["--config", "c.yaml", "--output_dir", str(tmp_path)]
    with pytest.raises(SystemExit, match="seed 1 failed .*exit status 3.*seed_1"):
        ms.main(base + ["--seeds", "0", "1", "2"], runner=_fake_runner(calls, fail_seed=1))
    assert len(calls) == 2  # stops at the failing seed
    for bad in (["--seed", "4"], ["--seed=4"]):
        with pytest.raises(SystemExit):
            ms.parse_args(base + ["--seeds", "0"] + bad)
    with pytest.raises(SystemExit):
        ms.parse_args(base + ["--seeds", "0", "0"])
    # dry run: commands printed, nothing run or written
    calls.clear()
    ms.main(base + ["--seeds", "5", "6", "--dry_run"], runner=_fake_runner(calls))
    assert calls == [] and not (tmp_path / "seed_5").exists()


def test_script_dry_run_from_another_folder(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "multiseed.py"), "--config", "configs/synthetic.yaml",
         "--seeds", "0", "1", "--output_dir", str(tmp_path / "out"), "--dry_run", "--epochs", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--seed 0" in proc.stdout and "--seed 1" in proc.stdout and "--epochs 1" in proc.stdout
    assert not (tmp_path / "out").exists()
