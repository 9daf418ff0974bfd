"""Worker processes start without fork (emcl.data.workers): a loader created after the parent decoded video
must not hang (PyAV 19 deadlocks in a forked child), and the choice is made in one place."""

from __future__ import annotations

import pytest
import torch

from emcl.data.datasets import TrainDataset, load_split
from emcl.data.loader import build_loader
from emcl.data.sources import VideoSource
from emcl.data.synthetic import make_synthetic
from emcl.data.workers import START_ENV, loader_context, start_method, worker_context
from emcl.errors import UserValueError


def test_default_is_forkserver_and_the_variable_overrides(monkeypatch) -> None:
    monkeypatch.delenv(START_ENV, raising=False)
    assert start_method() == "forkserver"  # Linux
    assert worker_context().get_start_method() == "forkserver"
    assert loader_context(0) is None and loader_context(2).get_start_method() == "forkserver"
    monkeypatch.setenv(START_ENV, "spawn")
    assert worker_context().get_start_method() == "spawn"
    monkeypatch.setenv(START_ENV, "vfork")
    with pytest.raises(UserValueError, match=f"{START_ENV}='vfork'.*forkserver"):
        start_method()


def test_loader_after_decoding_in_the_parent(tmp_path, monkeypatch) -> None:
    """The parent decodes first (its decoder threads now exist), then two workers decode again: with
    fork this is the PyAV 19 deadlock; here the workers come from the fork server."""
    monkeypatch.delenv(START_ENV, raising=False)
    root = make_synthetic(tmp_path / "msvd", 6, seed=1, format="msvd", frames=8, fps=4, size=32).parent
    split = load_split("msvd", root / "annotations", "train")
    source = VideoSource(str(root / "videos"), framerate=4, max_frames=4, size=32, any_extension=True)
    parent_frames, _ = source.load(split.video_ids[split.caption_video[0]])
    ds = TrainDataset(split, source, 16)
    loader = build_loader(ds, batch_size=2, shuffle=False, seed=0, workers=2)
    assert loader.multiprocessing_context.get_start_method() == "forkserver"
    batches = list(loader)
    assert sum(len(b["caption_index"]) for b in batches) == len(ds)
    assert torch.equal(batches[0]["frames"][0], parent_frames)
