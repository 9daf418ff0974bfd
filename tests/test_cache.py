"""HDF5 frame cache: build_cache and its CLI scripts/cache_frames.py (resume, crash safety, bad videos),
FrameCache, VideoSource, and a smoke run of scripts/benchmark_data.py."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch
from torch.utils.data import DataLoader

from emcl.data.cache import CacheBuildError, FrameCache, build_cache, decode_key, encode_key
from emcl.data.sources import VideoSource
from emcl.data.video import VideoError, read_frames
from emcl.data.workers import worker_context

try:  # tests/ may or may not be a package
    from tests._video_fixtures import REPO, frame_indices, load_script, write_video
except ImportError:
    from _video_fixtures import REPO, frame_indices, load_script, write_video

SETTINGS = {"max_frames": 6, "framerate": 2.0, "size": 32}
ARGS = ["--max_frames", "6", "--framerate", "2", "--size", "32", "--no_progress"]


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six short index videos of different lengths and containers."""
    d = tmp_path_factory.mktemp("cache_videos")
    write_video(d / "v0.mp4", 32)
    write_video(d / "v1.mp4", 20, width=48, height=64)  # portrait
    write_video(d / "v2.mp4", 7)  # shorter than max_frames at 2 fps: padded
    write_video(d / "v3.webm", 24, codec="libvpx")
    write_video(d / "v4.avi", 40, codec="mpeg4")
    (d / "sub").mkdir()
    write_video(d / "sub" / "v5.mkv", 16)
    return d


def _decode(video_dir: Path, vid: str, start: float | None = None, end: float | None = None):
    path = next(p for p in video_dir.rglob(f"{vid}.*"))
    return read_frames(path, start=start, end=end, video_id=vid, **SETTINGS)


def _assert_store_equals_decoding(store: Path, video_dir: Path, ids: list[str]) -> None:
    cache = FrameCache(store)
    assert cache.ids() == sorted(ids) and len(cache) == len(ids)
    for vid in ids:
        assert vid in cache
        frames, mask = cache.get(vid)
        ref_frames, ref_mask = _decode(video_dir, vid)
        assert frames.dtype == torch.uint8 and mask.dtype == torch.long
        assert torch.equal(frames, ref_frames) and torch.equal(mask, ref_mask), vid
    cache.close()


def test_build_in_process_equals_read_frames(video_dir: Path, tmp_path: Path) -> None:
    cf = load_script("cache_frames")
    out = tmp_path / "frames.h5"
    assert cf.main(["--video_path", str(video_dir), "--out", str(out), "--workers", "0", *ARGS]) == 0
    ids = [f"v{i}" for i in range(6)]
    _assert_store_equals_decoding(out, video_dir, ids)
    cache = FrameCache(out)
    assert (cache.max_frames, cache.framerate, cache.size, cache.backend) == (6, 2.0, 32, "pyav")
    assert "nope" not in cache and cache.failed() == {}
    frames, mask = cache.get("v2")
    assert mask.tolist() == [1, 1, 0, 0, 0, 0] and frames[2:].sum() == 0
    with h5py.File(out, "r") as f:  # only real frames are stored
        assert f["videos/v2/frames"].shape == (2, 3, 32, 32)
        assert f.attrs["version"] == 1 and bool(f.attrs["complete"])
    assert not Path(str(out) + ".partial").exists()
    # picklable, lazily reopened in DataLoader worker processes
    clone = pickle.loads(pickle.dumps(cache))
    assert torch.equal(clone.get("v0")[0], cache.get("v0")[0])
    source = VideoSource(None, frame_cache=str(out), **SETTINGS)
    loader = DataLoader([f"v{i}" for i in range(6)], batch_size=None, num_workers=2,
                        collate_fn=source.load, multiprocessing_context=worker_context())
    for (frames, _), vid in zip(loader, ids):
        assert torch.equal(frames, _decode(video_dir, vid)[0])
    with pytest.raises(VideoError, match="not in the frame cache") as info:
        source.load("v9")
    assert info.value.video_id == "v9" and str(out) in str(info.value)


