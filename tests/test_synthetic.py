"""Synthetic clip generator: determinism, file layouts, caption content, and visual learnability."""

from __future__ import annotations

import json
import pickle
import random
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from emcl.data.synthetic import (
    BACKGROUNDS,
    COLOR_WORDS,
    COLORS,
    FORMATS,
    MOTION_WORDS,
    SHAPE_WORDS,
    SHAPES,
    ClipAttributes,
    attribute_stats,
    load_attributes,
    make_captions,
    make_synthetic,
    num_attribute_combinations,
    shape_mask,
)

TINY = {"num_videos": 12, "frames": 8, "fps": 4, "size": 32}

EXPECTED_FILES = {
    "msrvtt": {"MSRVTT_train.9k.csv", "MSRVTT_train.7k.csv", "MSRVTT_data.json", "MSRVTT_JSFUSION_test.csv"},
    "msvd": {"train_list.txt", "val_list.txt", "test_list.txt", "raw-captions.pkl"},
    "lsmdc": {"LSMDC16_annos_training.csv", "LSMDC16_annos_val.csv", "LSMDC16_challenge_1000_publictect.csv"},
    "activitynet": {"train.json", "val_1.json", "val_2.json", "train_ids.json", "val_ids.json"},
    "didemo": {"train_data.json", "val_data.json", "test_data.json", "train_list.txt", "val_list.txt",
               "test_list.txt"},
}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("fmt", FORMATS)
def test_same_seed_same_bytes_and_layout(tmp_path: Path, fmt: str) -> None:
    a = make_synthetic(tmp_path / "a", seed=7, format=fmt, **TINY)
    b = make_synthetic(tmp_path / "b", seed=7, format=fmt, **TINY)
    c = make_synthetic(tmp_path / "c", seed=8, format=fmt, **TINY)
    assert a == tmp_path / "a" / "annotations"
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert set(fa) == EXPECTED_FILES[fmt]
    assert fa == fb
    assert fa != fc
    # videos: one per video id, same bytes for the same seed (same PyAV build)
    va, vb = _files(tmp_path / "a" / "videos"), _files(tmp_path / "b" / "videos")
    assert len(va) == TINY["num_videos"] and va == vb
    assert all(len(v) > 200 for v in va.values())
    suffix = {".avi"} if fmt == "msvd" else {".mp4"}
    assert {Path(n).suffix for n in va} == suffix


def test_file_contents_follow_real_layouts(tmp_path: Path) -> None:
    d = make_synthetic(tmp_path / "m", seed=1, format="msrvtt", split_sizes=(9, 1, 2), **{
        k: v for k, v in TINY.items() if k != "num_videos"}, num_videos=12)
    data = json.loads((d / "MSRVTT_data.json").read_text())
    assert {v["split"] for v in data["videos"]} == {"train", "validate", "test"}
    assert all({"video_id", "split", "id"} <= set(v) for v in data["videos"])
    assert all({"video_id", "caption", "sen_id"} <= set(s) for s in data["sentences"])
    assert (d / "MSRVTT_train.9k.csv").read_text().splitlines()[:2] == ["video_id", "video0"]
    js = (d / "MSRVTT_JSFUSION_test.csv").read_text().splitlines()
    assert js[0] == "key,vid_key,video_id,sentence"
    assert js[1].startswith("ret0,msr10,video10,") and len(js) == 3

    d = make_synthetic(tmp_path / "v", seed=1, format="msvd", **TINY)
    raw = pickle.loads((d / "raw-captions.pkl").read_bytes())
    token_lists = [c for caps in raw.values() for c in caps]
    assert all(isinstance(c, list) and all(isinstance(t, str) for t in c) for c in token_lists)
    assert {len(c) for c in raw.values()} == {1, 5}  # some videos have exactly one caption
    lists = ("train_list.txt", "val_list.txt", "test_list.txt")
    listed = [x for f in lists for x in (d / f).read_text().split()]
    assert sorted(listed) == sorted(raw) and len(listed) == 12

    d = make_synthetic(tmp_path / "l", seed=1, format="lsmdc", **TINY)
    lines = (d / "LSMDC16_annos_training.csv").read_text().splitlines()
    fields = lines[0].split("\t")
    assert len(fields) == 6 and fields[0].endswith(f"_{fields[1]}-{fields[2]}")
    assert any('"' in line for f in EXPECTED_FILES["lsmdc"] for line in (d / f).read_text().splitlines())

    d = make_synthetic(tmp_path / "a", seed=1, format="activitynet", **TINY)
    train = json.loads((d / "train.json").read_text())
    assert json.loads((d / "train_ids.json").read_text()) == list(train)
    rec = next(iter(train.values()))
    assert len(rec["timestamps"]) == len(rec["sentences"]) >= 2 and rec["duration"] == 2.0

    d = make_synthetic(tmp_path / "d", seed=1, format="didemo", **TINY)
    recs = json.loads((d / "train_data.json").read_text())
    assert all({"video", "times", "description"} <= set(r) for r in recs)
    stems = {Path(r["video"]).stem for r in recs}
    assert len(recs) > len(stems)  # several records per video
    assert stems == {Path(n).stem for n in (tmp_path / "d" / "videos").iterdir()} - {
        Path(r["video"]).stem for f in ("val_data.json", "test_data.json")
        for r in json.loads((d / f).read_text())}
    assert all("@N" in s for s in stems)


