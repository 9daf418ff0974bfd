"""End to end: bad input a new user could give an entry point (EMCL-Net's first, then every trainer and
the inference module) stops the run with a one-line error (exit status 2) that names the file, flag or
setting, leaves no result file that could be mistaken for a valid one, and never touches an earlier run's
files.

Most runs go through ``cli_main(main, argv)`` in this process, exactly what ``python -m
video_retrieval.emcl_net.main_task_retrieval`` does, to keep the tests fast; the concurrent-run, the
one-line and the Ctrl-C cases also start the real command in a subprocess.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from emcl.data.synthetic import make_synthetic
from emcl.errors import UserError, cli_main
from video_retrieval.emcl_net import main_task_retrieval as mtr

ROOT = Path(__file__).resolve().parents[1]
MODULE = "video_retrieval.emcl_net.main_task_retrieval"
RESULTS = ("metrics.json", "checkpoint_last.pt", "checkpoint_best.pt")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syn_msrvtt")
    make_synthetic(out, 24, seed=2, format="msrvtt", split_sizes=(16, 0, 8), frames=8, fps=4, size=32)
    return out


def flags(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--datatype", "msrvtt", "--config", str(ROOT / "configs/synthetic.yaml"),
        "--anno_path", str(data / "annotations"), "--video_path", str(data / "videos"),
        "--output_dir", str(out), "--batch_size", "8", "--batch_size_val", "16", "--workers", "0",
        "--max_frames", "2", "--epochs", "1", "--n_display", "1", "--device", "cpu", *extra,
    ]  # fmt: skip


def cli(argv: list[str], main=mtr.main) -> tuple[int, str]:
    """Run an entry point (EMCL-Net's unless told) in this process as ``python -m`` would: (exit status,
    stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            cli_main(main, argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, err.getvalue()


def error_line(stderr: str) -> str:
    """The one ``error: ...`` line a user-fixable error prints (progress bars may come before it)."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), stderr
    return lines[-1]


def no_results(out: Path) -> None:
    """Nothing in ``out`` could be taken for a result: no metrics, no checkpoint, no lock left behind."""
    present = [n for n in (*RESULTS, ".run.lock") if (out / n).exists()]
    assert present == [], present


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(autouse=True)
def _reset_logging():
    """In-process runs point the root logger at this test's captured stdout and train.log: undo that."""
    yield
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()


@pytest.fixture(scope="module")
def concurrent(data, tmp_path_factory):
    """Run A (seed 1) as a subprocess; once it holds the folder, start run B (seed 2) in the same folder."""
    out = tmp_path_factory.mktemp("shared") / "run"
    a = subprocess.Popen(
        [sys.executable, "-m", MODULE, *flags(data, out, "--seed", "1")],
        cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lock = out / ".run.lock"
    holder = None
    while a.poll() is None and holder is None:
        with contextlib.suppress(OSError, ValueError):
            holder = json.loads(lock.read_text())
        time.sleep(0.02)
    assert holder is not None, "run A ended before it took the lock: " + (a.communicate()[1] or "")[-2000:]
    b_code, b_err = cli(flags(data, out, "--seed", "2"))
    b_running_after = a.poll() is None
    a_out, a_err = a.communicate(timeout=600)
    return {
        "out": out,
        "a": a,
        "a_err": a_err,
        "holder": holder,
        "b_code": b_code,
        "b_err": b_err,
        "a_still_running": b_running_after,
    }


@pytest.fixture(scope="module")
def finished(concurrent) -> Path:
    assert concurrent["a"].returncode == 0, concurrent["a_err"][-3000:]
    return concurrent["out"]


# ------------------------------------------------------------------------------- 1. one run per folder
def test_second_run_in_a_folder_stops_with_the_lock_error(concurrent, finished):
    out, holder = concurrent["out"], concurrent["holder"]
    assert holder["pid"] == concurrent["a"].pid
    assert concurrent["b_code"] == 2
    line = error_line(concurrent["b_err"])
    assert line.startswith(
        f"error: output folder {out} is in use by another run: pid {holder['pid']} on "
        f"host {holder['host']}, started {holder['started']}"
    )
    assert concurrent["a_still_running"]  # B gave up while A was still working
    # A finished normally and every file is A's
    metrics = json.loads((finished / "metrics.json").read_text())
    assert metrics["finished"] is True and metrics["test"]["num_videos"] == 8
    assert yaml.safe_load((finished / "config.yaml").read_text())["seed"] == 1
    assert torch.load(finished / "checkpoint_last.pt", weights_only=False)["config"]["seed"] == 1
    assert not (finished / ".run.lock").exists()


def test_busy_folder_is_refused_before_the_heavy_imports(data, tmp_path):
    """``python -m ...`` checks the lock before importing torch, so a second run stops at once."""
    out = tmp_path / "busy"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() + 5))
        rec = {
            "pid": holder.pid,
            "host": os.uname().nodename,
            "started": started,
            "argv": ["x"],
            "token": "t",
        }
        (out / ".run.lock").write_text(json.dumps(rec))
        code = (
            "import runpy, sys; sys.argv = ['x', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('%s', run_name='__main__')\n"
            "finally:\n    print('torch imported' if 'torch' in sys.modules else 'torch not imported')"
        ).replace("%s", MODULE)
        proc = subprocess.run(
            [sys.executable, "-c", code, *flags(data, out)], cwd=ROOT, env=env(), capture_output=True,
            text=True, timeout=120,
        )  # fmt: skip
    finally:
        holder.kill()
    assert proc.returncode == 2
    assert error_line(proc.stderr).startswith(
        f"error: output folder {out} is in use by another run: pid {holder.pid}"
    )
    assert "torch not imported" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == [".run.lock"]


def test_stale_lock_is_reported_with_the_rm_command_and_taken_over_by_resume(data, finished, tmp_path):
    out = tmp_path / "killed"
    shutil.copytree(finished, out)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {
        "pid": dead.pid,
        "host": os.uname().nodename,
        "started": "2026-01-01T00:00:00+00:00",
        "argv": ["main_task_retrieval.py"],
        "token": "x",
    }
    (out / ".run.lock").write_text(json.dumps(stale))
    code, err = cli(flags(data, out, "--seed", "1"))
    assert code == 2
    line = error_line(err)
    assert line.startswith(
        f"error: output folder {out} has a stale lock: the run that took it (pid {dead.pid}"
    )
    assert line.endswith(f"clear the lock with: rm {out / '.run.lock'}")
    code, err = cli(flags(data, out, "--seed", "1", "--resume"))  # a requeued job takes it over
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["resumed_from"] == str(out / "checkpoint_last.pt")
    assert not (out / ".run.lock").exists()


def test_finished_folder_is_not_reused_and_errors_are_one_line(data, finished):
    before = {n: (finished / n).read_bytes() for n in ("metrics.json", "config.yaml")}
    proc = subprocess.run(
        [sys.executable, "-m", MODULE, *flags(data, finished, "--seed", "3")],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: output folder {finished} already holds a finished run (metrics.json says finished). Pass "
        "--resume to continue it from checkpoint_last.pt (settings that define the model or the experiment "
        "must match), --overwrite to delete its results and start again, or choose another --output_dir"
    ]
    assert {n: (finished / n).read_bytes() for n in before} == before
    # --debug: the same error with its traceback
    with pytest.raises(UserError, match="already holds a finished run"):
        cli_main(mtr.main, flags(data, finished, "--seed", "3", "--debug"))


def test_overwrite_replaces_the_earlier_run(data, finished, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(finished, out)
    (out / "checkpoint_best.pt").write_bytes(b"an old selection")  # would not be rewritten: no val split
    code, err = cli(flags(data, out, "--seed", "3", "--max_steps", "1", "--overwrite"))
    assert code == 0, err
    assert not (out / "checkpoint_best.pt").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] is True and metrics["train"]["history"][-1]["step"] == 1
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 3
    assert "--overwrite: removed the earlier run's checkpoint_best.pt" in (out / "train.log").read_text()


def test_resume_without_a_checkpoint_starts_fresh_and_says_so(data, tmp_path):
    out = tmp_path / "requeued"
    code, err = cli(flags(data, out, "--max_steps", "1", "--resume"))
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["resumed_from"] is None
    assert "--resume: no" in (out / "train.log").read_text()


# ------------------------------------------------------------------------------------ 2. stored settings
def test_resume_with_other_settings_is_refused_before_anything_is_written(data, finished):
    names = ("metrics.json", "config.yaml", "checkpoint_last.pt")
    before = {n: (finished / n).stat().st_mtime_ns for n in names}
    code, err = cli(
        flags(
            data, finished, "--seed", "1", "--resume", "--lr", "0.01", "--msrvtt_train", "7k", "--epochs", "3"
        )
    )
    assert code == 2
    line = error_line(err)
    ck = finished / "checkpoint_last.pt"
    assert line.startswith(f"error: checkpoint {ck} was trained with other settings")
    assert "lr: 0.001 → 0.01" in line and "msrvtt_train: 9k → 7k" in line
    assert "epochs" not in line  # extending a run is allowed
    assert {n: (finished / n).stat().st_mtime_ns for n in names} == before
    assert not (finished / ".run.lock").exists()


def test_init_model_from_another_architecture(data, finished, tmp_path):
    ck = finished / "checkpoint_last.pt"
    # fine-tuning: the weights must fit the model these settings build
    code, err = cli(
        flags(data, tmp_path / "k", "--do_train", "1", "--init_model", str(ck), "--centerK", "16")
    )
    assert code == 2
    assert error_line(err).startswith(
        f"error: --init_model {ck} was trained with other settings (old → this run): centerK: 32 → 16."
    )
    no_results(tmp_path / "k")
    # another head count inside clip_config: loads silently without the check
    config = yaml.safe_load((ROOT / "configs/synthetic.yaml").read_text())
    config["clip_config"]["vision_heads"] = 4
    (tmp_path / "heads.yaml").write_text(yaml.safe_dump(config))
    argv = flags(data, tmp_path / "h", "--init_model", str(ck))
    argv[argv.index("--config") + 1] = str(tmp_path / "heads.yaml")
    code, err = cli(argv)
    assert code == 2 and "clip_config.vision_heads: 2 → 4" in error_line(err)
    no_results(tmp_path / "h")
    # evaluation only: a weight-defining flag given explicitly must agree with the checkpoint
    code, err = cli(
        flags(data, tmp_path / "e", "--do_eval", "1", "--init_model", str(ck), "--agg_layers", "2")
    )
    assert code == 2
    assert error_line(err) == (
        f"error: {ck} cannot be evaluated with these settings: agg_layers: 1 in the checkpoint, 2 given"
    )
    no_results(tmp_path / "e")
    # a checkpoint without its settings (another tool's): the size mismatch names the file
    bare = tmp_path / "bare.pt"
    torch.save({"model": torch.load(ck, weights_only=False)["model"]}, bare)
    code, err = cli(
        flags(data, tmp_path / "b", "--do_train", "1", "--init_model", str(bare), "--centerK", "16")
    )
    assert code == 2
    assert error_line(err) == (
        f"error: {bare} does not fit the model these settings build: 1 tensor(s) of "
        "another shape: emcl.mu: (1, 32) in the file, (1, 16) in the model"
    )
    no_results(tmp_path / "b")


# ----------------------------------------------------------------------------------- 3. non-finite loss
def test_non_finite_loss_stops_at_that_step_without_a_checkpoint(data, tmp_path, monkeypatch):
    calls = []
    real_step = mtr.TASK.step

    def nan_on_second_step(*args):
        loss = real_step(*args)
        calls.append(1)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(mtr.TASK, "step", nan_on_second_step)
    out = tmp_path / "nan"
    code, err = cli(flags(data, out, "--epochs", "2"))
    assert code == 2
    assert error_line(err).startswith("error: non-finite loss or gradient at epoch 1, step 2")
    assert len(calls) == 2  # stopped at once
    no_results(out)


def test_non_finite_weights_are_not_saved(data, tmp_path, monkeypatch):
    def overflow(self, model):  # an update that overflowed while the loss was still finite
        with torch.no_grad():
            model.clip.logit_scale.fill_(float("inf"))

    monkeypatch.setattr(mtr.TASK, "after_step", overflow)
    out = tmp_path / "inf"
    code, err = cli(flags(data, out, "--max_steps", "1"))
    assert code == 2
    assert error_line(err).startswith("error: non-finite weights after epoch 1, step 1 (clip.logit_scale)")
    no_results(out)


# ------------------------------------------------------------------------------ 4. everything skipped
@pytest.fixture
def unreadable_train(data, tmp_path) -> Path:
    """A copy of the data whose 16 training videos are garbage (non-empty: they pass the up-front stat)."""
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    rows = (copy / "annotations/MSRVTT_JSFUSION_test.csv").read_text().splitlines()[1:]
    test_ids = {r.split(",")[2] for r in rows}
    for video in (copy / "videos").iterdir():
        if video.stem not in test_ids:
            video.write_bytes(b"not a video")
    return copy


def test_unreadable_videos_are_named_and_bounded(unreadable_train, tmp_path):
    out = tmp_path / "o"
    for workers in ("0", "1"):  # without --skip_bad_videos: the first bad video, named in one line
        code, err = cli([*flags(unreadable_train, out), "--workers", workers])
        assert code == 2
        line = error_line(err)
        pattern = r"error: video 'video\d+' \(.*video\d+\.mp4\): unreadable or corrupt file"
        assert re.match(pattern, line), line
        no_results(out)
    code, err = cli(flags(unreadable_train, out, "--skip_bad_videos", "--overwrite"))
    assert code == 2
    line = error_line(err)
    assert re.search(
        r"error: train: \d+ of 16 videos \([0-9.]+%\) are unreadable, more than "
        r"--max_skip_fraction 0.05 allows \(0\): video\d+",
        line,
    ), line
    no_results(out)
    code, err = cli(flags(unreadable_train, out, "--skip_bad_videos", "--max_skip_fraction", "1"))
    assert code == 2
    assert error_line(err).startswith(
        "error: epoch 1 took no training step: every batch was skipped (16 unreadable video(s): "
    )
    no_results(out)


# ---------------------------------------------------------------------- 5. failures found before step 1
@pytest.fixture
def copy_of(data, tmp_path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    return copy


def _trained(out: Path) -> bool:
    log = out / "train.log"
    return log.exists() and "epoch 1 step" in log.read_text()


def test_truncated_test_csv_fails_before_step_1(copy_of, tmp_path):
    csv = copy_of / "annotations/MSRVTT_JSFUSION_test.csv"
    text = csv.read_text()
    cut = text.index("\n", len(text) // 2) + 12  # in the middle of a row
    csv.write_text(text[:cut])
    out = tmp_path / "o"
    code, err = cli(flags(copy_of, out))
    assert code == 2
    line = error_line(err)
    assert line.startswith(f"error: {csv}: line ") and "expected 4 comma-separated fields" in line
    assert "truncated" in line
    assert not _trained(out)
    no_results(out)


def test_missing_or_empty_test_video_fails_before_step_1(copy_of, tmp_path):
    rows = (copy_of / "annotations/MSRVTT_JSFUSION_test.csv").read_text().split("\n")[1:]
    first, second = rows[0].split(",")[2], rows[1].split(",")[2]
    (copy_of / "videos" / f"{first}.mp4").unlink()
    (copy_of / "videos" / f"{second}.mp4").write_bytes(b"")
    out = tmp_path / "o"
    code, err = cli(flags(copy_of, out))
    assert code == 2
    assert error_line(err) == (
        f"error: msrvtt/test: 2 of 8 videos cannot be used (looked in folder "
        f"{copy_of / 'videos'}): {first} (missing); {second} (empty (0 bytes))"
    )
    assert not _trained(out)
    no_results(out)


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"eval_block": "Paper"}, "eval_block: invalid choice: 'Paper' (choose from 'paper', 'query', "),
        ({"epochs": 1.5}, "epochs: '1.5' is not an integer (an integer >= 1)"),
        ({"lamd": 0}, "lamd: 0 is out of range (a number > 0)"),
        ({"skip_bad_videos": "yes"}, "skip_bad_videos: expected true or false, got 'yes'"),
        ({"learning_rate": 0.1}, "unknown option(s) 'learning_rate'"),
    ],
)
def test_config_file_values_are_checked_like_flags(data, tmp_path, change, expected):
    config = {**yaml.safe_load((ROOT / "configs/synthetic.yaml").read_text()), **change}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = flags(data, tmp_path / "o")
    argv[argv.index("--config") + 1] = str(path)
    if "epochs" in change:  # the flag would override the file
        i = argv.index("--epochs")
        del argv[i : i + 2]
    code, err = cli(argv)
    assert code == 2
    line = error_line(err)
    assert line.startswith(f"error: config {path}: ") and expected in line
    assert not (tmp_path / "o").exists()  # stopped while parsing