def test_build_cache_library_call(video_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "lib.h5"
    summary = build_cache(video_dir, out, ids=["v1", "v3"], windows={"v3": (0.5, None)}, progress=False,
                          **SETTINGS)
    assert summary["num_videos"] == 2 and summary["num_failed"] == 0 and summary["decoded"] == 2
    assert summary["failures"] == {} and not summary["up_to_date"] and summary["out"] == str(out)
    cache = FrameCache(out)
    for vid, (start, end) in [("v1", (None, None)), ("v3", (0.5, None))]:
        frames, mask = cache.get(vid, start, end)
        ref_frames, ref_mask = _decode(video_dir, vid, start, end)
        assert torch.equal(frames, ref_frames) and torch.equal(mask, ref_mask), vid
    cache.close()
    again = build_cache(video_dir, out, ids=["v3", "v1"], windows={"v3": [0.5, None]}, progress=False,
                        **SETTINGS)
    assert again["up_to_date"] and again["decoded"] == 0 and again["num_videos"] == 2
    # the whole of v3 was not cached (only a window): not up to date, v3 is decoded again
    assert build_cache(video_dir, out, ids=["v3"], progress=False, **SETTINGS)["decoded"] == 1
    assert torch.equal(FrameCache(out).get("v3")[0], _decode(video_dir, "v3")[0])
    # the in-memory mode serves the same frames and the same errors, also after pickling (workers)
    import pickle

    mem = pickle.loads(pickle.dumps(FrameCache(out, in_memory=True)))
    for vid in ("v1", "v3"):
        assert all(torch.equal(a, b) for a, b in zip(mem.get(vid), FrameCache(out).get(vid)))
    assert mem._memory is not None
    with pytest.raises(VideoError, match="not in the frame cache"):
        mem.get("ghost")
    with pytest.raises(VideoError, match="window"):
        mem.get("v1", 0.5, None)
    with pytest.raises(VideoError, match="skip_bad_videos") as info:  # exceptions, not SystemExit
        build_cache(video_dir, tmp_path / "ghost.h5", ids=["ghost"], progress=False, **SETTINGS)
    assert info.value.video_id == "ghost" and str(video_dir) in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheBuildError, match="no videos to cache"):
        build_cache(tmp_path / "empty", tmp_path / "e.h5", progress=False, **SETTINGS)
    with pytest.raises(CacheBuildError, match="window of 'v1'"):
        build_cache(video_dir, tmp_path / "w.h5", windows={"v1": (1.0,)}, progress=False, **SETTINGS)


