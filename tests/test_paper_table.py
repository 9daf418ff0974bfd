"""scripts/paper_table.py on fabricated metrics files: datasets from config.yaml, policies, the paper's and
the reference's numbers beside ours, differences, synthetic runs labelled, bad files named."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from emcl.errors import cli_main

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("paper_table", REPO / "scripts" / "paper_table.py")
paper_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(paper_table)


def _res(r1: float, policy: str = "query") -> dict:
    row = {"R1": r1, "R5": r1 + 20, "R10": r1 + 30, "R50": 99.0, "MdR": 2.0, "MnR": 11.5}
    return {"t2v": dict(row), "v2t": {**row, "R1": r1 - 1}, "t2v_dsl": {**row, "R1": r1 + 3},
            "v2t_dsl": dict(row), "eval_block": policy, "num_texts": 1000, "num_videos": 1000}


def _run(root: Path, name: str, metrics: dict, cfg: dict | None) -> Path:
    d = root / name
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps(metrics))
    if cfg is not None:
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    return d / "metrics.json"


def test_real_dataset_rows_with_differences(tmp_path):
    msrvtt = _run(tmp_path, "msrvtt_8gpu", {
        "train": {"history": []},
        "test": _res(47.5, "paper"),
        "policies": {"paper": _res(47.5, "paper"), "query": _res(46.0), "none": _res(45.0, "none")},
    }, {"datatype": "msrvtt", "msrvtt_test": "1k", "clip_path": "ViT-B/32", "eval_block": "paper",
        "eval_block_size": 32, "anno_path": "data/msrvtt/anno"})
    msvd = _run(tmp_path, "msvd", {"test": _res(40.0)}, {"datatype": "msvd", "clip_path": "ViT-B/32"})
    rows, skipped = paper_table.build([str(msvd), str(msrvtt)])
    assert skipped == []
    assert [(r["dataset"], r["policy"]) for r in rows] == [
        ("MSR-VTT 1k-A", "paper"), ("MSR-VTT 1k-A", "query"), ("MSR-VTT 1k-A", "none"), ("MSVD", "query")]
    paper_row = rows[0]
    assert paper_row["paper"]["t2v"]["R1"] == 46.8
    assert paper_row["diff_paper"]["t2v"]["R1"] == pytest.approx(0.7)
    assert paper_row["diff_paper"]["t2v"]["MnR"] == pytest.approx(11.5 - 12.8)
    assert "v2t" not in paper_row["diff_paper"]  # the reported numbers give no video-to-text number
    refs = {r["label"]: r for r in paper_row["diff_reference"]}
    assert refs["reference re-run, 2 GPUs"]["t2v"]["R1"] == pytest.approx(0.5)
    assert refs["reference re-run, 8 GPUs"]["t2v"]["R5"] == pytest.approx(67.5 - 74.7)
    assert "the run's main policy" in paper_row["policy_label"]
    assert rows[3]["diff_paper"]["t2v"]["MdR"] == 0.0
    md = paper_table.markdown(rows, dsl=True)
    policy = "paper, blocks of 32 (the run's main policy)"
    assert f"| MSR-VTT 1k-A | `msrvtt_8gpu` | {policy} | **ours** | 47.5 |" in md
    # R@5 67.5 - 73.1, R@10 77.5 - 83.1, no MdR reported, MnR 11.5 - 12.8, nothing for video-to-text
    assert "| ours − paper | +0.7 | -5.6 | -5.6 | - | -1.3 | - | - | - | - | - |" in md
    assert "paper, DSL | 51.6" in md


def test_synthetic_runs_in_two_layouts(tmp_path, capsys):
    syn = {"out": "data/synthetic", "num_videos": 1400}
    a = _run(tmp_path, "demo", {"train": {}, "test": _res(34.8)},
             {"datatype": "msvd", "synthetic": syn, "anno_path": "data/synthetic/annotations",
              "clip_config": {"embed_dim": 64}})
    b = _run(tmp_path, "syn_msrvtt", {"test": _res(20.0)},
             {"datatype": "msrvtt", "msrvtt_test": "1k", "synthetic": {"out": "data/syn_msrvtt"},
              "anno_path": "data/syn_msrvtt/annotations/", "clip_config": {"embed_dim": 64}})
    out = tmp_path / "table"
    assert paper_table.main([str(a), str(b), "--out", str(out)]) == 0
    saved = json.loads((tmp_path / "table.json").read_text())["rows"]
    assert [r["dataset"] for r in saved] == ["synthetic, MSR-VTT 1k-A layout", "synthetic, MSVD layout"]
    for r in saved:
        assert r["synthetic"] and r["paper"] is not None and r["diff_paper"] is None
    md = (tmp_path / "table.md").read_text()
    assert md == capsys.readouterr().out.rstrip("\n") + "\n"
    ours = "| **ours** | 34.8 | 54.8 | 64.8 | 2.0 | 11.5 | 33.8 |"
    assert f"| synthetic, MSVD layout | `demo` | query {ours}" in md
    assert "| | | | paper | 42.1 | 71.3 | 81.1 | 2.0 | 17.6 | - |" in md.replace("|  |  |  |", "| | | |")
    assert "ours − paper" not in md and "synthetic data" in md


def test_bad_and_unfinished_files(tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text("{oops")
    unfinished = _run(tmp_path, "unfinished", {"train": {"history": [{"epoch": 1}]}}, None)
    no_t2v = _run(tmp_path, "odd", {"test": {"v2t": {}}}, None)
    good = _run(tmp_path, "ok", {"test": _res(30.0)}, None)
    rows, skipped = paper_table.build([str(broken), str(unfinished), str(no_t2v), str(good)])
    assert len(rows) == 1 and rows[0]["dataset"].startswith("unknown dataset")
    assert any(str(broken) in s and "not valid JSON" in s for s in skipped)
    assert any(str(unfinished) in s and "no test or val results" in s for s in skipped)
    assert any(str(no_t2v) in s and "no t2v results" in s for s in skipped)
    with pytest.raises(SystemExit) as stop:
        cli_main(paper_table.main, [str(broken), "--out", str(tmp_path / "t")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == "error: no usable metrics file among the arguments"
    assert not (tmp_path / "t.md").exists() and not (tmp_path / "t.json").exists()
    val_only = _run(tmp_path, "valrun", {"val": _res(10.0)}, {"datatype": "lsmdc"})
    (row,) = paper_table.build([str(val_only)])[0]
    assert row["split"] == "val" and row["paper"] is None
    assert any("no LSMDC number" in n for n in row["notes"])


def _hash(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_table_files_only_and_never_replaced_silently(tmp_path, capsys):
    run = _run(tmp_path, "ok", {"test": _res(30.0)}, {"datatype": "msvd"})
    out = tmp_path / "table"
    assert paper_table.main([str(run), "--out", str(out)]) == 0
    first = {p.name: _hash(p) for p in tmp_path.iterdir() if p.is_file()}
    assert sorted(first) == ["table.json", "table.md"]
    run_files = {p.name: _hash(p) for p in run.parent.iterdir()}
    # a second table onto the first: refused (one line naming the files), nothing changed
    for argv in ([str(run), "--out", str(out)],
                 [str(run), "--out", str(run.parent / "metrics"), "--overwrite"]):  # the run's metrics.json
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            cli_main(paper_table.main, argv)
        assert stop.value.code == 2
        line = capsys.readouterr().err.strip()
        assert line.startswith(f"error: --out {argv[2]}") and "\n" not in line
        assert ("already exist" in line) if argv[2] == str(out) else ("a run's file" in line)
    assert {p.name: _hash(p) for p in tmp_path.iterdir() if p.is_file()} == first
    assert {p.name: _hash(p) for p in run.parent.iterdir()} == run_files
    # --overwrite replaces the table, and only its two files
    assert paper_table.main([str(run), "--out", str(out), "--overwrite", "--dsl"]) == 0
    assert "ours, DSL" in (tmp_path / "table.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["table.json", "table.md"]