def test_clip_config_typo_names_the_key(data, tmp_path):
    config = yaml.safe_load((ROOT / "configs/synthetic.yaml").read_text())
    config["clip_config"]["vision_widht"] = config["clip_config"].pop("vision_width")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = flags(data, tmp_path / "o")
    argv[argv.index("--config") + 1] = str(path)
    code, err = cli(argv)
    assert code == 2
    line = error_line(err)
    assert line.startswith(
        f"error: {path}: clip_config: unknown key(s) 'vision_widht' (did you mean "
        "'vision_width'?); allowed keys: embed_dim, image_size, patch_size, vision_width"
    )
    no_results(tmp_path / "o")
    assert not (tmp_path / "o" / "config.yaml").exists()


# ------------------------------------------------------------------------------------------- 7. flags
@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--temp", "0"], "argument --temp: 0 is out of range (a number > 0)"),
        (["--lamd", "0"], "argument --lamd: 0 is out of range (a number > 0)"),
        (["--lr=-0.001"], "argument --lr: -0.001 is out of range (a number > 0)"),
        (["--epochs", "0"], "argument --epochs: 0 is out of range (an integer >= 1)"),
        (["--max_skip_fraction", "1.5"], "--max_skip_fraction: 1.5 is out of range (a number from 0 to 1)"),
        (["--lam", "0.5"], "unrecognized arguments: --lam 0.5"),
    ],
)
def test_flags_are_checked_at_parse_time(data, tmp_path, extra, expected):
    code, err = cli(flags(data, tmp_path / "o", *extra))
    assert code == 2 and expected in err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_fails_before_any_work(data, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        code, err = cli(flags(data, out))
    finally:
        out.chmod(0o755)
    assert code == 2 and "not writable" in error_line(err) and str(out) in error_line(err)


def test_synthetic_section_typo_names_the_key(tmp_path):
    config = yaml.safe_load((ROOT / "configs/synthetic.yaml").read_text())
    config["synthetic"]["out"] = str(tmp_path / "syn")
    config["synthetic"]["num_video"] = config["synthetic"].pop("num_videos")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    code, err = cli(["--config", str(path), "--output_dir", str(tmp_path / "o"), "--device", "cpu"])
    assert code == 2
    assert error_line(err).startswith(
        f"error: {path}: synthetic: unknown key(s) 'num_video' (did you mean "
        "'num_videos'?); allowed keys: num_videos, seed, split_sizes"
    )
    assert not (tmp_path / "syn").exists()
    no_results(tmp_path / "o")


# ===================================================================== every entry point: trainers, inference
# EMCL-Net (above), MMT joint training, EMCL-QA and the inference module, each as a user types it.
ENTRIES = ("emcl_net", "mmt", "qa", "inference")
MODULES = {
    "emcl_net": MODULE,
    "mmt": "video_retrieval.joint_training.main_task_joint",
    "qa": "video_question_answering.main_task_qa",
    "inference": "video_retrieval.inference_module.main_task_inference",
}


def main_of(entry: str):
    """The entry point's ``main`` (imported on use: the inference module and MMT pull in their own code)."""
    import importlib

    return importlib.import_module(MODULES[entry]).main


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder``: an earlier run's files, to compare after a refused run."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _tiny_config(tmp: Path, base: str, name: str, **over) -> Path:
    config = yaml.safe_load((ROOT / "configs" / base).read_text())
    for key, value in over.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict[str, Path]:
    """The shipped CPU configs with their synthetic data in a temporary folder and tiny sizes."""
    tmp = tmp_path_factory.mktemp("configs")
    small = {"num_videos": 12, "split_sizes": [4, 4, 4]}
    return {
        "emcl_net": _tiny_config(tmp, "synthetic.yaml", "emcl_net", epochs=1, batch_size=4, workers=0,
                                 synthetic={"out": str(tmp / "syn"), **small}),
        "qa": _tiny_config(tmp, "synthetic_qa.yaml", "qa", epochs=1, batch_size=4, workers=0,
                           synthetic={"out": str(tmp / "qa"), **small}),
        "mmt": _tiny_config(tmp, "mmt_synthetic.yaml", "mmt", epochs=1, iters_per_epoch=2, batch_size=8,
                            batch_size_val=16, synthetic={"out": str(tmp / "experts"), "num_videos": 40,
                                                          "split_sizes": [24, 16]}),
    }  # fmt: skip


@pytest.fixture(scope="module")
def emb_files(tmp_path_factory) -> tuple[Path, Path]:
    """Text and video embeddings of 12 matched pairs, as .npy files."""
    import numpy as np

    tmp = tmp_path_factory.mktemp("emb")
    rng = np.random.default_rng(0)
    video = rng.standard_normal((12, 8)).astype(np.float32)
    np.save(tmp / "T.npy", video + 0.5 * rng.standard_normal((12, 8)).astype(np.float32))
    np.save(tmp / "V.npy", video)
    return tmp / "T.npy", tmp / "V.npy"


def entry_argv(
    entry: str, out: Path, configs: dict[str, Path], emb: tuple[Path, Path], *extra: str
) -> list[str]:
    """What a user types to run ``entry`` into ``out`` (the CPU config, or two embedding files)."""
    if entry == "inference":
        source = ["--text_emb", str(emb[0]), "--video_emb", str(emb[1])]
    else:
        source = ["--config", str(configs[entry])]
    return [*source, "--output_dir", str(out), "--device", "cpu", *extra]


def one_error_line(stderr: str) -> str:
    """The whole of stderr: exactly one ``error: ...`` line."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


# ----------------------------------------------------------------- 8. flag values, refused while parsing
RANGE = {
    "eval_block_size": "argument --eval_block_size: 0 is out of range (an integer >= 1)",
    "max_skip_fraction": "argument --max_skip_fraction: 2 is out of range (a number from 0 to 1)",
    "lamd": "argument --lamd: 0 is out of range (a number > 0)",
}
BAD_VALUES = [
    *(pytest.param(e, ["--eval_block_size", "0"], RANGE["eval_block_size"], id=f"{e}-eval_block_size")
      for e in ("emcl_net", "mmt", "inference")),
    pytest.param("qa", ["--eval_block_size", "0"], "unrecognized arguments: --eval_block_size 0",
                 id="qa-eval_block_size"),  # QA ranks no retrieval scores: it has no such flag
    *(pytest.param(e, ["--max_skip_fraction", "2"], RANGE["max_skip_fraction"], id=f"{e}-max_skip_fraction")
      for e in ENTRIES),
    *(pytest.param(e, ["--lamd", "0"], RANGE["lamd"], id=f"{e}-lamd") for e in ENTRIES),
    *(pytest.param(e, ["--beta", "-3"], "argument --beta: -3 is out of range (a number >= 0)", id=f"{e}-beta")
      for e in ("emcl_net", "mmt", "qa")),
    # values MMT used to accept before its flags took the shared range-checked types
    pytest.param("mmt", ["--margin", "-1"], "argument --margin: -1 is out of range (a number >= 0)",
                 id="mmt-margin"),
    pytest.param("mmt", ["--gamma", "0"], "argument --gamma: 0 is out of range (a number > 0)",
                 id="mmt-gamma"),
    pytest.param("mmt", ["--temp", "3"], "unrecognized arguments: --temp 3", id="mmt-temp"),
    # the inference module
    pytest.param("inference", ["--beta", "-4"], "argument --beta: -4 is out of range (a number >= 0)",
                 id="inference-beta"),
    pytest.param("inference", ["--K", "0"], "argument --centerK/--K: 0 is out of range (an integer >= 1)",
                 id="inference-K"),
    pytest.param("inference", ["--dsl_temperature", "0"],
                 "argument --dsl_temperature: 0 is out of range (a number > 0)", id="inference-dsl0"),
    pytest.param("inference", ["--dsl_temperature=-1"],
                 "argument --dsl_temperature: -1 is out of range (a number > 0)", id="inference-dsl-neg"),
    pytest.param("inference", ["--sweep", "--sweep_K", "0"],
                 "argument --sweep_K: 0 is out of range (an integer >= 1)", id="inference-sweep_K"),
    pytest.param("inference", ["--sweep", "--sweep_K", "2.5"],
                 "argument --sweep_K: '2.5' is not an integer (an integer >= 1)",
                 id="inference-sweep_K-float"),
    pytest.param("inference", ["--sweep", "--sweep_T", "1,0"],
                 "argument --sweep_T: 0 is out of range (an integer >= 1)", id="inference-sweep_T"),
    pytest.param("inference", ["--sweep", "--sweep_lamd", "0.1,0"],
                 "argument --sweep_lamd: 0 is out of range (a number > 0)", id="inference-sweep_lamd"),
    pytest.param("inference", ["--sweep", "--sweep_beta", "0,-1"],
                 "argument --sweep_beta: -1 is out of range (a number >= 0)", id="inference-sweep_beta"),
    pytest.param("inference", ["--sweep", "--sweep_K", ","],
                 "argument --sweep_K: expected comma-separated values (an integer >= 1), got ','",
                 id="inference-sweep_K-empty"),
]  # fmt: skip


@pytest.mark.parametrize("entry, extra, expected", BAD_VALUES)
def test_out_of_range_values_stop_every_entry_point_in_one_line(entry, extra, expected, configs, emb_files,
                                                                tmp_path):
    out = tmp_path / "o"
    code, err = cli(entry_argv(entry, out, configs, emb_files, *extra), main_of(entry))
    assert code == 2
    assert one_error_line(err) == f"error: {expected}"  # no forty-line usage block before it
    assert not out.exists()  # stopped while parsing: nothing created, nothing scored


def test_sweep_lists_in_a_config_file_are_checked_like_flags(emb_files, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sweep: true\nsweep_K: 3,0\n")
    out = tmp_path / "o"
    code, err = cli(entry_argv("inference", out, {}, emb_files, "--config", str(path)), main_of("inference"))
    assert code == 2
    assert one_error_line(err) == f"error: config {path}: sweep_K: 0 is out of range (an integer >= 1)"
    assert not out.exists()


# ------------------------------------------------------------------------------- 9. the output folder
@pytest.mark.parametrize("entry", ENTRIES)
def test_output_dir_that_is_a_file_is_refused_and_left_alone(entry, configs, emb_files, tmp_path):
    out = tmp_path / "results"
    out.write_text("notes of an earlier experiment\n")
    before = digest(tmp_path)
    code, err = cli(entry_argv(entry, out, configs, emb_files), main_of(entry))
    assert code == 2
    assert one_error_line(err) == (
        f"error: --output_dir {out} is a file, not a folder: choose another --output_dir"
    )
    assert digest(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("entry", ENTRIES)
def test_read_only_folder_of_an_earlier_run_is_refused_and_left_alone(entry, configs, emb_files, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"finished": True, "task": "retrieval"}))
    (out / "train.log").write_text("epoch 1 done\n")
    before = digest(out)
    out.chmod(0o555)
    try:
        code, err = cli(entry_argv(entry, out, configs, emb_files), main_of(entry))
    finally:
        out.chmod(0o755)
    assert code == 2
    assert one_error_line(err) == (
        f"error: output folder {out} is not writable: cannot create {out / '.run.lock'} (Permission denied)"
    )
    assert digest(out) == before


def test_stale_lock_of_an_inference_run_offers_no_resume(emb_files, tmp_path):
    """The inference module has no --resume: its stale-lock message says only how to clear the lock."""
    out = tmp_path / "killed"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {"pid": dead.pid, "host": os.uname().nodename, "started": "2026-01-01T00:00:00+00:00",
             "argv": ["main_task_inference.py"], "token": "x"}  # fmt: skip
    (out / ".run.lock").write_text(json.dumps(stale))
    code, err = cli(entry_argv("inference", out, {}, emb_files), main_of("inference"))
    assert code == 2
    line = one_error_line(err)
    assert line.startswith(f"error: output folder {out} has a stale lock") and "--resume" not in line
    assert line.endswith(
        f"is no longer running. Check its results and clear the lock with: rm {out / '.run.lock'}"
    )


# ------------------------------------------------------------------------ 10. a checkpoint of another task
@pytest.fixture(scope="module")
def mmt_checkpoint(configs, tmp_path_factory) -> Path:
    """A real MMT checkpoint (one epoch of two steps on the synthetic experts)."""
    out = tmp_path_factory.mktemp("mmt") / "run"
    code, err = cli(["--config", str(configs["mmt"]), "--output_dir", str(out), "--device", "cpu"],
                    main_of("mmt"))
    assert code == 0, err
    return out / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def old_qa_checkpoint(tmp_path_factory) -> Path:
    """An EMCL-QA checkpoint written before checkpoints named their task at the top level: only its config
    says ``task: qa``."""
    path = tmp_path_factory.mktemp("qa_ck") / "checkpoint_best.pt"
    config = {"task": "qa", "task_module": MODULES["qa"], "centerK": 16, "proj_dim": 128}
    torch.save({"model": {"answer.weight": torch.zeros(3, 4)}, "epoch": 3, "config": config}, path)
    return path


def _foreign(line: str, flag: str, ck: Path, found: str, expected: str) -> bool:
    titles = {"qa": "EMCL-QA", "joint": "MMT joint training", "retrieval": "EMCL-Net"}
    module = {"qa": MODULES["qa"], "joint": MODULES["mmt"], "retrieval": MODULE}[found]
    return line == (
        f"error: {flag} {ck} is a checkpoint of {titles[found]} (task '{found}'), not of {titles[expected]} "
        f"(task '{expected}'): its weights fit only {titles[found]}'s model (python -m {module} reads it)"
    )


@pytest.mark.parametrize(
    "entry, checkpoint, extra",
    [
        pytest.param("emcl_net", "old_qa_checkpoint", [], id="qa-to-emcl_net-finetune"),
        pytest.param("emcl_net", "mmt_checkpoint", ["--do_eval", "1"], id="mmt-to-emcl_net-eval"),
        pytest.param("qa", "mmt_checkpoint", [], id="mmt-to-qa-finetune"),
        pytest.param("mmt", "emcl_net_checkpoint", ["--do_eval", "1"], id="emcl_net-to-mmt-eval"),
        pytest.param("mmt", "old_qa_checkpoint", [], id="qa-to-mmt-finetune"),
    ],
)
def test_init_model_of_another_task_names_both_tasks(entry, checkpoint, extra, configs, emb_files, request,
                                                     tmp_path):
    ck = request.getfixturevalue(checkpoint)
    before = digest(ck.parent)
    out = tmp_path / "o"
    argv = entry_argv(entry, out, configs, emb_files, "--init_model", str(ck), *extra)
    code, err = cli(argv, main_of(entry))
    assert code == 2
    found = torch.load(ck, weights_only=False)["config"]["task"]
    expected = {"emcl_net": "retrieval", "mmt": "joint", "qa": "qa"}[entry]
    assert _foreign(error_line(err), "--init_model", ck, found, expected), err
    no_results(out)
    assert not _trained(out)
    assert digest(ck.parent) == before


@pytest.fixture(scope="module")
def emcl_net_checkpoint(finished) -> Path:
    return finished / "checkpoint_last.pt"


@pytest.mark.parametrize("checkpoint", ["old_qa_checkpoint", "mmt_checkpoint"])
def test_emcl_net_checkpoint_flag_given_another_tasks_checkpoint(checkpoint, request, tmp_path):
    ck = request.getfixturevalue(checkpoint)
    out = tmp_path / "o"
    code, err = cli(["--emcl_net_checkpoint", str(ck), "--output_dir", str(out), "--device", "cpu"],
                    main_of("inference"))
    assert code == 2
    found = torch.load(ck, weights_only=False)["config"]["task"]
    assert _foreign(one_error_line(err), "--emcl_net_checkpoint", ck, found, "retrieval"), err
    assert not (out / "metrics.json").exists() and not (out / ".run.lock").exists()


def test_emcl_net_checkpoint_flag_given_a_file_of_no_known_layout(tmp_path):
    """Not ours (no config) nor the authors' layout: said so, not "fetch ViT-B-32.pt"."""
    ck = tmp_path / "weights.pt"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, ck)
    argv = ["--emcl_net_checkpoint", str(ck), "--output_dir", str(tmp_path / "o"), "--device", "cpu"]
    code, err = cli(argv, main_of("inference"))
    assert code == 2
    assert one_error_line(err) == (
        f"error: --emcl_net_checkpoint {ck} is not a checkpoint of EMCL-Net (task 'retrieval'): it has no "
        "'config' entry (ours have one) and is not in the authors' layout"
    )