# scripts/cache_frames.py, killed with SIGKILL (as a job the scheduler kills) in the middle of storing the
# video after the first N: its frames are flushed to the file, its completion mark is not yet set
DIE_MID_WRITE = """
import multiprocessing, os, runpy, signal, sys
import h5py
from emcl.data.cache import CacheWriter

N = int(sys.argv.pop(1))
add, flush, stored = CacheWriter.add, h5py.File.flush, []

def flush_then_die(f):
    flush(f)
    for child in multiprocessing.active_children():  # no orphaned worker keeps our pipes open
        os.kill(child.pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)

def add_or_die(self, video_id, *args, **kwargs):
    if len(stored) == N:  # add flushes the data, then sets the mark: die at that flush
        h5py.File.flush = flush_then_die
    add(self, video_id, *args, **kwargs)
    stored.append(video_id)

CacheWriter.add = add_or_die
sys.argv[0] = sys.argv.pop(1)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_kill_midway_then_resume(video_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed.h5"
    cmd = [sys.executable, "-c", DIE_MID_WRITE, "3", str(REPO / "scripts" / "cache_frames.py"),
           "--video_path", str(video_dir), "--out", str(out), "--workers", "2", *ARGS]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    partial = Path(str(out) + ".partial")
    assert partial.exists() and not out.exists()
    with pytest.raises(FileNotFoundError, match="partial"):
        FrameCache(out)
    with h5py.File(partial, "r") as f:  # 3 complete entries and the one the kill interrupted
        flags = {decode_key(k): bool(g.attrs.get("complete", False)) for k, g in f["videos"].items()}
    assert sorted(flags.values()) == [False, True, True, True]

    cf = load_script("cache_frames")
    assert cf.main(["--video_path", str(video_dir), "--out", str(out), "--workers", "0", *ARGS]) == 0
    assert not partial.exists()
    _assert_store_equals_decoding(out, video_dir, [f"v{i}" for i in range(6)])


def test_resume_skips_done_and_extends(video_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    cf = load_script("cache_frames")
    out = tmp_path / "ext.h5"
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("v0\n\nv2\n")
    assert cf.main(["--video_path", str(video_dir), "--out", str(out), "--ids", str(ids_file), *ARGS]) == 0
    _assert_store_equals_decoding(out, video_dir, ["v0", "v2"])
    capsys.readouterr()
    assert cf.main(["--video_path", str(video_dir), "--out", str(out), "--ids", "v2,v0", *ARGS]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert cf.main(["--video_path", str(video_dir), "--out", str(out), "--ids", "v0,v3,v5", "--workers", "0",
                    *ARGS]) == 0
    assert "3 videos, 1 already cached, decoding 2" in capsys.readouterr().out
    _assert_store_equals_decoding(out, video_dir, ["v0", "v2", "v3", "v5"])
    with pytest.raises(ValueError, match="max_frames"):  # a store built with other settings
        cf.main(["--video_path", str(video_dir), "--out", str(out), "--ids", "v1", "--max_frames", "8",
                 "--framerate", "2", "--size", "32", "--no_progress"])


def test_corrupt_partial_is_set_aside(video_dir: Path, tmp_path: Path) -> None:
    cf = load_script("cache_frames")
    out = tmp_path / "c.h5"
    Path(str(out) + ".partial").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)  # unreadable HDF5
    assert cf.main(["--video_path", str(video_dir), "--out", str(out), "--ids", "v0", "--workers", "0",
                    *ARGS]) == 0
    _assert_store_equals_decoding(out, video_dir, ["v0"])
    assert len(list(tmp_path.glob("c.h5.partial.corrupt-*"))) == 1


def test_bad_videos_fail_or_are_recorded(video_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    cf = load_script("cache_frames")
    vdir = tmp_path / "videos"
    vdir.mkdir()
    for name in ["v0.mp4", "v2.mp4"]:
        os.link(video_dir / name, vdir / name)
    data = (video_dir / "v0.mp4").read_bytes()
    (vdir / "broken.mp4").write_bytes(data[: len(data) // 2])
    out = tmp_path / "bad.h5"
    with pytest.raises(SystemExit) as info:
        cf.main(["--video_path", str(vdir), "--out", str(out), "--workers", "0", *ARGS])
    assert str(vdir / "broken.mp4") in str(info.value) and "skip_bad_videos" in str(info.value)
    assert not out.exists()
    with pytest.raises(SystemExit, match="ghost"):
        cf.main(["--video_path", str(vdir), "--out", str(out), "--ids", "v0,ghost", *ARGS])

    capsys.readouterr()
    assert cf.main(["--video_path", str(vdir), "--out", str(out), "--ids", "v0,broken,v2,ghost",
                    "--skip_bad_videos", "--workers", "0", *ARGS]) == 0
    captured = capsys.readouterr()
    assert "2 failed" in captured.out and "2 videos could not be decoded" in captured.err
    cache = FrameCache(out)
    assert cache.ids() == ["v0", "v2"] and sorted(cache.failed()) == ["broken", "ghost"]
    assert "unreadable" in cache.failed()["broken"]
    with pytest.raises(VideoError, match="recorded as failed") as err:
        cache.get("broken")
    assert err.value.video_id == "broken" and str(out) in str(err.value)


def test_settings_mismatch_and_windows(video_dir: Path, tmp_path: Path) -> None:
    cf = load_script("cache_frames")
    out = tmp_path / "win.h5"
    windows = tmp_path / "windows.json"
    windows.write_text(json.dumps({"v0": [1.0, 2.5], "v4": [0.5, None]}))
    assert cf.main(["--video_path", str(video_dir), "--out", str(out), "--ids", "v0,v4,v1",
                    "--windows", str(windows), "--workers", "0", *ARGS]) == 0
    cache = FrameCache(out)
    frames, mask = cache.get("v0", start=1.0, end=2.5)
    ref = _decode(video_dir, "v0", 1.0, 2.5)
    assert torch.equal(frames, ref[0]) and torch.equal(mask, ref[1])
    assert frame_indices(frames, mask) == [10, 15, 20, 25]
    assert torch.equal(cache.get("v4", start=0.5)[0], _decode(video_dir, "v4", 0.5)[0])
    with pytest.raises(VideoError, match="window"):
        cache.get("v0")  # whole video requested, window cached
    with pytest.raises(VideoError, match="window"):
        cache.get("v1", start=0.0, end=1.0)

    source = VideoSource(str(video_dir), frame_cache=str(out), **SETTINGS)
    assert torch.equal(source.load("v0", 1.0, 2.5)[0], frames)
    for bad in [{"max_frames": 8}, {"framerate": 1.0}, {"size": 64}]:
        with pytest.raises(ValueError, match="was built with") as info:
            VideoSource(None, frame_cache=str(out), **{**SETTINGS, **bad})
        key = next(iter(bad))
        assert key in str(info.value) and str(out) in str(info.value)
        assert str(bad[key]) in str(info.value) and str(SETTINGS[key]) in str(info.value)


def test_index_rounding_is_recorded_and_checked(video_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "floor.h5"
    build_cache(video_dir, out, ids=["v0"], progress=False, index_rounding="floor", **SETTINGS)
    cache = FrameCache(out)
    assert cache.settings()["index_rounding"] == "floor"
    want = read_frames(next(video_dir.glob("v0.*")), index_rounding="floor", **SETTINGS)
    assert frame_indices(*cache.get("v0")) == [0, 5, 10, 15, 20, 30] == frame_indices(*want)
    src = VideoSource(None, frame_cache=str(out), index_rounding="floor", **SETTINGS)
    assert torch.equal(src.load("v0")[0], want[0])
    with pytest.raises(ValueError, match="index_rounding"):  # a cache read with other rounding
        VideoSource(None, frame_cache=str(out), **SETTINGS)
    with pytest.raises(ValueError, match="index_rounding"):  # extended with other rounding
        build_cache(video_dir, out, ids=["v0", "v1"], progress=False, **SETTINGS)
    with pytest.raises(ValueError, match="index_rounding"):
        build_cache(video_dir, tmp_path / "x.h5", ids=["v0"], progress=False, index_rounding="ceil",
                    **SETTINGS)
    cache.close()


def test_key_encoding_round_trip() -> None:
    for vid in ["video1", "a/b", "100%/x", ".", "..", "", "12@N00_3.mov"]:
        assert "/" not in encode_key(vid) and decode_key(encode_key(vid)) == vid
        assert encode_key(vid) not in (".", "..", "")


def test_frame_cache_rejects_non_stores(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        FrameCache(tmp_path / "none.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.attrs["format"] = "something-else"
    with pytest.raises(ValueError, match="not an EMCL frame cache"):
        FrameCache(tmp_path / "other.h5")


def test_benchmark_script_writes_json(video_dir: Path, tmp_path: Path) -> None:
    bench = load_script("benchmark_data")
    vdir = tmp_path / "two"
    vdir.mkdir()
    for name in ["v0.mp4", "v2.mp4"]:
        os.link(video_dir / name, vdir / name)
    out = tmp_path / "bench" / "result.json"
    result = bench.main(["--video_path", str(vdir), "--json", str(out), "--workers", "0", "--max_frames", "4",
                         "--framerate", "1", "--size", "32", "--repeats", "1", "--cache_clips", "20"])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    assert set(data["decode_clips_per_s"]) == {"pyav", "opencv"}
    for key in ["cache_clips_per_s", "num_videos", "workers", "max_frames", "framerate", "size", "machine"]:
        assert key in data
    assert data["num_videos"] == 2 and data["workers"] == 0 and data["max_frames"] == 4
    assert data["cache_clips_per_s"] > 0 and all(v > 0 for v in data["decode_clips_per_s"].values())
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["platform"]
    assert [p.name for p in out.parent.iterdir()] == ["result.json"]  # no temp files left


def test_cache_a_dataset_with_its_windows(tmp_path: Path) -> None:
    """--datatype/--anno_path cache every split's videos with the windows the loader reads (DiDeMo 0-31 s)."""
    from emcl.data.datasets import VideoDataset, load_split
    from emcl.data.synthetic import make_synthetic

    anno = make_synthetic(tmp_path / "syn", 6, seed=5, format="didemo", split_sizes=(3, 1, 2), frames=8,
                          fps=4, size=32)
    out = tmp_path / "didemo.h5"
    cf = load_script("cache_frames")
    videos = str(tmp_path / "syn" / "videos")
    cf.main(["--datatype", "didemo", "--anno_path", str(anno), "--video_path", videos, "--out", str(out),
             "--workers", "0", "--no_progress", "--max_frames", "6", "--framerate", "2", "--size", "32"])
    test = load_split("didemo", anno, "test")
    assert test.windows and all(w == (0.0, 31.0) for w in test.windows.values())
    cached = VideoDataset(test, VideoSource(None, frame_cache=str(out), **SETTINGS))
    decoded = VideoDataset(test, VideoSource(str(tmp_path / "syn" / "videos"), **SETTINGS))
    for i in range(len(test.video_ids)):
        assert torch.equal(cached[i]["frames"], decoded[i]["frames"]) and cached[i]["valid"]
    assert len(FrameCache(out)) == 6


