"""Optimiser groups, the reference's Adam, schedules, atomic writes, strict JSON and config parsing."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from torch import nn

from emcl.fileio import nonfinite_paths, save_json, save_torch
from emcl.train.checkpoint import load_checkpoint
from emcl.train.config import parse_args
from emcl.train.optim import ReferenceAdam, param_groups, warmup_cosine


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.clip = nn.Module()
        self.clip.proj = nn.Linear(4, 4)
        self.clip.ln_1 = nn.LayerNorm(4)
        self.clip.logit_scale = nn.Parameter(torch.tensor(1.0))
        self.head = nn.Linear(4, 2)


def names(model, groups):
    lookup = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: sorted(lookup[id(p)] for p in g["params"]) for g in groups}


def test_param_groups_ours_and_faithful():
    m = Tiny()
    ours = param_groups(m, lr=1e-4, coef_lr=1e-3, weight_decay=0.2)
    got = names(m, ours)
    assert got["backbone_decay"] == ["clip.proj.weight"]
    assert got["backbone_no_decay"] == [
        "clip.ln_1.bias",
        "clip.ln_1.weight",
        "clip.logit_scale",
        "clip.proj.bias",
    ]
    assert got["new_decay"] == ["head.weight"] and got["new_no_decay"] == ["head.bias"]
    lrs = {g["name"]: g["lr"] for g in ours}
    assert lrs["backbone_decay"] == pytest.approx(1e-7) and lrs["new_decay"] == 1e-4
    ref = names(m, param_groups(m, lr=1e-4, coef_lr=1e-3, weight_decay=0.2, faithful=True))
    # the reference's name rule decays CLIP's ln_* weights and logit_scale
    assert ref["backbone_decay"] == ["clip.ln_1.weight", "clip.logit_scale", "clip.proj.weight"]


def test_reference_adam_has_no_bias_correction():
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = ReferenceAdam([p], lr=0.1, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    g = torch.tensor([0.5, 0.25])
    m = torch.zeros(2)
    v = torch.zeros(2)
    want = p.detach().clone()
    for _ in range(2):
        p.grad = g.clone()
        opt.step()
        m = 0.9 * m + 0.1 * g
        v = 0.98 * v + 0.02 * g * g
        want = want - 0.1 * (m / (v.sqrt() + 1e-6) + 0.2 * want)
    assert torch.allclose(p.detach(), want, atol=1e-6)


def test_warmup_cosine():
    f = warmup_cosine(100, warmup=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    ref = warmup_cosine(100, warmup=0.1, faithful=True)
    assert ref(5) == pytest.approx(0.5) and ref(10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.1)))


def test_atomic_writes(tmp_path):
    path = save_torch({"a": torch.ones(2)}, tmp_path / "ck.pt")
    assert torch.equal(load_checkpoint(path)["a"], torch.ones(2))
    save_json({"x": 1}, tmp_path / "m.json")
    with pytest.raises(TypeError):
        save_json({"x": object()}, tmp_path / "m.json")
    assert (tmp_path / "m.json").read_text().strip() == '{\n  "x": 1\n}'  # the old file survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt", "m.json"]  # no temp files left
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        load_checkpoint(tmp_path / "nothere.pt")


def test_save_json_is_strict_and_names_the_key(tmp_path):
    obj = {"train": {"history": [{"loss": 1.0}, {"loss": float("nan")}]}, "x": [float("-inf")]}
    assert nonfinite_paths(obj) == ["train.history[1].loss=nan", "x[0]=-inf"]
    with pytest.raises(ValueError, match=r"metrics.json.*train.history\[1\].loss=nan, x\[0\]=-inf"):
        save_json(obj, tmp_path / "metrics.json")
    assert not (tmp_path / "metrics.json").exists() and list(tmp_path.iterdir()) == []
    save_json({"a": 1.0, "b": [1, "x"]}, tmp_path / "ok.json")
    assert json.loads((tmp_path / "ok.json").read_text()) == {"a": 1.0, "b": [1, "x"]}


def test_config_file_and_flags(tmp_path):
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=5)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 0.5\nepochs: 3\nclip_config: {embed_dim: 8}\n")
    args = parse_args(parser, ["--config", str(cfg), "--epochs", "7"], extra_keys=["clip_config"])
    assert args.lr == 0.5 and args.epochs == 7 and args.clip_config == {"embed_dim": 8}
    cfg.write_text("lr: 0.5\nlearning_rate: 3\n")
    with pytest.raises(ValueError, match="learning_rate"):
        parse_args(parser, ["--config", str(cfg)])