# ------------------------------------------------------------- 11. CLIP weights that are not CLIP weights
def _config_without_clip(base: Path, tmp: Path) -> Path:
    """The tiny config with CLIP read from --clip_path (pretrained weights), not built from clip_config."""
    config = yaml.safe_load(base.read_text())
    config.pop("clip_config")
    path = tmp / "pretrained.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("entry", ["emcl_net", "qa"])
def test_clip_path_given_a_training_checkpoint_without_clip(entry, configs, mmt_checkpoint, tmp_path):
    out = tmp_path / "o"
    config = _config_without_clip(configs[entry], tmp_path)
    argv = ["--config", str(config), "--clip_path", str(mmt_checkpoint), "--output_dir", str(out),
            "--device", "cpu"]  # fmt: skip
    code, err = cli(argv, main_of(entry))
    assert code == 2
    line = error_line(err)
    assert line == (
        f"error: {mmt_checkpoint} is a training checkpoint of MMT joint training (task 'joint'), not CLIP "
        "weights, and holds no CLIP: give OpenAI's CLIP release (e.g. ViT-B-32.pt) or an open_clip checkpoint"
    )
    no_results(out)


def test_clip_path_given_a_file_that_is_no_checkpoint(configs, tmp_path):
    notes = tmp_path / "ViT-B-32.txt"
    notes.write_text("download from the CLIP release\n")
    out = tmp_path / "o"
    argv = ["--config", str(_config_without_clip(configs["emcl_net"], tmp_path)), "--clip_path", str(notes),
            "--output_dir", str(out), "--device", "cpu"]  # fmt: skip
    code, err = cli(argv)
    assert code == 2
    assert error_line(err) == (
        f"error: cannot read CLIP checkpoint {notes}: not a file torch.save or TorchScript wrote"
    )
    no_results(out)


