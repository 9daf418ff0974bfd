"""Run guards (emcl.train.guards), strict JSON, config validation, clip_config keys, video checks."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from emcl.errors import UserError
from emcl.fileio import nonfinite_paths, save_json
from emcl.train import guards
from emcl.train.guards import (
    RunLock,
    check_output_dir,
    check_settings,
    nonfinite_tensors,
    setting_diffs,
)

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ lock
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
        from emcl.train.guards import RunLock
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


# ---------------------------------------------------------------------------------------- output folder
def _write_run(folder: Path, finished: bool, last: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_json({"finished": finished, "test": {"t2v": {"R1": 1.0}}}, folder / "metrics.json")
    for name in ("config.yaml", "train.log", "curves.png", "checkpoint_best.pt", ".metrics.json.x.tmp"):
        (folder / name).write_text("x")
    if last:
        (folder / "checkpoint_last.pt").write_text("x")
    (folder / "notes.txt").write_text("mine")


def test_empty_or_new_folder_is_fine(tmp_path):
    assert check_output_dir(tmp_path / "new" / "deeper", resume=False, overwrite=False) == []
    assert (tmp_path / "new" / "deeper").is_dir()
    (tmp_path / "new" / "deeper" / "train.log").write_text("a run that stopped before training")
    check_output_dir(tmp_path / "new" / "deeper", resume=False, overwrite=False)


@pytest.mark.parametrize("finished", [True, False])
def test_earlier_run_needs_resume_or_overwrite(tmp_path, finished):
    _write_run(tmp_path, finished)
    with pytest.raises(UserError) as e:
        check_output_dir(tmp_path, resume=False, overwrite=False)
    msg = str(e.value)
    assert str(tmp_path) in msg and "--resume" in msg and "--overwrite" in msg
    assert ("finished run" if finished else "unfinished run") in msg
    check_output_dir(tmp_path, resume=True, overwrite=False)  # continue (or extend) it
    assert (tmp_path / "metrics.json").exists()


def test_overwrite_removes_exactly_the_result_files(tmp_path, caplog):
    _write_run(tmp_path, True)
    (tmp_path / ".run.lock").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="emcl.guards"):
        removed = check_output_dir(tmp_path, resume=False, overwrite=True)
    assert {p.name for p in removed} == {"metrics.json", "config.yaml", "train.log", "curves.png",
                                         "checkpoint_best.pt", "checkpoint_last.pt", ".metrics.json.x.tmp"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.lock", "notes.txt"]
    assert "--overwrite: removed 7 file(s)" in caplog.text


def test_resume_without_checkpoint_over_old_results_and_both_flags(tmp_path):
    _write_run(tmp_path, True, last=False)
    with pytest.raises(UserError, match="no checkpoint_last.pt to resume from"):
        check_output_dir(tmp_path, resume=True, overwrite=False)
    with pytest.raises(UserError, match="pass one"):
        check_output_dir(tmp_path, resume=True, overwrite=True)
    check_output_dir(tmp_path / "fresh", resume=True, overwrite=False)  # requeue: nothing there yet


def test_old_metrics_without_finished_flag_count_as_results(tmp_path):
    (tmp_path / "metrics.json").write_text('{"loss": NaN}')
    with pytest.raises(UserError, match="results of an earlier run"):
        check_output_dir(tmp_path, resume=False, overwrite=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_fails_first(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(UserError, match=f"output folder {ro} is not writable"):
            check_output_dir(ro, resume=False, overwrite=False)
        with pytest.raises(UserError, match="not writable"):
            RunLock(ro).acquire()
    finally:
        ro.chmod(0o755)


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        check_output_dir(tmp_path / "f", resume=False, overwrite=False)


# ----------------------------------------------------------------------------------- settings compare
def test_setting_diffs():
    saved = {"lr": 1e-4, "temp": 3, "datatype": "msvd", "anno_path": "data/x/../a", "centerK": 32,
             "clip_config": {"vision_width": 64, "vision_layers": 2}, "workers": 4}
    current = {"lr": 1e-4 * (1 + 1e-9), "temp": 3.0, "datatype": "msrvtt", "anno_path": "data/a",
               "centerK": 16, "clip_config": {"vision_width": 128, "vision_layers": 2}, "beta": 3.0}
    keys = ["lr", "temp", "datatype", "anno_path", "centerK", "clip_config", "beta", "workers", "absent"]
    assert setting_diffs(saved, current, keys) == [
        "datatype: msvd → msrvtt",
        "centerK: 32 → 16",
        "clip_config.vision_width: 64 → 128",
        "beta: unset → 3.0",
        "workers: 4 → unset",
    ]
    assert setting_diffs({"lr": 1e-4}, {"lr": 2e-4}, ["lr"]) == ["lr: 0.0001 → 0.0002"]
    assert setting_diffs({"a": None}, {"a": "x"}, ["a"]) == ["a: None → x"]
    assert setting_diffs({"a": [1, 2.0]}, {"a": (1.0, 2)}, ["a"]) == []


def test_check_settings_raises_on_must_match_and_logs_allowed(caplog):
    saved = {"datatype": "msvd", "lr": 1e-4, "epochs": 5, "workers": 4, "agg_layers": 4}
    current = {"datatype": "msrvtt", "lr": 1e-3, "epochs": 10, "workers": 2, "agg_layers": 4}
    with pytest.raises(UserError) as e:
        check_settings(saved, current, ["datatype", "lr", "agg_layers"], ["epochs", "workers"],
                       "checkpoint runs/a/checkpoint_last.pt", "Resume with the same settings.")
    msg = str(e.value)
    assert msg.startswith("checkpoint runs/a/checkpoint_last.pt was trained with")
    assert "datatype: msvd → msrvtt" in msg and "lr: 0.0001 → 0.001" in msg and "agg_layers" not in msg
    assert msg.endswith("Resume with the same settings.")
    with caplog.at_level(logging.INFO, logger="emcl.guards"):
        changed = check_settings(saved, current, ["agg_layers"], ["epochs", "workers"], "ck", "")
    assert changed == ["epochs: 5 → 10", "workers: 4 → 2"] and "epochs: 5 → 10" in caplog.text


# ------------------------------------------------------------------------------------------ non-finite
def test_nonfinite_tensors():
    m = torch.nn.Linear(2, 2)
    assert nonfinite_tensors(m) == []
    with torch.no_grad():
        m.bias[0] = float("inf")
    assert nonfinite_tensors(m) == ["bias"]
    assert nonfinite_tensors({"a": torch.tensor([1, 2]), "b": torch.tensor([float("nan")])}) == ["b"]


def test_save_json_is_strict_and_names_the_key(tmp_path):
    obj = {"train": {"history": [{"loss": 1.0}, {"loss": float("nan")}]}, "x": [float("-inf")]}
    assert nonfinite_paths(obj) == ["train.history[1].loss=nan", "x[0]=-inf"]
    with pytest.raises(ValueError, match=r"metrics.json.*train.history\[1\].loss=nan, x\[0\]=-inf"):
        save_json(obj, tmp_path / "metrics.json")
    assert not (tmp_path / "metrics.json").exists() and list(tmp_path.iterdir()) == []
    save_json({"a": 1.0, "b": [1, "x"]}, tmp_path / "ok.json")
    assert json.loads((tmp_path / "ok.json").read_text()) == {"a": 1.0, "b": [1, "x"]}


def test_result_files_constant_covers_what_a_run_writes():
    for name in ("metrics.json", "checkpoint_best.pt", "checkpoint_last.pt", "config.yaml", "train.log",
                 "curves.png"):
        assert any(Path(name).match(p) for p in guards.RESULT_FILES), name


def test_lock_second_process_fails_fast(tmp_path):
    script = f"from emcl.train.guards import RunLock; RunLock({str(tmp_path)!r}).acquire()"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with RunLock(tmp_path):
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                              timeout=120)
    assert proc.returncode != 0 and "in use by another run" in proc.stderr


def test_unwritable_folder_message_without_chmod(tmp_path, monkeypatch):
    # root ignores permission bits; a read-only mount fails the probe file like this
    def refuse(*a, **k):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(guards.tempfile, "mkstemp", refuse)
    msg = f"output folder {tmp_path} is not writable \\(Read-only file system\\)"
    with pytest.raises(UserError, match=msg):
        check_output_dir(tmp_path, resume=False, overwrite=False)


# ---------------------------------------------------------------------------------------------- config
def _config_parser():
    import argparse

    from emcl.train.config import fraction, nonneg_float, positive_float, positive_int

    p = argparse.ArgumentParser()
    p.add_argument("--config")
    p.add_argument("--epochs", type=positive_int, default=5)
    p.add_argument("--max_steps", type=int, default=0)
    p.add_argument("--lr", type=positive_float, default=1e-4)
    p.add_argument("--lamd", type=positive_float, default=1.0)
    p.add_argument("--weight_decay", type=nonneg_float, default=0.2)
    p.add_argument("--max_skip_fraction", type=fraction, default=0.05)
    p.add_argument("--temp", type=float, default=3.0)
    p.add_argument("--eval_block", default="query", choices=("paper", "query", "none"))
    p.add_argument("--ids", nargs="+", type=int, default=None)
    p.add_argument("--skip_bad_videos", action="store_true")
    p.add_argument("--init_model", default=None)
    p.add_argument("--output_dir", default="runs/x")
    return p


def _parse_yaml(tmp_path, text: str, *argv: str):
    from emcl.train.config import parse_args

    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    return parse_args(_config_parser(), ["--config", str(cfg), *argv], extra_keys=["clip_config"])


def test_config_values_are_converted_like_flags(tmp_path):
    a = _parse_yaml(tmp_path, "epochs: 3\nlr: 1e-3\ntemp: 3\nskip_bad_videos: true\ninit_model: null\n"
                    "output_dir: 2024\nids: [1, 2]\nmax_skip_fraction: 0\neval_block: paper\n")
    assert (a.epochs, a.lr, a.temp, a.skip_bad_videos, a.init_model) == (3, 1e-3, 3.0, True, None)
    assert isinstance(a.lr, float) and isinstance(a.temp, float) and a.output_dir == "2024"
    assert a.ids == [1, 2] and a.max_skip_fraction == 0.0 and a.eval_block == "paper"
    assert _parse_yaml(tmp_path, "epochs: 3\n", "--epochs", "4").epochs == 4  # flags override


@pytest.mark.parametrize(
    "text, expected",
    [
        ("epochs: 1.5", r"epochs: .*1\.5.*not an integer"),
        ("epochs: 0", r"epochs: 0 is out of range \(an integer >= 1\)"),
        ("max_steps: 2.5", r"max_steps: invalid int value: 2\.5"),
        ("lr: -0.1", r"lr: -0\.1 is out of range \(a number > 0\)"),
        ("lr: .nan", r"lr: .*not a finite number"),
        ("lamd: 0", r"lamd: 0 is out of range"),
        ("weight_decay: -1", r"weight_decay: -1 is out of range \(a number >= 0\)"),
        ("max_skip_fraction: 1.5", r"max_skip_fraction: 1\.5 is out of range \(a number from 0 to 1\)"),
        ("temp: fast", r"temp: invalid float value: 'fast'"),
        ("eval_block: Paper", r"eval_block: invalid choice: 'Paper' \(choose from 'paper', 'query', 'none"),
        ("skip_bad_videos: 1", r"skip_bad_videos: expected true or false, got 1"),
        ("epochs: true", r"epochs: expected a positive_int, got true"),
        ("max_steps: false", r"max_steps: expected a int, got false \(use 1 or 0\)"),
        ("epochs: null", r"epochs: null is not allowed"),
        ("epochs: [1]", r"epochs: expected a single value, got a list"),
        ("ids: [1, x]", r"ids: invalid int value: 'x'"),
        ("epoch: 3", r"unknown option\(s\) 'epoch' \(did you mean 'epochs'\?\)"),
        ("lr: [", r"not valid YAML \(line 2"),
        ("- 1", r"expected a mapping"),
    ],
)
def test_bad_config_values_name_the_file_and_key(tmp_path, text, expected):
    with pytest.raises(UserError, match=r"config .*c\.yaml: " + expected) as e:
        _parse_yaml(tmp_path, text + "\n")
    assert isinstance(e.value, ValueError)  # older `except ValueError` callers still catch it


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--epochs", "0"], "argument --epochs: 0 is out of range (an integer >= 1)"),
        (["--lr=-1e-4"], "argument --lr: -1e-4 is out of range (a number > 0)"),
        (["--lamd", "0"], "argument --lamd: 0 is out of range (a number > 0)"),
        (["--lr", "inf"], "argument --lr: 'inf' is not a finite number (a number > 0)"),
        (["--epochs", "2.0"], "argument --epochs: '2.0' is not an integer (an integer >= 1)"),
        (["--lam", "0.5"], "unrecognized arguments: --lam 0.5"),  # no abbreviations
        (["--max_skip", "0.5"], "unrecognized arguments: --max_skip 0.5"),
    ],
)
def test_flags_are_range_checked_and_not_abbreviated(argv, expected, capsys):
    from emcl.train.config import parse_args

    parser = _config_parser()
    parser.allow_abbrev = True  # parse_args turns it off whatever the parser says
    with pytest.raises(SystemExit) as e:
        parse_args(parser, argv)
    assert e.value.code == 2 and expected in capsys.readouterr().err


def _task_of(config: Path):
    """The entry point a shipped config belongs to, by its name."""
    import importlib

    if config.name.startswith("inference"):
        return None  # the inference module has no run loop (tests/test_inference_module.py checks it)
    if config.name.startswith("mmt_"):
        module = "video_retrieval.joint_training.main_task_joint"
    elif "qa" in config.stem.split("_"):
        module = "video_question_answering.main_task_qa"
    else:
        module = "video_retrieval.emcl_net.main_task_retrieval"
    return importlib.import_module(module).TASK


def test_shipped_configs_pass_validation():
    from emcl.train.config import parse_args
    from emcl.train.runner import build_parser

    checked = 0
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        task = _task_of(path)
        if task is not None:
            parse_args(build_parser(task), ["--config", str(path)], task.extra_config_keys)
            checked += 1
    assert checked >= 10


# -------------------------------------------------------------------------------------------- clip_config
TINY_CLIP = {"embed_dim": 16, "image_size": 16, "patch_size": 8, "vision_width": 32, "vision_layers": 1,
             "vision_heads": 2, "text_width": 32, "text_layers": 1, "text_heads": 2}


def test_clip_config_typo_names_the_key_and_the_allowed_ones():
    from emcl.clip import build_clip_from_config, check_clip_config

    assert check_clip_config(TINY_CLIP) == TINY_CLIP
    bad = {**TINY_CLIP, "vision_widht": 32}
    with pytest.raises(UserError) as e:
        check_clip_config(bad, "configs/x.yaml: clip_config")
    msg = str(e.value)
    assert msg.startswith("configs/x.yaml: clip_config: unknown key(s) 'vision_widht'")
    assert "did you mean 'vision_width'?" in msg and "allowed keys: embed_dim, image_size" in msg
    assert isinstance(e.value, ValueError)
    with pytest.raises(UserError, match="missing required key\\(s\\) text_layers"):
        check_clip_config({k: v for k, v in TINY_CLIP.items() if k != "text_layers"})
    with pytest.raises(UserError, match="vision_layers: expected a positive integer, got 1.5"):
        check_clip_config({**TINY_CLIP, "vision_layers": 1.5})
    with pytest.raises(UserError, match="quick_gelu: expected true or false"):
        check_clip_config({**TINY_CLIP, "quick_gelu": "yes"})
    with pytest.raises(UserError, match="clip_config: expected a mapping"):
        check_clip_config([1, 2])
    with pytest.raises(UserError, match="clip_config: vision width 32 is not divisible by vision heads 3"):
        build_clip_from_config({**TINY_CLIP, "vision_heads": 3})
    assert build_clip_from_config(TINY_CLIP).config["vision_width"] == 32


# ------------------------------------------------------------------------------------------ video checks
def test_check_videos_exist_is_a_stat(tmp_path):
    from emcl.data.sources import VideoSource, check_videos_exist, missing_videos

    vdir = tmp_path / "videos"
    vdir.mkdir()
    for i in range(8):
        (vdir / f"v{i}.mp4").write_bytes(b"not decoded, only stat'ed")
    check_videos_exist(vdir, [f"v{i}" for i in range(8)], "msrvtt/test")
    (vdir / "v3.mp4").unlink()
    (vdir / "v5.mp4").write_bytes(b"")
    (vdir / "v6.mp4").unlink()
    (vdir / "v6.mp4").mkdir()
    ids = [f"v{i}" for i in range(8)]
    assert missing_videos(vdir, ids) == {"v3": "missing", "v5": "empty (0 bytes)", "v6": "not a regular file"}
    with pytest.raises(UserError) as e:
        check_videos_exist(vdir, ids, "msrvtt/test", show=2)
    assert str(e.value) == (f"msrvtt/test: 3 of 8 videos cannot be used (looked in folder {vdir}): "
                            "v3 (missing); v5 (empty (0 bytes)); and 1 more")
    with pytest.raises(UserError, match=f"video folder {tmp_path / 'nope'} does not exist \\(8 videos"):
        check_videos_exist(tmp_path / "nope", ids, "msrvtt/test")
    # MSVD: any extension, found by stem
    (vdir / "clip.avi").write_bytes(b"x")
    src = VideoSource(str(vdir), framerate=1, max_frames=2, size=8, any_extension=True)
    check_videos_exist(src, ["clip", "v0"], "msvd/train")
    with pytest.raises(UserError, match="1 of 2 videos.*ghost \\(file not found"):
        check_videos_exist(src, ["clip", "ghost"], "msvd/train")


def test_check_videos_exist_in_a_frame_cache(tmp_path):
    try:  # tests/ may or may not be a package
        from tests._video_fixtures import write_video
    except ImportError:
        from _video_fixtures import write_video

    from emcl.data.cache import build_cache
    from emcl.data.sources import VideoSource, check_videos_exist

    vdir = tmp_path / "videos"
    vdir.mkdir()
    write_video(vdir / "a.mp4", 4, width=16, height=16)
    (vdir / "b.mp4").write_bytes(b"garbage")
    store = tmp_path / "f.h5"
    build_cache(vdir, store, max_frames=2, framerate=2.0, size=8, progress=False, workers=0,
                skip_bad_videos=True)
    (vdir / "a.mp4").unlink()  # with a cache the folder is not looked at
    src = VideoSource(str(vdir), framerate=2.0, max_frames=2, size=8, frame_cache=str(store))
    check_videos_exist(src, ["a"], "msvd/test")
    with pytest.raises(UserError) as e:
        check_videos_exist(src, ["a", "b", "c"], "msvd/test")
    msg = str(e.value)
    assert f"2 of 3 videos cannot be used (looked in frame cache {store})" in msg
    assert "b (recorded as undecodable" in msg and "c (not in the frame cache)" in msg


def test_skip_budget():
    from emcl.data.sources import SkipBudget

    budget = SkipBudget(40, 0.05, "msvd/train")  # 2 of 40 allowed
    budget.add(["v1"])
    budget.add(["v1", "v2"])  # a video counts once
    assert budget.count == 2 and budget.limit == 2
    with pytest.raises(UserError) as e:
        budget.add(["v3"])
    assert str(e.value).startswith("msvd/train: 3 of 40 videos (7.5%) are unreadable, more than "
                                   "--max_skip_fraction 0.05 allows (2): v1, v2, v3.")
    with pytest.raises(UserError, match="1 of 10 videos"):
        SkipBudget(10, 0.0).add(["x"])
    SkipBudget(10, 1.0).add([str(i) for i in range(10)])
    with pytest.raises(ValueError):
        SkipBudget(10, 1.5)


def test_video_error_is_a_one_line_user_error_also_from_a_worker():
    from emcl.data.video import VideoError

    e = VideoError("unreadable", path="/d/v.mp4", video_id="v")
    assert isinstance(e, UserError) and isinstance(e, RuntimeError)
    worker = ("Caught VideoError in DataLoader worker process 0.\n"
              "Original Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
              "emcl.data.video.VideoError: video 'v' (/d/v.mp4): unreadable\n")
    w = VideoError(worker)
    assert str(w) == "video 'v' (/d/v.mp4): unreadable (in a DataLoader worker)"
    assert w.worker_traceback == worker


def test_state_dict_mismatch_is_one_line():
    from emcl.train.guards import state_dict_mismatch

    model = {"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(1)}
    assert state_dict_mismatch(model, dict(model)) == ""
    loaded = {"a": torch.zeros(2, 4), "b": torch.zeros(4), "d": torch.zeros(1)}
    assert state_dict_mismatch(model, loaded) == (
        "1 tensor(s) of another shape: a: (2, 4) in the file, (2, 3) in the model; 1 missing: c; "
        "1 unexpected: d"
    )
    many = {f"k{i}": torch.zeros(1) for i in range(7)}
    assert state_dict_mismatch({}, many, limit=2) == "7 unexpected: k0, k1 (and 5 more)"


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


def test_check_keys_for_nested_config_sections():
    from emcl.train.config import check_keys

    allowed = ["num_videos", "seed", "frames", "out"]
    assert check_keys({"num_videos": 3, "seed": 0}, allowed, "c.yaml: synthetic", ["num_videos"]) == {
        "num_videos": 3, "seed": 0}
    expected = (r"c.yaml: synthetic: unknown key\(s\) 'frame' \(did you mean 'frames'\?\); "
                r"allowed keys: num_videos, seed, frames, out")
    with pytest.raises(UserError, match=expected):
        check_keys({"frame": 3}, allowed, "c.yaml: synthetic")
    with pytest.raises(UserError, match=r"missing required key\(s\) seed"):
        check_keys({"num_videos": 3}, allowed, "s", ["num_videos", "seed"])
    with pytest.raises(UserError, match="s: expected a mapping, got list"):
        check_keys([1], allowed, "s")
