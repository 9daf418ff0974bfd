"""emcl.train.tables (what the table scripts share) and scripts/emcl_table.py end to end, its training runs
replaced by tests/_fake_train.py: lanes side by side, a log per run, failures named, table.md/json/png."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from emcl.train import tables

try:  # tests/ may or may not be a package
    from tests._video_fixtures import load_script
except ImportError:
    from _video_fixtures import load_script

FAKE = "tests._fake_train"


def test_module_command_and_markdown():
    assert tables.module_command("a.b", ["--x", "1"]) == [sys.executable, "-m", "a.b", "--x", "1"]
    assert tables.module_command("a.b", [], nproc_per_node=4)[2:7] == [
        "torch.distributed.run", "--standalone", "--nproc_per_node", "4", "-m"]
    assert tables.markdown_table(["a", "b", "c"], [["1", "2", "3"]], right_from=1) == [
        "| a | b | c |", "|---|---:|---:|", "| 1 | 2 | 3 |"]
    assert tables.markdown_table(["a"], [])[1] == "|---|"
    cells = [tables.number_cell(v, s) for v, s in ((None, False), (1.25, False), (0.04, True), (-2, True))]
    assert cells == ["-", "1.2", "+0.0", "-2.0"]
    assert tables.numbers({"R1": 3, "ok": True, "name": "x", "MnR": 2.5}) == {"R1": 3.0, "MnR": 2.5}
    assert tables.numbers({"MnR": 2, "R1": 1}, ("R1", "R5", "MnR")) == {"R1": 1.0, "MnR": 2.0}


def test_run_files(tmp_path):
    with pytest.raises(tables.RunFileError, match="cannot read"):
        tables.read_json(tmp_path / "metrics.json")
    (tmp_path / "metrics.json").write_text("[1]")
    with pytest.raises(tables.RunFileError, match="expected a JSON object"):
        tables.read_json(tmp_path / "metrics.json")
    assert not tables.has_results(tmp_path, "test")
    (tmp_path / "metrics.json").write_text(json.dumps({"test": {"t2v": {}}, "val": 1}))
    assert tables.has_results(tmp_path, "test") and not tables.has_results(tmp_path, "val")
    assert tables.read_config(tmp_path) == {}
    (tmp_path / "config.yaml").write_text("a: [1\n")
    with pytest.raises(tables.RunFileError, match="not valid YAML"):
        tables.read_config(tmp_path)
    md, js = tables.write_table(tmp_path / "t", "| x |\n", {"x": 1})
    assert md.read_text() == "| x |\n" and json.loads(js.read_text()) == {"x": 1}
    with pytest.raises(ValueError, match="non-finite"):  # nothing written when the JSON is refused
        tables.write_table(tmp_path / "bad", "| x |\n", {"x": float("nan")})
    assert not (tmp_path / "bad.md").exists() and not (tmp_path / "bad.json").exists()


def test_launch_logs_and_names_a_failure(tmp_path):
    ok = tables.SubRun("ok", [sys.executable, "-c", "print('hello')"], tmp_path, log=tmp_path / "ok.log")
    assert tables.launch(ok, tmp_path) >= 0 and (tmp_path / "ok.log").read_text() == "hello\n"
    bad = tables.SubRun("run 2", [sys.executable, "-c", "raise SystemExit(4)"], tmp_path / "r2")
    with pytest.raises(SystemExit, match=r"run 2 failed \(exit status 4\); see .*r2"):
        tables.launch(bad, tmp_path, runner=lambda cmd, cwd: subprocess.run(cmd, cwd=cwd))
    # lanes side by side, each in order; results in lane order
    assert tables.run_lanes([[1, 2], [3], [4, 5]], lambda x: 10 * x, jobs=2) == [10, 20, 30, 40, 50]

    def work(x: int) -> int:
        if x == 2:
            raise SystemExit("boom")
        return x

    with pytest.raises(SystemExit, match="boom"):
        tables.run_lanes([[1], [2]], work, jobs=2)


@pytest.fixture
def emcl_table(monkeypatch):
    script = load_script("emcl_table")
    runs = script._runs
    monkeypatch.setattr(script, "_runs", lambda a: [[{**r, "module": FAKE} for r in ln] for ln in runs(a)])
    return script


def test_emcl_table_end_to_end(emcl_table, tmp_path, capsys):
    out = tmp_path / "table"
    table = emcl_table.main(["--output_dir", str(out), "--mmt_flags", "--epochs", "1"])
    rows = table["rows"]
    assert [(r["model"], r["emcl"], r["no_em"]) for r in rows] == [
        ("MMT", False, True), ("MMT", True, False), ("mean-pooling CLIP", False, True),
        ("mean-pooling CLIP", True, False)]
    # without EMCL the one 'none' number stands under both policies; with it, each policy's own
    assert rows[0]["policies"]["paper"] == rows[0]["policies"]["query"]
    assert rows[1]["policies"]["query"]["R1"] == rows[1]["policies"]["paper"]["R1"] + 1
    assert json.loads((out / "table.json").read_text())["rows"] == rows
    md = (out / "table.md").read_text()
    assert md.startswith("| baseline | EMCL | paper R1 |") and "| MMT | no (no EM: one number) |" in md
    assert md == capsys.readouterr().out.rstrip("\n") + "\n"
    assert (out / "table.png").is_file()
    assert "--epochs', '1'" in (out / "mmt_emcl1.log").read_text()
    assert sorted(p.name for p in out.glob("*.log")) == [
        "meanP_emcl0.log", "meanP_emcl1.log", "mmt_emcl0.log", "mmt_emcl1.log"]
    with pytest.raises(SystemExit, match=r"MMT \(EMCL 0\) failed \(exit status 3\); see .*mmt_emcl0.log"):
        emcl_table.main(["--output_dir", str(tmp_path / "failing"), "--mmt_flags", "--fail"])


def test_scripts_share_the_helpers():
    """The three table scripts launch, read and write through emcl.train.tables, not each its own copy."""
    root = Path(__file__).resolve().parents[1] / "scripts"
    for name in ("multiseed", "emcl_table", "paper_table"):
        text = (root / f"{name}.py").read_text()
        assert "from emcl.train import tables" in text
        assert "save_json" not in text and "ThreadPoolExecutor" not in text and "json.loads" not in text