def test_marker_skips_regeneration_and_arguments_are_checked(tmp_path: Path) -> None:
    d = make_synthetic(tmp_path, seed=3, format="msvd", **TINY)
    pkl = d / "raw-captions.pkl"
    before = pkl.stat().st_mtime_ns
    pkl.write_bytes(pkl.read_bytes())  # touch; a regeneration would rewrite it again
    touched = pkl.stat().st_mtime_ns
    assert make_synthetic(tmp_path, seed=3, format="msvd", **TINY) == d
    assert pkl.stat().st_mtime_ns == touched and touched >= before
    # other arguments: regenerated, old files removed
    make_synthetic(tmp_path, seed=3, format="msrvtt", **TINY)
    assert _files(d).keys() == EXPECTED_FILES["msrvtt"]
    assert not list((tmp_path / "videos").glob("*.avi"))
    with pytest.raises(ValueError, match="split sizes"):
        make_synthetic(tmp_path / "x", seed=0, split_sizes=(5, 5, 5), **TINY)
    with pytest.raises(ValueError, match="unknown format"):
        make_synthetic(tmp_path / "x", seed=0, format="webvid", **TINY)


def test_command_line(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "emcl.data.synthetic", "--out", str(tmp_path), "--num_videos", "6",
           "--seed", "2", "--format", "lsmdc", "--split-sizes", "3,1,2", "--frames", "8", "--size", "32"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "[test] 2 videos" in out and "possible combinations" in out
    lines = (tmp_path / "annotations" / "LSMDC16_annos_val.csv").read_text().splitlines()
    assert len(lines) == 1


def test_captions_name_every_attribute() -> None:
    rng = random.Random(0)
    count_words = {1: ("a ", "one ", "a single "), 2: ("two ", "a pair of "),
                   3: ("three ", "a group of three ", "a trio of ")}
    for _ in range(300):
        a = ClipAttributes(rng.choice((1, 2, 3)), rng.choice(list(COLORS)), rng.choice(SHAPES),
                           rng.choice(list(MOTION_WORDS)), rng.choice(list(BACKGROUNDS)))
        caps = make_captions(a, rng, 5)
        assert len(set(caps)) == 5
        for cap in caps:
            words = cap.split()
            assert any(w in words for w in COLOR_WORDS[a.color]), cap
            padded = f" {cap} "
            assert any(f" {sg} " in padded or f" {pl} " in padded for sg, pl in SHAPE_WORDS[a.shape]), cap
            assert any(f" {d} " in padded for *_, d in MOTION_WORDS[a.motion]), cap
            assert any(f" {c}" in f" {cap}" for c in count_words[a.count]), cap
    assert num_attribute_combinations() >= 500


def _classify(frames: np.ndarray, background: str) -> dict[str, str | int]:
    """Recover the attributes of a decoded uint8 (T,3,S,S) clip with fixed rules (no learning)."""
    rgb = frames.transpose(0, 2, 3, 1).astype(np.int32)
    fg = np.abs(rgb - np.array(BACKGROUNDS[background])).sum(-1) > 120
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg[0].astype(np.uint8), connectivity=4)
    comps = [k for k in range(1, n) if stats[k, cv2.CC_STAT_AREA] >= 4]
    mean = rgb[0][fg[0]].mean(0)
    color = min(COLORS, key=lambda c: ((np.array(COLORS[c]) - mean) ** 2).sum())
    k = max(comps, key=lambda k: stats[k, cv2.CC_STAT_AREA])
    x, y, w, h = (int(v) for v in stats[k, :4])  # left, top, width, height
    obj = (labels[y:y + h, x:x + w] == k).astype(np.float32)
    crop = cv2.resize(obj, (16, 16), interpolation=cv2.INTER_AREA)
    shape = min(SHAPES, key=lambda s: np.abs(crop - shape_mask(s, 16)).mean())
    (y0, x0), (y1, x1) = (np.argwhere(fg[0]).mean(0), np.argwhere(fg[-1]).mean(0))
    dy, dx = y1 - y0, x1 - x0
    if max(abs(dx), abs(dy)) < 1.5:
        motion = "still"
    elif abs(dx) > abs(dy):
        motion = "right" if dx > 0 else "left"
    else:
        motion = "down" if dy > 0 else "up"
    return {"count": len(comps), "color": color, "shape": shape, "motion": motion}


def test_attributes_visible_at_32px_after_resize_and_crop(tmp_path: Path) -> None:
    """Clips made at the default 64 px and read at 32 px (short-side resize + center crop) keep every
    attribute recoverable by simple rules, so a tiny model can learn them."""
    from emcl.data.video import read_frames

    make_synthetic(tmp_path, 40, seed=5, format="msrvtt", frames=8, fps=4)
    attrs = load_attributes(tmp_path)
    stats = attribute_stats(list(attrs.values()), ["train"] * len(attrs))
    assert "distinct combinations" in stats and "color" in stats
    wrong = []
    for vid, a in attrs.items():
        frames, mask = read_frames(tmp_path / "videos" / f"{vid}.mp4", framerate=4, max_frames=8, size=32)
        assert frames.shape == (8, 3, 32, 32) and int(mask.sum()) == 8
        got = _classify(frames.numpy(), a.background)
        wrong += [(vid, k, getattr(a, k), got[k]) for k in got if got[k] != getattr(a, k)]
    assert not wrong, wrong
