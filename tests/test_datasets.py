"""Annotation loaders, datasets and loaders on tiny synthetic sets in every real file layout."""

from __future__ import annotations

import json
import logging
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from emcl.clip import EOT_TOKEN, SOT_TOKEN
from emcl.data.datasets import (
    RetrievalSplit,
    Skipped,
    TextDataset,
    TrainDataset,
    VideoDataset,
    collate_skip,
    has_split,
    load_split,
)
from emcl.data.loader import build_loader, set_epoch
from emcl.data.sources import VideoSource
from emcl.data.synthetic import COLOR_WORDS, FORMATS, load_attributes, make_synthetic
from emcl.data.video import VideoError

FRAMES, SIZE, WORDS = 8, 32, 16


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> dict[str, Path]:
    """One tiny set per format: 12 videos split 9/1/2, 8 frames at 4 fps, 32 px."""
    root = tmp_path_factory.mktemp("synth")
    return {
        f: make_synthetic(root / f, 12, seed=11, format=f, frames=FRAMES, fps=4, size=SIZE).parent
        for f in FORMATS
    }


def _source(root: Path, fmt: str, video_dir: Path | None = None) -> VideoSource:
    return VideoSource(
        str(video_dir or root / "videos"),
        framerate=4,
        max_frames=FRAMES,
        size=SIZE,
        any_extension=fmt == "msvd",
    )


# (format, options, split) -> (videos, captions)
CASES = [
    ("msrvtt", {}, "train", 9, 45),
    ("msrvtt", {"msrvtt_train": "7k"}, "train", 7, 35),
    ("msrvtt", {}, "test", 2, 2),
    ("msrvtt", {"msrvtt_train": "full", "msrvtt_test": "full"}, "train", 9, 45),
    ("msrvtt", {"msrvtt_train": "full", "msrvtt_test": "full"}, "val", 1, 5),
    ("msrvtt", {"msrvtt_train": "full", "msrvtt_test": "full"}, "test", 2, 10),
    ("msvd", {}, "train", 9, 37),  # videos 3 and 7 have one caption
    ("msvd", {}, "val", 1, 5),
    ("msvd", {}, "test", 2, 6),
    ("lsmdc", {}, "train", 9, 9),
    ("lsmdc", {}, "val", 1, 1),
    ("lsmdc", {}, "test", 2, 2),
    ("activitynet", {}, "train", 9, 9),
    ("activitynet", {}, "test", 2, 2),
    ("didemo", {}, "train", 9, 9),
    ("didemo", {}, "val", 1, 1),
    ("didemo", {}, "test", 2, 2),
]


def _check_text(batch: dict, n: int) -> None:
    ids, mask = batch["text_ids"], batch["text_mask"]
    assert ids.shape == mask.shape == (n, WORDS) and ids.dtype == mask.dtype == torch.long
    lengths = mask.sum(1)
    assert (ids[:, 0] == SOT_TOKEN).all()
    assert (ids[torch.arange(n), lengths - 1] == EOT_TOKEN).all()
    assert (mask == (torch.arange(WORDS) < lengths[:, None]).long()).all()
    assert (ids[mask == 0] == 0).all() and (lengths > 3).all()


def _check_frames(batch: dict, n: int) -> None:
    assert batch["frames"].shape == (n, FRAMES, 3, SIZE, SIZE) and batch["frames"].dtype == torch.uint8
    assert batch["frame_mask"].shape == (n, FRAMES) and (batch["frame_mask"] == 1).all()
    assert batch["frames"].float().std() > 10  # real content, not zeros


