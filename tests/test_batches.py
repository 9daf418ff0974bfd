"""emcl.batches: device copies of batch dicts and padding of a short last batch."""

from __future__ import annotations

import pytest
import torch

from emcl.batches import pad_rows, prefetch_to_device, to_device


def _batch(n: int) -> dict:
    return {
        "frames": torch.arange(n * 6, dtype=torch.uint8).reshape(n, 2, 3),
        "frame_mask": torch.ones(n, 2, dtype=torch.long),
        "video_index": torch.arange(n),
        "skipped_ids": [],
        "num_skipped": 0,
    }


def test_pad_rows_repeats_the_last_row_and_reports_the_real_rows():
    b = _batch(3)
    padded, n = pad_rows(b, 5)
    assert (
        n == 3 and padded["frames"].shape == (5, 2, 3) and padded["video_index"].tolist() == [0, 1, 2, 2, 2]
    )
    assert torch.equal(padded["frames"][:3], b["frames"]) and torch.equal(padded["frames"][4], b["frames"][2])
    assert padded["skipped_ids"] == [] and padded["num_skipped"] == 0
    same, n = pad_rows(b, 3)
    assert same is b and n == 3
    with pytest.raises(ValueError, match="more than size"):
        pad_rows(b, 2)
    with pytest.raises(ValueError, match="disagree"):
        pad_rows({"a": torch.zeros(2), "b": torch.zeros(3)}, 4)


def test_to_device_and_prefetch_keep_every_batch_in_order():
    batches = [_batch(2), _batch(1)]
    out = list(prefetch_to_device(batches, "cpu"))
    assert len(out) == 2
    for a, b in zip(out, batches):
        assert a.keys() == b.keys()
        assert torch.equal(a["frames"], b["frames"]) and a["skipped_ids"] == b["skipped_ids"]
    nested = to_device({"x": [torch.ones(1), "id"], "y": (torch.zeros(1),)}, torch.device("cpu"))
    assert nested["x"][1] == "id" and torch.equal(nested["y"][0], torch.zeros(1))