def test_replaced_source_video_is_decoded_again(tmp_path: Path) -> None:
    """A store never serves stale frames: a source file that changed (size or mtime) is re-decoded."""
    import shutil

    src = tmp_path / "videos"
    src.mkdir()
    write_video(src / "a.mp4", 20)
    write_video(src / "b.mp4", 20)
    out = tmp_path / "c.h5"
    assert build_cache(src, out, progress=False, **SETTINGS)["decoded"] == 2
    assert build_cache(src, out, progress=False, **SETTINGS)["up_to_date"]
    shutil.copyfile(src / "b.mp4", tmp_path / "b_old.mp4")
    write_video(src / "b.mp4", 40, fps=5)  # different content under the same id
    summary = build_cache(src, out, progress=False, **SETTINGS)
    assert summary["decoded"] == 1 and not summary["up_to_date"]
    fresh = read_frames(src / "b.mp4", video_id="b", **SETTINGS)
    stale = read_frames(tmp_path / "b_old.mp4", video_id="b", **SETTINGS)
    got = FrameCache(out).get("b")
    assert torch.equal(got[0], fresh[0]) and not torch.equal(got[0], stale[0])


def test_unusable_partial_store_gives_the_threads_back(video_dir: Path, tmp_path: Path) -> None:
    """A .partial built with other settings is an error, and torch's thread count is restored."""
    first = tmp_path / "a.h5"
    build_cache(video_dir, first, ids=["v0"], progress=False, **SETTINGS)
    shutil.copy(first, str(tmp_path / "b.h5") + ".partial")
    threads = torch.get_num_threads()
    with pytest.raises(ValueError, match="max_frames"):
        build_cache(video_dir, tmp_path / "b.h5", ids=["v0"], progress=False, **{**SETTINGS, "max_frames": 8})
    assert torch.get_num_threads() == threads
