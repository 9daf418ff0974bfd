"""``python -m emcl.data.check``: a complete synthetic copy of every layout is ready; each fault a real copy
has (a missing video, a truncated one, an empty stream, a duplicate id, an over-long caption, a frame cache
that does not cover the split) is named by id with the verdict and exit status a run would imply; bad flags
exit 2. With the real MSR-VTT / MSRVTT-QA annotation files (``EMCL_MSRVTT_ANNO``, ``EMCL_MSRVTT_QA_ANNO``:
folders holding them) the counts are those of the published splits.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pickle
from pathlib import Path

import av
import pytest

from emcl.data import check
from emcl.data.cache import build_cache
from emcl.data.synthetic import make_synthetic
from emcl.data.video import VideoError, probe_video
from emcl.errors import cli_main

FORMATS = ("msrvtt", "msvd", "lsmdc", "activitynet", "didemo", "msrvtt_qa")
TINY = {"frames": 4, "fps": 4, "size": 16}


def run(argv: list[str]) -> tuple[int, str, str]:
    """The command in this process, as ``python -m emcl.data.check`` runs it: (exit status, out, err)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli_main(check.main, argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def report(folder: Path, fmt: str, json_path: Path, *extra: str) -> tuple[int, dict, str]:
    code, out, err = run(["--datatype", fmt, "--anno_path", str(folder / "annotations"),
                          "--video_path", str(folder / "videos"), "--json", str(json_path),
                          "--workers", "2", "--no_progress", *extra])
    assert "Traceback" not in err, err
    return code, json.loads(json_path.read_text()), out


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    return {fmt: make_synthetic(root / fmt, 8, seed=1, format=fmt, split_sizes=(4, 2, 2), **TINY).parent
            for fmt in FORMATS}


@pytest.mark.parametrize("fmt", FORMATS)
def test_complete_synthetic_copy_is_ready(layouts, fmt, tmp_path):
    code, rep, out = report(layouts[fmt], fmt, tmp_path / "r.json")
    assert code == 0 and rep["ready"] and rep["exit_status"] == 0, out
    no_val = fmt in ("msrvtt", "activitynet")  # MSR-VTT's 9k list holds its val videos; ActivityNet has none
    assert list(rep["splits"]) == (["train", "test"] if no_val else ["train", "val", "test"])
    sizes = {"train": 4, "val": 2, "test": 2}
    for name, s in rep["splits"].items():
        assert s["verdict"] == "ready" and s["status"] == "ready", (name, s)
        assert s["videos"] == sizes[name] and not s["video_problems"] and not s["duplicates"]
        assert s["video_stats"]["probed"] == sizes[name] and s["video_stats"]["fps"]["min"] == 4.0
    assert rep["videos_checked"]["mode"] == "probe" and "every split is ready" in out


@pytest.fixture()
def faulty(tmp_path) -> tuple[Path, dict[str, str]]:
    """An MSVD-layout copy with one fault per kind; returns the folder and the ids hit."""
    folder = tmp_path / "msvd"
    make_synthetic(folder, 30, seed=4, format="msvd", split_sizes=(22, 2, 6), captions_per_video=2, **TINY)
    anno, videos = folder / "annotations", folder / "videos"
    split = {s: (anno / f"{s}_list.txt").read_text().split() for s in ("train", "val", "test")}
    hit = {"deleted": split["train"][3], "long": split["train"][5], "truncated": split["test"][1],
           "duplicate": split["val"][0]}
    next(videos.glob(hit["deleted"] + ".*")).unlink()
    truncated = next(videos.glob(hit["truncated"] + ".*"))
    with open(truncated, "r+b") as fh:
        fh.truncate(8)
    with open(anno / "val_list.txt", "a") as fh:
        fh.write(hit["duplicate"] + "\n")
    captions = pickle.loads((anno / "raw-captions.pkl").read_bytes())
    captions[hit["long"]].append(("a very long caption that goes on " * 8).split())
    (anno / "raw-captions.pkl").write_bytes(pickle.dumps(captions))
    return folder, hit


def test_each_fault_is_named_with_its_verdict(faulty, tmp_path):
    folder, hit = faulty
    code, rep, out = report(folder, "msvd", tmp_path / "r.json")
    assert code == 1 and not rep["ready"]
    train, val, test = (rep["splits"][s] for s in ("train", "val", "test"))
    # one missing video of 22 is within 5%: a run with --skip_bad_videos goes through
    assert list(train["video_problems"]["missing"]) == [hit["deleted"]]
    assert train["verdict"] == "ready with 1 skip under --skip_bad_videos"
    assert train["over_max_words"] == 1 and train["longest"][0]["video_id"] == hit["long"]
    assert train["longest"][0]["tokens"] > 32
    # one unreadable video of 6 is over 5%: the run would stop
    assert list(test["video_problems"]["unreadable"]) == [hit["truncated"]]
    assert test["status"] == "not_ready" and "1 of 6 videos unusable" in test["verdict"]
    # a duplicate id stops the parser; every duplicate is named with its count
    assert val["duplicates"] == {hit["duplicate"]: 2}
    assert val["status"] == "not_ready" and hit["duplicate"] in val["verdict"]
    for vid in hit.values():
        assert vid in out, vid
    assert "not ready: val, test" in out


def test_limits_follow_max_skip_fraction_and_splits(faulty, tmp_path):
    folder, hit = faulty
    code, rep, _ = report(folder, "msvd", tmp_path / "r.json", "--splits", "train",
                          "--max_skip_fraction", "0")
    assert code == 1 and list(rep["splits"]) == ["train"]
    assert rep["splits"]["train"]["verdict"].startswith("not ready: 1 of 22 videos unusable")
    code, rep, _ = report(folder, "msvd", tmp_path / "r.json", "--splits", "train", "--max_words", "77")
    assert code == 0 and rep["splits"]["train"]["over_max_words"] == 0
    # a stat per file, as the trainer's own up-front check: the truncated file is not seen
    code, rep, _ = report(folder, "msvd", tmp_path / "r.json", "--splits", "test", "--no_probe")
    assert code == 0 and rep["videos_checked"]["mode"] == "stat"


def write_empty_stream(path: Path) -> Path:
    """An AVI with a video stream and not one frame in it."""
    container = av.open(str(path), "w", format="avi")
    stream = container.add_stream("mpeg4", rate=4)
    stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
    if hasattr(container, "start_encoding"):
        container.start_encoding()  # writes the header although no frame follows
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def test_probe_reads_metadata_and_names_empty_streams(layouts, tmp_path):
    clip = next((layouts["msvd"] / "videos").iterdir())
    info = probe_video(clip)
    assert (info.fps, info.frames, info.duration, info.width, info.height) == (4.0, 4, 1.0, 16, 16)
    assert not info.decoded_first_frame and probe_video(clip, decode_first=True).decoded_first_frame
    with pytest.raises(VideoError, match="zero-length"):
        probe_video(write_empty_stream(tmp_path / "empty.avi"))
    assert check.problem_kind("zero-length: no frame decodes") == "zero_length"
    assert check.problem_kind("zero fps: fps reads 0.0 and ...") == "zero_fps"
    assert check.problem_kind("file not found") == check.problem_kind("missing") == "missing"
    assert check.problem_kind("empty file (0 bytes)") == "empty"


def test_empty_stream_and_misplaced_file(tmp_path):
    folder = tmp_path / "m"
    make_synthetic(folder, 6, seed=2, format="msrvtt", split_sizes=(4, 0, 2), **TINY)
    rows = (folder / "annotations/MSRVTT_JSFUSION_test.csv").read_text().splitlines()
    test_ids = [r["video_id"] for r in csv.DictReader(rows)]
    write_empty_stream(folder / "videos" / f"{test_ids[0]}.mp4")
    (folder / "videos/sub").mkdir()
    (folder / "videos" / f"{test_ids[1]}.mp4").rename(folder / "videos/sub" / f"{test_ids[1]}.mp4")
    code, rep, _ = report(folder, "msrvtt", tmp_path / "r.json")
    test = rep["splits"]["test"]
    assert code == 1 and list(test["video_problems"]["zero_length"]) == [test_ids[0]]
    assert list(test["video_problems"]["missing"]) == [test_ids[1]]
    assert any("sub-folder" in note and f"sub/{test_ids[1]}.mp4" in note for note in test["notes"])


def test_frame_cache_coverage_and_settings(layouts, tmp_path):
    folder = layouts["didemo"]
    cache = tmp_path / "c.h5"
    ids = sorted(p.stem for p in (folder / "videos").iterdir())
    windows = {vid: (0.0, 31.0) for vid in ids[1:-1]}  # the first one cached whole: the wrong window
    build_cache(folder / "videos", cache, max_frames=2, framerate=1.0, size=16, ids=ids[:-1], windows=windows,
                progress=False)
    flags = ["--frame_cache", str(cache), "--max_frames", "2", "--image_size", "16"]
    code, rep, out = report(folder, "didemo", tmp_path / "r.json", *flags)
    problems = {}
    for s in rep["splits"].values():
        for kind, found in s["cache_problems"].items():
            problems.update({vid: kind for vid in found})
    assert problems == {ids[0]: "wrong_window", ids[-1]: "not_cached"}
    assert code == 1 and ids[0] in out and ids[-1] in out
    code, rep, out = report(folder, "didemo", tmp_path / "r.json", *flags[:2], "--image_size", "16")
    assert code == 1 and all("frame cache" in s["verdict"] and "max_frames" in s["verdict"]
                             for s in rep["splits"].values())


@pytest.mark.parametrize("argv, message", [
    (["--datatype", "msvd", "--anno_path", "/nonexistent", "--video_path", "."], "--anno_path"),
    (["--datatype", "msvd", "--anno_path", "."], "--video_path"),
    (["--datatype", "activitynet", "--anno_path", ".", "--video_path", ".", "--splits", "val"], "no val"),
    (["--datatype", "msvd", "--anno_path", ".", "--frame_cache", "/nonexistent.h5"], "--frame_cache"),
])
def test_bad_flags_exit_2(argv, message, layouts):
    if "--splits" in argv:
        argv = [a if a != "." else str(layouts["activitynet"] / "annotations") for a in argv]
    code, out, err = run(argv)
    assert code == 2 and err.startswith("error: ") and message in err and "Traceback" not in err


# ------------------------------------------------------------------------------- the real annotation files


def real_folder(var: str, *names: str) -> Path:
    folder = os.environ.get(var)
    if not folder:
        pytest.skip(f"{var} is not set (a folder with the real annotation files); CI has no copy")
    missing = [n for n in names if not (Path(folder) / n).is_file()]
    if missing:
        pytest.skip(f"{var}={folder} lacks {', '.join(missing)}")
    return Path(folder)


def stand_in_videos(folder: Path, ids: list[str], clip: Path) -> Path:
    """``{id}.mp4`` for every id: links to one tiny clip (the check then stats each file)."""
    folder.mkdir()
    for vid in ids:
        os.symlink(clip, folder / f"{vid}.mp4")
    return folder


def msrvtt_annotations(real: Path, tmp: Path) -> tuple[Path, str]:
    """The real folder when it has ``MSRVTT_data.json``; else the real csv files beside a stand-in
    ``MSRVTT_data.json`` built from the real full split lists, 20 captions per video as MSR-VTT has."""
    if (real / "MSRVTT_data.json").is_file():
        return real, "real"
    lists = {"train": "MSRVTT_train.full.csv", "validate": "MSRVTT_val.full.csv",
             "test": "MSRVTT_test.full.csv"}
    if not all((real / n).is_file() for n in lists.values()):
        pytest.skip(f"{real} has neither MSRVTT_data.json nor the full split lists to stand in for it")
    anno = tmp / "anno"
    anno.mkdir()
    for f in real.iterdir():
        os.symlink(f, anno / f.name)
    videos, sentences = [], []
    for split, name in lists.items():
        for row in csv.DictReader((real / name).read_text().splitlines()):
            vid = row["video_id"]
            videos.append({"video_id": vid, "split": split})
            sentences += [{"video_id": vid, "caption": f"a person does thing number {k}",
                           "sen_id": len(sentences) + k} for k in range(20)]
    (anno / "MSRVTT_data.json").write_text(json.dumps({"videos": videos, "sentences": sentences}))
    return anno, "stand-in captions"


def test_real_msrvtt_counts(layouts, tmp_path):
    real = real_folder("EMCL_MSRVTT_ANNO", "MSRVTT_train.9k.csv", "MSRVTT_train.7k.csv",
                       "MSRVTT_JSFUSION_test.csv")
    anno, source = msrvtt_annotations(real, tmp_path)
    clip = next((layouts["msrvtt"] / "videos").iterdir())
    stand_in_videos(tmp_path / "videos", [f"video{i}" for i in range(10_000)], clip)
    got = {}
    for train, test in (("9k", "1k"), ("7k", "1k"), ("full", "full")):
        code, out, err = run(["--datatype", "msrvtt", "--anno_path", str(anno), "--video_path",
                              str(tmp_path / "videos"), "--msrvtt_train", train, "--msrvtt_test", test,
                              "--no_probe", "--no_progress", "--json", str(tmp_path / "r.json")])
        assert code == 0, out + err
        rep = json.loads((tmp_path / "r.json").read_text())
        for name, s in rep["splits"].items():
            got[f"{name}.{test if name == 'test' else train}"] = (s["videos"], s["captions"])
            assert all(e["status"] == "matches" for e in s["expected"].values()), (name, s["expected"])
    print(f"MSR-VTT counts ({source}): {got}")
    assert got == {"train.9k": (9000, 180_000), "test.1k": (1000, 1000), "train.7k": (7010, 140_200),
                   "train.full": (6513, 130_260), "val.full": (497, 9940), "test.full": (2990, 59_800)}


def test_real_msrvtt_qa_val_counts(layouts, tmp_path):
    anno = real_folder("EMCL_MSRVTT_QA_ANNO", "val.jsonl", "train_ans2label.json")
    clip = next((layouts["msrvtt_qa"] / "videos").iterdir())
    lines = (anno / "val.jsonl").read_text().splitlines()
    ids = list(dict.fromkeys(json.loads(line)["video_id"] for line in lines if line.strip()))
    stand_in_videos(tmp_path / "videos", ids, clip)
    code, out, err = run(["--datatype", "msrvtt_qa", "--anno_path", str(anno), "--video_path",
                          str(tmp_path / "videos"), "--splits", "val", "--no_probe", "--no_progress",
                          "--json", str(tmp_path / "r.json")])
    val = json.loads((tmp_path / "r.json").read_text())["splits"]["val"]
    print(f"MSRVTT-QA val: {val['videos']} videos, {val['questions']} questions, "
          f"{val['out_of_vocabulary']} out of vocabulary")
    assert code == 0, out + err
    assert (val["videos"], val["questions"], val["out_of_vocabulary"]) == (497, 12_278, 859)