# ------------------------------------------------------------------------- 12. embedding files (inference)
@pytest.mark.parametrize("flag_name", ["--text_emb", "--video_emb"])
def test_all_zero_embedding_rows_are_named_unless_kept(flag_name, emb_files, tmp_path):
    """A zero vector ties with every candidate and a tie counts as a hit: stop and name the rows, or, with
    --keep_zero_rows, warn and count them in metrics.json."""
    import numpy as np

    t, v = emb_files
    arr = np.load(t if flag_name == "--text_emb" else v)
    arr[[2, 9]] = 0
    zero = tmp_path / "zero.npy"
    np.save(zero, arr)
    files = {"--text_emb": str(t), "--video_emb": str(v), flag_name: str(zero)}
    argv = ["--text_emb", files["--text_emb"], "--video_emb", files["--video_emb"], "--device", "cpu"]
    out = tmp_path / "o"
    code, err = cli([*argv, "--output_dir", str(out)], main_of("inference"))
    assert code == 2
    assert one_error_line(err) == (
        f"error: {flag_name} {zero}: 2 of 12 rows are all zero (row 2, 9); a zero vector ties with every "
        "candidate and the tie counts as a hit. Fix the export, or pass --keep_zero_rows to score them anyway"
    )
    assert not (out / "metrics.json").exists() and not (out / ".run.lock").exists()
    kept = tmp_path / "kept"
    code, err = cli([*argv, "--output_dir", str(kept), "--keep_zero_rows"], main_of("inference"))
    assert code == 0, err
    metrics = json.loads((kept / "metrics.json").read_text())
    assert metrics["source"]["zero_rows"] == {flag_name.lstrip("-"): 2}
    assert f"{flag_name} {zero}: 2 all-zero row(s) kept (--keep_zero_rows): row 2, 9" in (
        kept / "inference.log").read_text()