@pytest.mark.parametrize(
    "fmt, options, split, n_videos, n_captions",
    CASES,
    ids=[f"{c[0]}-{c[2]}-{'-'.join(c[1].values()) or 'default'}" for c in CASES],
)
def test_load_split_and_datasets(synth, fmt, options, split, n_videos, n_captions) -> None:
    root = synth[fmt]
    assert has_split(fmt, split, root / "annotations", **options)
    s = load_split(fmt, root / "annotations", split, **options)
    assert (s.datatype, s.split, s.num_videos, s.num_captions) == (fmt, split, n_videos, n_captions)
    assert len(set(s.video_ids)) == n_videos

    # every caption is tied to the video it describes (its colour word names that video's colour)
    attrs = load_attributes(root)
    for cap, v in zip(s.captions, s.caption_video):
        words = cap.lower().replace(".", " ").split()
        assert any(w in words for w in COLOR_WORDS[attrs[s.video_ids[v]].color]), (cap, s.video_ids[v])
    assert (s.windows is not None) == (fmt == "didemo")
    if fmt == "didemo":
        assert set(s.windows) == set(s.video_ids) and set(s.windows.values()) == {(0.0, 31.0)}

    source = _source(root, fmt)
    train = build_loader(TrainDataset(s, source, WORDS), batch_size=4, shuffle=True, seed=0, workers=0)
    batch = next(iter(train))
    n = min(4, n_captions)
    _check_text(batch, n)
    _check_frames(batch, n)
    assert batch["num_skipped"] == 0 and batch["skipped_ids"] == []
    assert [s.caption_video[c] for c in batch["caption_index"].tolist()] == batch["video_index"].tolist()

    texts = list(build_loader(TextDataset(s, WORDS), batch_size=4, shuffle=False, seed=0, workers=0))
    assert torch.cat([b["caption_index"] for b in texts]).tolist() == list(range(n_captions))
    for b in texts:
        _check_text(b, len(b["caption_index"]))
    videos = list(build_loader(VideoDataset(s, source), batch_size=4, shuffle=False, seed=0, workers=0))
    assert torch.cat([b["video_index"] for b in videos]).tolist() == list(range(n_videos))
    for b in videos:
        _check_frames(b, len(b["video_index"]))
        assert b["valid"].dtype == torch.bool and b["valid"].all()


def test_splits_that_do_not_exist(synth) -> None:
    assert not has_split("msrvtt", "val")
    assert not has_split("msrvtt", "val", msrvtt_train="9k")
    assert not has_split("activitynet", "val", synth["activitynet"] / "annotations")
    assert not has_split("didemo", "val")  # without the folder we cannot know
    assert all(has_split(d, "test") and has_split(d, "train") for d in FORMATS)
    with pytest.raises(ValueError, match="no val split"):
        load_split("msrvtt", synth["msrvtt"] / "annotations", "val")
    with pytest.raises(ValueError, match="no val split"):
        load_split("activitynet", synth["activitynet"] / "annotations", "val")
    with pytest.raises(ValueError, match="unknown datatype"):
        load_split("webvid", synth["msvd"] / "annotations", "train")
    with pytest.raises(ValueError, match="unknown split"):
        load_split("msvd", synth["msvd"] / "annotations", "validate")
    with pytest.raises(ValueError, match="msrvtt_train"):
        load_split("msrvtt", synth["msrvtt"] / "annotations", "train", msrvtt_train="8k")


