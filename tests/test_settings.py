"""A checkpoint's settings against the current ones (emcl.train.settings), weights that do not fit."""

from __future__ import annotations

import logging

import pytest
import torch

from emcl.errors import UserError
from emcl.train.settings import check_settings, setting_diffs, state_dict_mismatch


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


def test_state_dict_mismatch_is_one_line():
    model = {"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(1)}
    assert state_dict_mismatch(model, dict(model)) == ""
    loaded = {"a": torch.zeros(2, 4), "b": torch.zeros(4), "d": torch.zeros(1)}
    assert state_dict_mismatch(model, loaded) == (
        "1 tensor(s) of another shape: a: (2, 4) in the file, (2, 3) in the model; 1 missing: c; "
        "1 unexpected: d"
    )
    many = {f"k{i}": torch.zeros(1) for i in range(7)}
    assert state_dict_mismatch({}, many, limit=2) == "7 unexpected: k0, k1 (and 5 more)"