def test_per_frame_videos_without_a_real_frame_are_all_named(emb_files, tmp_path):
    import numpy as np

    frames = np.random.default_rng(1).standard_normal((12, 3, 8)).astype(np.float32)
    frames[[4, 5], :] = 0
    path = tmp_path / "frames.npy"
    np.save(path, frames)
    argv = ["--text_emb", str(emb_files[0]), "--video_emb", str(path), "--output_dir", str(tmp_path / "o"),
            "--device", "cpu"]  # fmt: skip
    code, err = cli(argv, main_of("inference"))
    assert code == 2
    assert one_error_line(err) == (
        f"error: --video_emb {path}: 2 of 12 videos have only all-zero (padding) frames (video 4, 5)"
    )


# ----------------------------------------------------------- 13. expert stores, through MMT's entry point
@pytest.fixture(scope="module")
def store(configs, mmt_checkpoint) -> Path:
    """The consolidated synthetic expert store the MMT fixture run read."""
    return Path(yaml.safe_load(configs["mmt"].read_text())["synthetic"]["out"]) / "experts.h5"


def _mmt(configs, store_path: Path, out: Path) -> tuple[int, str]:
    argv = ["--config", str(configs["mmt"]), "--features", str(store_path), "--output_dir", str(out),
            "--device", "cpu"]  # fmt: skip
    return cli(argv, main_of("mmt"))