def test_loader_shuffle_workers_and_epochs(synth) -> None:
    s = load_split("msvd", synth["msvd"] / "annotations", "train")
    ds = TrainDataset(s, _source(synth["msvd"], "msvd"), WORDS)

    def order(loader) -> list[int]:
        out = []
        for b in loader:
            _check_frames(b, len(b["caption_index"]))
            out += b["caption_index"].tolist()
        return out

    loader = build_loader(ds, batch_size=8, shuffle=True, seed=3, workers=2)
    assert loader.persistent_workers and loader.num_workers == 2
    set_epoch(loader, 0)
    first = order(loader)
    assert sorted(first) == list(range(len(ds))) and first != list(range(len(ds)))
    set_epoch(loader, 1)
    assert order(loader) != first
    set_epoch(loader, 0)
    assert order(loader) == first  # the order depends only on (seed, epoch): resumable
    other = build_loader(ds, batch_size=8, shuffle=True, seed=3, workers=0)
    set_epoch(other, 0)
    assert order(other) == first
    plain = build_loader(ds, batch_size=8, shuffle=False, seed=3, workers=0, drop_last=True)
    assert order(plain) == list(range(len(ds) // 8 * 8))


class _RandomDraws(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict:
        return {"np": int(np.random.randint(0, 2**31 - 1)), "py": random.random()}


def test_workers_are_seeded_differently_and_reproducibly() -> None:
    def draws() -> list[tuple]:
        loader = build_loader(_RandomDraws(), batch_size=1, shuffle=False, seed=5, workers=2)
        return [(int(b["np"]), float(b["py"])) for b in loader]

    a, b = draws(), draws()
    assert a == b
    assert a[0] != a[1]  # items 0 and 1 come from different workers


def test_msvd_every_caption_maps_to_its_own_video(tmp_path: Path) -> None:
    counts = {"a1_0_1": 1, "bb_2_3": 5, "c-c_4_5": 1, "dd_6_7": 5, "e_e_8_9": 5, "ff_1_2": 1, "gg_3_4": 3}
    raw = {vid: [["video", vid, "says", f"caption{j}"] for j in range(n)] for vid, n in counts.items()}
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps(raw))
    order = ["dd_6_7", "a1_0_1", "c-c_4_5", "bb_2_3", "ff_1_2", "gg_3_4", "e_e_8_9"]
    for split in ("train", "val", "test"):
        (tmp_path / f"{split}_list.txt").write_text("\n".join(order) + "\n")
    s = load_split("msvd", tmp_path, "test")
    assert s.video_ids == order and s.num_captions == sum(counts.values()) and s.multi_caption
    for cap, v in zip(s.captions, s.caption_video):
        assert cap.split()[1] == s.video_ids[v], cap
    groups = s.video_captions()
    assert [len(g) for g in groups] == [counts[v] for v in order]
    bb = groups[order.index("bb_2_3")]
    assert [s.captions[i].split()[3] for i in bb] == [f"caption{j}" for j in range(5)]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "fmt, split, expected",
    [
        ("msrvtt", "train", "MSRVTT_data.json"),
        ("msrvtt", "test", "MSRVTT_JSFUSION_test.csv"),
        ("msvd", "train", "train_list.txt"),
        ("lsmdc", "test", "LSMDC16_challenge_1000_publictect.csv"),
        ("activitynet", "train", "train.json"),
        ("didemo", "test", "test_data.json"),
    ],
)
def test_missing_file_names_file_and_folder(tmp_path: Path, fmt: str, split: str, expected: str) -> None:
    with pytest.raises(FileNotFoundError) as e:
        load_split(fmt, tmp_path, split)
    assert expected in str(e.value) and str(tmp_path) in str(e.value)


def test_bad_annotations_raise_clear_errors(synth, tmp_path: Path) -> None:
    # MSVD: list id without captions, duplicate id, empty caption
    msvd = tmp_path / "msvd"
    shutil.copytree(synth["msvd"] / "annotations", msvd)
    good = (msvd / "test_list.txt").read_text()
    _write(msvd / "test_list.txt", good + "ghost_1_2\n")
    with pytest.raises(ValueError, match=r"test_list\.txt.*'ghost_1_2'.*no annotation.*raw-captions\.pkl"):
        load_split("msvd", msvd, "test")
    first = good.split()[0]
    _write(msvd / "test_list.txt", good + first + "\n")
    with pytest.raises(ValueError, match=rf"test_list\.txt.*duplicate video id '{first}'"):
        load_split("msvd", msvd, "test")
    _write(msvd / "test_list.txt", good)
    raw = pickle.loads((msvd / "raw-captions.pkl").read_bytes())
    raw[first][0] = ["", "  "]
    (msvd / "raw-captions.pkl").write_bytes(pickle.dumps(raw))
    with pytest.raises(ValueError, match=rf"raw-captions\.pkl.*video '{first}' caption 0.*empty"):
        load_split("msvd", msvd, "test")

    # MSR-VTT: empty sentence names its record; 9k id without sentences
    msrvtt = tmp_path / "msrvtt"
    shutil.copytree(synth["msrvtt"] / "annotations", msrvtt)
    data = json.loads((msrvtt / "MSRVTT_data.json").read_text())
    data["sentences"][3]["caption"] = " \t "
    _write(msrvtt / "MSRVTT_data.json", json.dumps(data))
    with pytest.raises(ValueError, match=r"MSRVTT_data\.json.*sentences\[3\].*sen_id 3.*empty"):
        load_split("msrvtt", msrvtt, "train")
    shutil.copy(synth["msrvtt"] / "annotations" / "MSRVTT_data.json", msrvtt)
    _write(msrvtt / "MSRVTT_train.9k.csv", (msrvtt / "MSRVTT_train.9k.csv").read_text() + "video999\n")
    with pytest.raises(ValueError, match=r"MSRVTT_train\.9k\.csv.*'video999'.*no annotation"):
        load_split("msrvtt", msrvtt, "train")
    _write(
        msrvtt / "MSRVTT_JSFUSION_test.csv",
        "key,vid_key,video_id,sentence\nret0,msr1,video1,a cat\nret1,msr1,video1,a dog\n",
    )
    with pytest.raises(ValueError, match="duplicate video id 'video1'"):
        load_split("msrvtt", msrvtt, "test")

    # LSMDC: short row (a repeated clip id is not an error: test_lsmdc_repeated_clip_ids_...)
    lsmdc = tmp_path / "lsmdc"
    shutil.copytree(synth["lsmdc"] / "annotations", lsmdc)
    _write(lsmdc / "LSMDC16_annos_val.csv", "0001_X_00.00.01.000-00.00.02.000\t00.00.01.000\n")
    with pytest.raises(ValueError, match="line 1: expected 6 tab-separated fields"):
        load_split("lsmdc", lsmdc, "val")

    # ActivityNet: id list entry without annotation; empty paragraph
    anet = tmp_path / "anet"
    shutil.copytree(synth["activitynet"] / "annotations", anet)
    ids = json.loads((anet / "val_ids.json").read_text())
    _write(anet / "val_ids.json", json.dumps(ids + ["v_missing"]))
    with pytest.raises(ValueError, match=r"val_ids\.json.*'v_missing'.*val_1\.json"):
        load_split("activitynet", anet, "test")
    _write(anet / "val_ids.json", json.dumps(ids))
    val = json.loads((anet / "val_1.json").read_text())
    val[ids[1]]["sentences"] = [" ", ""]
    _write(anet / "val_1.json", json.dumps(val))
    with pytest.raises(ValueError, match=rf"val_1\.json.*'{ids[1]}'.*empty"):
        load_split("activitynet", anet, "test")

    # DiDeMo: list entry without records
    didemo = tmp_path / "didemo"
    shutil.copytree(synth["didemo"] / "annotations", didemo)
    _write(didemo / "test_list.txt", (didemo / "test_list.txt").read_text() + "1@N00_1_abc.mov\n")
    with pytest.raises(ValueError, match=r"test_list\.txt.*'1@N00_1_abc'.*test_data\.json"):
        load_split("didemo", didemo, "test")


def test_lsmdc_quotes_are_kept_verbatim(tmp_path: Path) -> None:
    rows = [
        "0001_A_00.00.01.000-00.00.02.000\t00.00.01.000\t00.00.02.000\t00.00.01.000\t00.00.02.000\t"
        '"SOMEONE runs.\n',
        "0001_A_00.00.03.000-00.00.04.000\t00.00.03.000\t00.00.04.000\t00.00.03.000\t00.00.04.000\t"
        'He says "stop" and, quietly, leaves.\n',
    ]
    _write(tmp_path / "LSMDC16_annos_val.csv", "".join(rows))
    s = load_split("lsmdc", tmp_path, "val")
    assert s.captions == ['"SOMEONE runs.', 'He says "stop" and, quietly, leaves.']
    assert s.caption_video == [0, 1] and not s.multi_caption


def _lsmdc_row(clip_id: str, sentence: str) -> str:
    times = "\t".join(["00.00.01.000", "00.00.02.000", "00.00.01.000", "00.00.02.000"])
    return f"{clip_id}\t{times}\t{sentence}\n"


def test_lsmdc_repeated_clip_ids_are_extra_captions_and_reference_skips(tmp_path: Path, caplog) -> None:
    """LSMDC's training/val csvs repeat clip ids; the reference keeps each repeat as one more caption."""
    a, b = "0001_A_00.00.01.000-00.00.02.000", "0001_A_00.00.05.000-00.00.07.000"
    c = "0002_B_01.00.00.000-01.00.02.000"
    skip = "0017_Pianist_00.23.28.872-00.23.34.843"  # one of the reference's three skipped clips
    rows = [_lsmdc_row(a, "SOMEONE runs."), _lsmdc_row(b, "He sits."), _lsmdc_row(skip, "SOMEONE plays."),
            _lsmdc_row(a, "SOMEONE runs away."), _lsmdc_row(c, "A car."), _lsmdc_row(skip, "again"),
            _lsmdc_row(a, "Third caption of a.")]
    _write(tmp_path / "LSMDC16_annos_val.csv", "".join(rows))
    with caplog.at_level(logging.INFO, logger="emcl.data"):
        s = load_split("lsmdc", tmp_path, "val")
    assert s.video_ids == [a, b, c]  # first appearance, skipped clip gone
    # captions in file order, repeats point at their clip
    assert s.captions == ["SOMEONE runs.", "He sits.", "SOMEONE runs away.", "A car.", "Third caption of a."]
    assert s.caption_video == [0, 1, 0, 2, 0]
    assert s.multi_caption and s.video_captions() == [[0, 2, 4], [1], [3]]
    text = caplog.text
    assert "2 line(s) repeat an earlier clip id" in text and "3 clips, 5 captions" in text
    assert "skipped 2 line(s) of 1 clip(s) the reference skips" in text and skip in text
    # the datasets built on it: one training item per caption, one evaluation item per clip
    assert len(TextDataset(s, max_words=16)) == 5


def test_retrieval_split_checks_indices() -> None:
    with pytest.raises(ValueError, match="outside"):
        RetrievalSplit("msvd", "test", ["a"], ["x", "y"], [0, 1])
    with pytest.raises(ValueError, match="caption_video"):
        RetrievalSplit("msvd", "test", ["a"], ["x", "y"], [0])


def test_bad_video_raises_or_is_skipped(synth, tmp_path: Path, caplog) -> None:
    root = synth["msrvtt"]
    videos = tmp_path / "videos"
    shutil.copytree(root / "videos", videos)
    s = load_split("msrvtt", root / "annotations", "test", msrvtt_test="full")
    bad = s.video_ids[1]
    data = (videos / f"{bad}.mp4").read_bytes()
    (videos / f"{bad}.mp4").write_bytes(data[: len(data) // 2])
    source = _source(root, "msrvtt", videos)
    bad_caption = s.caption_video.index(1)

    with pytest.raises(VideoError, match=f"{bad}"):
        TrainDataset(s, source, WORDS)[bad_caption]
    with pytest.raises(VideoError, match=f"{bad}"):
        VideoDataset(s, source)[1]

    train = TrainDataset(s, source, WORDS, skip_bad_videos=True)
    with caplog.at_level(logging.WARNING, logger="emcl.data"):
        item = train[bad_caption]
    assert isinstance(item, Skipped) and not item and item.video_id == bad
    assert any(bad in r.getMessage() and r.name == "emcl.data" for r in caplog.records)
    batch = collate_skip([train[0], item, train[2]])
    assert batch["num_skipped"] == 1 and batch["skipped_ids"] == [bad]
    assert batch["frames"].shape[0] == 2 and batch["caption_index"].tolist() == [0, 2]
    empty = {"empty": True, "num_skipped": 2, "skipped_ids": [bad], "batch_size": 0}
    assert collate_skip([item, None]) == empty

    loader = build_loader(train, batch_size=len(train), shuffle=False, seed=0, workers=0)
    batch = next(iter(loader))
    assert batch["num_skipped"] == 5 and batch["skipped_ids"] == [bad] * 5  # the bad video has 5 captions
    assert batch["frames"].shape[0] == len(train) - 5

    vids = next(
        iter(
            build_loader(
                VideoDataset(s, source, skip_bad_videos=True), batch_size=2, shuffle=False, seed=0, workers=0
            )
        )
    )
    assert vids["valid"].tolist() == [True, False]
    assert (vids["frames"][1] == 0).all() and (vids["frame_mask"][1] == 0).all()
    assert vids["frames"][0].float().std() > 10


def test_augment_touches_only_real_frames(synth) -> None:
    s = load_split("lsmdc", synth["lsmdc"] / "annotations", "test")

    class Padded:
        max_frames, size = FRAMES + 4, SIZE

        def __init__(self) -> None:
            self.inner = _source(synth["lsmdc"], "lsmdc")

        def load(self, video_id, start=None, end=None):
            f, m = self.inner.load(video_id, start, end)
            pad = torch.zeros(4, *f.shape[1:], dtype=f.dtype)
            return torch.cat([f, pad]), torch.cat([m, torch.zeros(4, dtype=m.dtype)])

    seen = []

    def invert(frames: torch.Tensor) -> torch.Tensor:
        seen.append(frames.shape[0])
        return 255 - frames

    plain = TrainDataset(s, Padded(), WORDS)[0]
    aug = TrainDataset(s, Padded(), WORDS, augment=invert)[0]
    assert seen == [FRAMES]
    assert torch.equal(aug["frames"][:FRAMES], 255 - plain["frames"][:FRAMES])
    assert (aug["frames"][FRAMES:] == 0).all()


def test_distributed_sampler_when_process_group_is_up(tmp_path: Path) -> None:
    import torch.distributed as dist
    from torch.utils.data import DistributedSampler

    ds = _RandomDraws()
    with pytest.raises(RuntimeError, match="initialised"):
        build_loader(ds, batch_size=2, shuffle=True, seed=0, workers=0, distributed=True)
    if dist.is_initialized():
        pytest.skip("a process group is already up in this session")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        loader = build_loader(ds, batch_size=2, shuffle=True, seed=4, workers=0)
        assert isinstance(loader.sampler, DistributedSampler) and loader.sampler.seed == 4
        set_epoch(loader, 3)
        assert loader.sampler.epoch == 3
        assert len(list(loader)) == 2
        local = build_loader(ds, batch_size=2, shuffle=False, seed=4, workers=0, distributed=False)
        assert not isinstance(local.sampler, DistributedSampler)
    finally:
        dist.destroy_process_group()


def test_augmentation_is_keyed_by_seed_epoch_and_index(tmp_path):
    """With epoch keys a sample's augmentation depends on (seed, epoch, index) alone, not on the workers."""
    from emcl.data.augment import ClipRandAugment
    from emcl.data.datasets import TrainDataset, load_split
    from emcl.data.loader import build_loader, set_epoch
    from emcl.data.sources import VideoSource
    from emcl.data.synthetic import make_synthetic

    anno = make_synthetic(
        tmp_path / "syn", 8, seed=4, format="msrvtt", split_sizes=(6, 0, 2), frames=8, fps=4, size=32
    )
    split = load_split("msrvtt", anno, "train")
    source = VideoSource(tmp_path / "syn" / "videos", framerate=4, max_frames=4, size=32)
    ds = TrainDataset(split, source, 16, augment=ClipRandAugment(), seed=7)
    assert torch.equal(ds[(1, 3)]["frames"], ds[(1, 3)]["frames"])
    assert not torch.equal(ds[(1, 3)]["frames"], ds[(2, 3)]["frames"])

    def epoch_frames(workers: int, epoch: int) -> dict[int, torch.Tensor]:
        loader = build_loader(ds, batch_size=4, shuffle=True, seed=0, workers=workers, epoch_keys=True)
        set_epoch(loader, epoch)
        return {int(i): f for b in loader for i, f in zip(b["caption_index"], b["frames"])}

    a, b = epoch_frames(0, 1), epoch_frames(2, 1)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