def test_truncated_expert_store(configs, store, tmp_path):
    cut = tmp_path / "experts.h5"
    cut.write_bytes(store.read_bytes()[: store.stat().st_size // 3])  # an interrupted copy
    out = tmp_path / "o"
    code, err = _mmt(configs, cut, out)
    assert code == 2
    line = error_line(err)
    assert line.startswith(f"error: {cut}: cannot read the expert store") and "truncated" in line, line
    no_results(out)
    assert not _trained(out)


def test_expert_store_with_another_column_count(configs, store, tmp_path):
    import h5py
    import numpy as np

    wide = tmp_path / "experts.h5"
    wide.write_bytes(store.read_bytes())
    with h5py.File(wide, "a") as h:  # s3d features written 8 wide where the store says 48
        rows = h["s3d"]["features"].shape[0]
        del h["s3d"]["features"]
        h["s3d"].create_dataset("features", data=np.zeros((rows, 8), dtype=np.float32))
    out = tmp_path / "o"
    code, err = _mmt(configs, wide, out)
    assert code == 2
    line = error_line(err)
    assert line.startswith(f"error: {wide}: expert 's3d': features of shape ({rows}, 8)"), line
    no_results(out)
    assert not _trained(out)


def test_non_finite_features_of_a_test_video_stop_before_training(configs, store, tmp_path):
    import h5py
    import numpy as np

    bad = tmp_path / "experts.h5"
    bad.write_bytes(store.read_bytes())
    test_ids = (store.parent / "val_list_jsfusion.txt").read_text().split()
    with h5py.File(bad, "a") as h:
        ids = [x.decode() if isinstance(x, bytes) else str(x) for x in h["video_ids"][()]]
        vid = test_ids[0]
        row = ids.index(vid)
        expert = next(e for e in ("s3d", "rgb", "vggish", "face")
                      if not h[e]["missing"][row] and h[e]["offsets"][row + 1] > h[e]["offsets"][row])
        h[expert]["features"][int(h[expert]["offsets"][row]), 0] = np.inf
    out = tmp_path / "o"
    code, err = _mmt(configs, bad, out)
    assert code == 2
    assert error_line(err) == f"error: {bad}: test features hold NaN or infinity: {vid} ({expert})"
    no_results(out)
    assert not list(out.glob("checkpoint_*.pt")) and not _trained(out)


# ------------------------------------------------------------------------- 14. Ctrl-C in the inference module
# The inference module, sent SIGINT by itself at the third sweep point (metrics.json of the main result is
# written by then), with Python's own SIGINT handler in place even when the test runs as a background job.
INTERRUPT_IN_SWEEP = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from emcl.errors import cli_main
from video_retrieval.inference_module import main_task_inference, sweep
real, calls = sweep.evaluate_settings, []

def interrupt_at_third(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGINT)
    return real(*args, **kwargs)

sweep.evaluate_settings = interrupt_at_third
cli_main(main_task_inference.main)
"""


def test_ctrl_c_in_a_sweep_exits_130_and_keeps_the_main_result(emb_files, tmp_path):
    out = tmp_path / "sweep"
    argv = entry_argv("inference", out, {}, emb_files, "--sweep", "--sweep_seeds", "2")
    proc = subprocess.run([sys.executable, "-c", INTERRUPT_IN_SWEEP, *argv], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == ["interrupted (Ctrl-C)"]
    saved = json.loads((out / "metrics.json").read_text())  # written before the sweep: whole, valid JSON
    assert saved["finished"] is True and "sweep" not in saved
    assert set(saved["with_emcl"]) == {"t2v", "v2t", "t2v_dsl", "v2t_dsl"}
    assert not (out / "sweep.csv").exists() and not (out / ".run.lock").exists()
    assert not list(out.glob(".*.tmp"))
    before = digest(out)
    code, err = cli(argv, main_of("inference"))  # the lock is gone: the next run meets the result, not a lock
    assert code == 2 and "already holds a finished run" in one_error_line(err)
    assert digest(out) == before
    code, err = cli([*argv, "--overwrite"], main_of("inference"))
    assert code == 0, err
    assert "sweep" in json.loads((out / "metrics.json").read_text())


# --------- tools that write results: tables, search indexes, figures
def tool(main, argv: list[str]) -> tuple[int, str]:
    """A tool's command as ``python -m``/the script would run it (``cli_main``): (exit status, stderr)."""
    return cli(argv, main)


def hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> hash)."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def as_root() -> bool:
    return os.geteuid() == 0


FAKE = "tests._fake_train"


def fixtures() -> tuple:
    """tests/_run_fixtures.py and tests/_video_fixtures.py (tests/ may or may not be a package)."""
    try:
        from tests import _run_fixtures, _video_fixtures
    except ImportError:
        import _run_fixtures
        import _video_fixtures
    return _run_fixtures, _video_fixtures


def load_script(name: str):
    """``scripts/NAME.py`` as a module."""
    return fixtures()[1].load_script(name)


@pytest.fixture
def emcl_table(monkeypatch):
    """scripts/emcl_table.py with its four training runs replaced by tests/_fake_train.py."""
    script = load_script("emcl_table")
    monkeypatch.setattr(script, "_runs", fake_runs(script._runs))
    return script


def fake_runs(runs):
    """The table's runs, each run by the stand-in trainer."""
    return lambda a: [[{**r, "module": FAKE} for r in lane] for lane in runs(a)]


def test_table_into_a_finished_table_folder_is_refused(emcl_table, tmp_path):
    out = tmp_path / "table"
    assert tool(emcl_table.main, ["--output_dir", str(out), "--jobs", "1"])[0] == 0
    before = hashes(out)
    code, err = tool(emcl_table.main, ["--output_dir", str(out), "--jobs", "1"])
    assert code == 2
    assert error_line(err) == (
        f"error: --output_dir {out} already holds results of emcl_table.py (table.json, table.md, table.png)."
        " Pass --overwrite to replace them, or choose another --output_dir")
    assert hashes(out) == before and not (out / ".run.lock").exists()
    # a table into a run's folder: refused even with --overwrite, the run untouched
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text('{"finished": true}')
    code, err = tool(emcl_table.main, ["--output_dir", str(run), "--overwrite"])
    assert code == 2 and error_line(err) == (
        f"error: --output_dir {run} holds another run's results (metrics.json); emcl_table.py writes into "
        "a folder of its own: choose another --output_dir")
    assert sorted(p.name for p in run.iterdir()) == ["metrics.json"]


def test_table_overwrite_never_reaches_the_runs(emcl_table, tmp_path):
    out = tmp_path / "table"
    assert tool(emcl_table.main, ["--output_dir", str(out), "--jobs", "1"])[0] == 0
    (out / "mmt_emcl0" / "left_by_the_old_run.txt").write_text("x")
    (out / "by_hand").mkdir()  # a run the table did not start: never removed
    (out / "by_hand" / "metrics.json").write_text("{}")
    code, err = tool(emcl_table.main, ["--output_dir", str(out), "--jobs", "1", "--overwrite"])
    assert code == 0, err
    assert not (out / "mmt_emcl0" / "left_by_the_old_run.txt").exists()  # removed, then run afresh
    assert (out / "by_hand" / "metrics.json").read_text() == "{}"
    record = json.loads((out / "sub_runs.json").read_text())["runs"]
    assert sorted(record) == ["meanP_emcl0", "meanP_emcl1", "mmt_emcl0", "mmt_emcl1"]
    for name, entry in record.items():
        assert entry["finished"] and "--overwrite" not in entry["command"]
        assert "overwrite: False" in (out / f"{name}.log").read_text()  # what the run itself parsed
    # --overwrite in the runs' flags is refused: it is the table's
    code, err = tool(emcl_table.main, ["--output_dir", str(tmp_path / "t2"), "--mmt_flags", "--overwrite"])
    assert code == 2 and "--mmt_flags: --overwrite is the table's to set" in error_line(err)
    assert not (tmp_path / "t2").exists()


def test_table_refuses_run_folders_it_did_not_start(emcl_table, tmp_path):
    out = tmp_path / "table"
    (out / "mmt_emcl1").mkdir(parents=True)
    (out / "mmt_emcl1" / "metrics.json").write_text('{"test": {}}')
    before = hashes(out)
    for extra in ([], ["--overwrite"]):
        code, err = tool(emcl_table.main, ["--output_dir", str(out), "--jobs", "1", *extra])
        assert code == 2
        assert error_line(err).startswith(
            f"error: sub-run folder {out / 'mmt_emcl1'} holds results (metrics.json) of a run this table did "
            "not start")
        assert hashes(out) == before  # refused before any run started
    # a finished run the table recorded with the same command is reused; with other settings refused
    assert tool(emcl_table.main, ["--output_dir", str(tmp_path / "t"), "--jobs", "1"])[0] == 0
    for name in ("table.md", "table.json", "table.png"):
        (tmp_path / "t" / name).unlink()  # an interrupted table: its runs are there, the table not yet
    code, err = tool(emcl_table.main, ["--output_dir", str(tmp_path / "t"), "--jobs", "1", "--seed", "7"])
    assert code == 2 and "of a run started with other settings (command differ)" in error_line(err)
    log = (tmp_path / "t" / "mmt_emcl0.log").read_text()
    assert tool(emcl_table.main, ["--output_dir", str(tmp_path / "t"), "--jobs", "1"])[0] == 0
    assert (tmp_path / "t" / "mmt_emcl0.log").read_text() == log and (tmp_path / "t" / "table.json").is_file()


def test_multiseed_never_passes_overwrite_and_refuses_a_run_by_hand(tmp_path):
    from types import SimpleNamespace

    ms = load_script("multiseed")
    calls: list[list[str]] = []

    def runner(cmd, cwd=None):
        calls.append(cmd)
        code = subprocess.run([sys.executable, "-m", FAKE, *cmd[3:]], cwd=ROOT, env=env(),
                              capture_output=True).returncode
        return SimpleNamespace(returncode=code)

    out = tmp_path / "seeds"
    argv = ["--config", "configs/synthetic.yaml", "--seeds", "0", "1", "--output_dir", str(out)]
    assert tool(lambda a: ms.main(a, runner=runner), argv)[0] == 0
    code, err = tool(lambda a: ms.main(a, runner=runner), [*argv, "--overwrite"])
    assert code == 0, err
    assert len(calls) == 4 and not any("--overwrite" in c for c in calls)
    before = hashes(out)
    (out / "seed_5").mkdir()
    (out / "seed_5" / "checkpoint_last.pt").write_bytes(b"a run started by hand")
    code, err = tool(lambda a: ms.main(a, runner=runner), [*argv[:3], "5", *argv[5:], "--overwrite"])
    assert code == 2 and error_line(err).startswith(
        f"error: sub-run folder {out / 'seed_5'} holds results (checkpoint_last.pt) of a run this table did "
        "not start")
    # refused before anything was removed or run
    assert {k: v for k, v in hashes(out).items() if not k.startswith("seed_5")} == before
    assert len(calls) == 4


def test_concurrent_table_call_is_refused_at_once(tmp_path):
    out = tmp_path / "table"
    code = (
        "import sys\n"
        "from tests._video_fixtures import load_script\n"
        "from emcl.errors import cli_main\n"
        "s = load_script('emcl_table')\n"
        "runs = s._runs\n"
        f"s._runs = lambda a: [[{{**r, 'module': {FAKE!r}}} for r in ln] for ln in runs(a)]\n"
        "cli_main(s.main, sys.argv[1:])\n"
    )
    first = subprocess.Popen(
        [sys.executable, "-c", code, "--output_dir", str(out), "--jobs", "1", "--mmt_flags", "--sleep", "2"],
        cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    holder = None
    while first.poll() is None and holder is None:
        with contextlib.suppress(OSError, ValueError):
            holder = json.loads((out / ".run.lock").read_text())
        time.sleep(0.02)
    assert holder is not None, first.communicate()[1][-2000:]
    start = time.monotonic()
    second, err = tool(load_script("emcl_table").main, ["--output_dir", str(out), "--jobs", "1"])
    took = time.monotonic() - start
    still_running = first.poll() is None
    _, first_err = first.communicate(timeout=300)
    assert second == 2 and took < 1.5 and still_running
    assert error_line(err).startswith(
        f"error: output folder {out} is in use by another run: pid {first.pid} on host {holder['host']}, "
        f"started {holder['started']}")
    assert first.returncode == 0, first_err[-2000:]
    assert (out / "table.json").is_file() and not (out / ".run.lock").exists()


# ------------------------------------------------------------------------- search index and figures
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, object]:
    """A tiny EMCL-Net run folder (config.yaml, checkpoint_best.pt) and its config (10 synthetic clips)."""
    return fixtures()[0].make_run(tmp_path_factory.mktemp("tiny"), num_videos=10)


@pytest.fixture(scope="module")
def tiny_mmt_checkpoint(tmp_path_factory) -> Path:
    """An (untrained) MMT checkpoint holding its config, as joint training saves it."""
    from emcl.fileio import save_torch
    from emcl.train.config import parse_args
    from emcl.train.runner import build_parser
    from video_retrieval.joint_training.main_task_joint import TASK

    root = tmp_path_factory.mktemp("mmt")
    config = yaml.safe_load((ROOT / "configs/mmt_synthetic.yaml").read_text())
    config["synthetic"].update(out=str(root / "data"), num_videos=12, split_sizes=[8, 4])
    config.update(same_dim=16, vid_layers=1, vid_heads=2, vid_intermediate=32, centerK=4)
    (root / "mmt.yaml").write_text(yaml.safe_dump(config))
    cfg = parse_args(build_parser(TASK), ["--config", str(root / "mmt.yaml"), "--output_dir", str(root)],
                     TASK.config_blocks)
    cfg.task_module = TASK.module
    task = TASK(cfg, fixtures()[0].cpu_info())
    task.prepare_data()
    save_torch({"model": task.build_model().state_dict(), "config": dict(vars(cfg))},
               root / "checkpoint_last.pt")
    return root / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def qa_checkpoint(tmp_path_factory) -> Path:
    """An (untrained) question-answering checkpoint holding its config."""
    from emcl.fileio import save_torch
    from emcl.train.config import parse_args
    from emcl.train.runner import build_parser
    from video_question_answering.main_task_qa import TASK

    root = tmp_path_factory.mktemp("qa")
    make_synthetic(root / "data", 12, seed=5, format="msrvtt_qa", split_sizes=(6, 2, 4), frames=4, fps=4,
                   size=32, vocab_size=8)
    cfg = parse_args(build_parser(TASK), [
        "--config", str(ROOT / "configs/synthetic_qa.yaml"), "--anno_path", str(root / "data/annotations"),
        "--video_path", str(root / "data/videos"), "--output_dir", str(root)], TASK.config_blocks)
    cfg.task_module = TASK.module
    model = TASK(cfg, fixtures()[0].cpu_info()).build_model()
    save_torch({"model": model.state_dict(), "config": dict(vars(cfg))}, root / "checkpoint_best.pt")
    return root / "checkpoint_best.pt"


def search_main(argv: list[str]) -> object:
    """``python -m emcl.search ARGV``."""
    from emcl import search

    return search.main(argv)


def test_search_index_into_an_existing_index_is_refused(tiny_run, tmp_path):
    run, cfg = tiny_run
    ck = str(run / "checkpoint_best.pt")
    idx = tmp_path / "idx"
    index = ["index", cfg.video_path, "--checkpoint", ck]
    assert tool(search_main, [*index, "--out", str(idx)])[0] == 0
    before = hashes(idx)
    code, err = tool(search_main, [*index, "--out", str(idx)])
    assert code == 2 and error_line(err) == (
        f"error: --out {idx} already holds results of emcl.search index (features.pt, index.json). Pass "
        "--overwrite to replace them, or choose another --out")
    assert hashes(idx) == before and not (idx / ".run.lock").exists()
    # the run's own folder: refused even with --overwrite, the run untouched
    run_files = hashes(run)
    code, err = tool(search_main, [*index, "--out", str(run), "--overwrite"])
    assert code == 2 and error_line(err) == (
        f"error: --out {run} holds another run's results (checkpoint_best.pt); emcl.search index writes into "
        "a folder of its own: choose another --out")
    assert hashes(run) == run_files
    # --out a file
    (tmp_path / "a_file").write_text("notes")
    code, err = tool(search_main, [*index, "--out", str(tmp_path / "a_file")])
    assert code == 2 and error_line(err) == (
        f"error: --out {tmp_path / 'a_file'} exists and is not a folder; give a folder")
    assert (tmp_path / "a_file").read_text() == "notes"
    # --overwrite replaces the index (and only its files)
    ids = json.loads((idx / "index.json").read_text())["video_ids"]
    (idx / "notes.txt").write_text("mine")
    code, err = tool(search_main, [*index, "--out", str(idx), "--overwrite", "--frame_cache", "none"])
    assert code == 0, err
    meta = json.loads((idx / "index.json").read_text())
    assert meta["video_ids"] == ids and meta["frame_cache"] is None
    assert (idx / "notes.txt").read_text() == "mine" and not (idx / ".run.lock").exists()


@pytest.mark.skipif(as_root(), reason="root writes into read-only folders")
def test_search_and_figures_refuse_a_read_only_out(tiny_run, tmp_path):
    from emcl.viz import modality_gap

    run, cfg = tiny_run
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        ck = str(run / "checkpoint_best.pt")
        code, err = tool(search_main, ["index", cfg.video_path, "--checkpoint", ck, "--out", str(ro)])
        assert code == 2 and error_line(err).startswith(f"error: --out {ro} is not writable (")
        code, err = tool(modality_gap.main, ["--run", str(run), "--out", str(ro)])
        assert code == 2 and error_line(err).startswith(f"error: --out {ro} is not writable (")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_search_index_of_a_folder_of_links_keeps_the_ids_as_seen(tiny_run, tmp_path):
    from emcl.data.cache import build_cache

    run, cfg = tiny_run
    videos = sorted(Path(cfg.video_path).iterdir())
    tv = tmp_path / "tv"  # the usual way a dataset is linked into a working folder
    (tv / "more").mkdir(parents=True)
    for v in videos[:5]:
        (tv / v.name).symlink_to(v)
    (tv / "more" / "clip.mp4").symlink_to(videos[5])
    cache = tmp_path / "frames.h5"
    build_cache(Path(cfg.video_path), cache, max_frames=cfg.max_frames, framerate=cfg.video_framerate,
                size=cfg.image_size, progress=False)
    idx = tmp_path / "idx"
    code, err = tool(search_main, ["index", str(tv), "--checkpoint", str(run / "checkpoint_best.pt"),
                                   "--out", str(idx), "--frame_cache", str(cache)])
    assert code == 0, err
    meta = json.loads((idx / "index.json").read_text())
    assert meta["video_ids"] == sorted(["more/clip", *(v.stem for v in videos[:5])])
    assert meta["paths"] == sorted(["more/clip.mp4", *(v.name for v in videos[:5])])
    assert meta["videos_dir"] == str(tv)
    assert meta["num_from_frame_cache"] == 5  # matched by size and mtime through the links
    # a query names the videos by the paths the user sees
    res = search_main(["query", str(idx), "a red ball", "-k", "6", "--json"])
    assert {r["path"] for r in res["results"]} == {str(tv / p) for p in meta["paths"]}


@pytest.mark.parametrize("argv, expected", [
    (["index", "VIDEOS", "--checkpoint", "CK", "--out", "OUT", "--batch_size", "0"],
     "error: argument --batch_size: 0 is out of range (an integer >= 1)"),
    (["index", "VIDEOS", "--checkpoint", "CK", "--out", "OUT", "--workers", "-1"],
     "error: argument --workers: -1 is out of range (an integer >= 0)"),
    (["query", "IDX", "a ball", "-k", "0"], "error: argument -k: 0 is out of range (an integer >= 1)"),
    (["eval", "IDX", "--rerank", "0"], "error: argument --rerank: 0 is out of range (an integer >= 1)"),
])
def test_search_count_flags_are_one_line_errors(argv, expected, tmp_path):
    code, err = tool(search_main, [a.replace("OUT", str(tmp_path / "o")) for a in argv])
    assert code == 2 and err.strip() == expected
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, expected", [
    (["--max_videos", "0"], "error: argument --max_videos: 0 is out of range (an integer >= 1)"),
    (["--max_videos", "3"], "error: argument --max_videos: 3 is out of range (an integer >= 4)"),
])
def test_figure_count_flags_are_one_line_errors(tiny_run, argv, expected):
    from emcl.viz import examples, modality_gap

    run, _ = tiny_run
    code, err = tool(modality_gap.main, ["--run", str(run), *argv])
    assert code == 2 and err.strip() == expected
    code, err = tool(examples.main, ["--run", str(run), "-n", "0"])
    assert code == 2 and err.strip() == "error: argument -n: 0 is out of range (an integer >= 1)"
    assert not (run / "modality_gap").exists() and not (run / "examples").exists()


@pytest.mark.parametrize("kind", ["mmt", "qa"])
def test_search_index_refuses_another_tasks_checkpoint(kind, tiny_run, request, tmp_path):
    ck = request.getfixturevalue(f"{kind}_checkpoint")
    task = {"mmt": "joint", "qa": "qa"}[kind]
    code, err = tool(search_main, ["index", tiny_run[1].video_path, "--checkpoint", str(ck),
                                   "--out", str(tmp_path / "idx")])
    assert code == 2 and error_line(err) == (
        f"error: {ck} is a checkpoint of task '{task}', not of EMCL-Net ('retrieval'): this tool reads "
        "EMCL-Net runs (it needs the task's score_fn)")
    assert not (tmp_path / "idx").exists()


def test_figures_write_into_their_own_folder_and_refuse_earlier_results(tiny_run, tmp_path):
    from emcl.viz import examples, modality_gap

    run, _ = tiny_run
    run_files = {k: v for k, v in hashes(run).items() if "/" not in k}
    assert tool(modality_gap.main, ["--run", str(run)])[0] == 0
    assert tool(examples.main, ["--run", str(run), "-n", "2", "-k", "2"])[0] == 0
    assert {k: v for k, v in hashes(run).items() if "/" not in k} == run_files  # RUN's own files
    assert sorted(hashes(run / "modality_gap")) == ["modality_gap.json", "modality_gap.png"]
    assert sorted(hashes(run / "examples")) == ["examples.html", "examples.json", "examples.png"]
    figures = hashes(run / "examples")
    code, err = tool(examples.main, ["--run", str(run), "-n", "3", "-k", "2"])
    assert code == 2 and error_line(err) == (
        f"error: --out {run / 'examples'} already holds results of examples (examples.html, examples.json, "
        "examples.png). Pass --overwrite to replace them, or choose another --out")
    assert hashes(run / "examples") == figures
    assert tool(examples.main, ["--run", str(run), "-n", "3", "-k", "2", "--overwrite"])[0] == 0
    assert len(json.loads((run / "examples" / "examples.json").read_text())["queries"]) == 3
    # never into the run folder itself; --out a file
    code, err = tool(modality_gap.main, ["--run", str(run), "--out", str(run), "--overwrite"])
    assert code == 2 and error_line(err).startswith(f"error: --out {run} is the run's own folder")
    (tmp_path / "a_file").write_text("notes")
    code, err = tool(modality_gap.main, ["--run", str(run), "--out", str(tmp_path / "a_file")])
    assert code == 2 and error_line(err) == (
        f"error: --out {tmp_path / 'a_file'} exists and is not a folder; give a folder")
    # elsewhere with --out: a folder of figures is fine, a run's folder is not
    assert tool(modality_gap.main, ["--run", str(run), "--out", str(tmp_path / "figs")])[0] == 0
    assert sorted(hashes(tmp_path / "figs")) == ["modality_gap.json", "modality_gap.png"]
    assert {k: v for k, v in hashes(run).items() if "/" not in k} == run_files


@pytest.mark.parametrize("kind", ["mmt", "qa"])
def test_figures_refuse_another_tasks_checkpoint(kind, request):
    from emcl.viz import examples, modality_gap

    ck = request.getfixturevalue(f"{kind}_checkpoint")
    before = hashes(ck.parent)
    task = {"mmt": "joint", "qa": "qa"}[kind]
    for main in (modality_gap.main, examples.main):
        code, err = tool(main, ["--checkpoint", str(ck)])
        assert code == 2 and error_line(err) == (
            f"error: {ck} is a checkpoint of task '{task}', not of EMCL-Net ('retrieval'): this tool reads "
            "EMCL-Net runs (it needs the task's score_fn)")
    assert hashes(ck.parent) == before
    assert not (ck.parent / "modality_gap").exists() and not (ck.parent / "examples").exists()
