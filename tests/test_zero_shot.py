"""Zero-shot CLIP: pretrained weights (a fabricated OpenAI release archive) evaluated with no fine-tuning,
labelled zero-shot, frames mean-pooled whatever head the config names; checked against a plain
re-implementation of CLIP's zero-shot retrieval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from emcl.clip import load_clip, normalize_frames, tokenize
from emcl.data.annotations import load_split
from emcl.data.sources import VideoSource
from emcl.data.synthetic import make_synthetic
from emcl.errors import UserError
from emcl.metrics import evaluate_similarity
from video_retrieval.emcl_net.main_task_retrieval import main

from ._clip_files import tiny_openai_clip, write_openai_archive

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def zero_shot(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("zero_shot")
    data = root / "data"
    make_synthetic(data, 12, seed=4, format="msvd", split_sizes=(4, 2, 6), frames=8, fps=4, size=32)
    clip = write_openai_archive(tiny_openai_clip(seed=3), root / "ViT-tiny.pt")
    cfg = yaml.safe_load((ROOT / "configs/synthetic.yaml").read_text())
    for key in ("clip_config", "synthetic", "do_train"):
        cfg.pop(key)
    config = root / "zero_shot.yaml"
    config.write_text(yaml.safe_dump(cfg))
    flags = ["--config", str(config), "--clip_path", str(clip), "--anno_path", str(data / "annotations"),
             "--video_path", str(data / "videos"), "--workers", "0", "--batch_size_val", "4",
             "--device", "cpu"]
    return {"root": root, "data": data, "clip": clip, "config": config, "flags": flags}


def test_zero_shot_evaluation_is_labelled_and_is_clip_mean_pooling(zero_shot):
    out = zero_shot["root"] / "eval"
    metrics = main([*zero_shot["flags"], "--do_eval", "1", "--output_dir", str(out)])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["zero_shot"] is True and "init_model" not in saved and "train" not in saved
    assert "zero-shot" in (out / "train.log").read_text()
    assert yaml.safe_load((out / "config.yaml").read_text())["agg_module"] == "meanP"  # config said seqTransf
    # policy none is CLIP's zero-shot retrieval: cosine of the caption and the mean of the normalised frames
    clip = load_clip(zero_shot["clip"]).eval()
    split = load_split("msvd", str(zero_shot["data"] / "annotations"), "test")
    source = VideoSource(str(zero_shot["data"] / "videos"), framerate=2, max_frames=4, size=32,
                         any_extension=True)
    with torch.no_grad():
        ids, mask = tokenize(split.captions, 24)
        t = torch.nn.functional.normalize(clip.encode_text(ids, mask).float(), dim=-1)
        videos = []
        for vid in split.video_ids:
            frames, fmask = source.load(vid)
            f = clip.encode_frames(normalize_frames(frames[None], torch.float32, mask=fmask[None]))[0].float()
            f = torch.nn.functional.normalize(f, dim=-1) * fmask[:, None]
            videos.append(f.sum(0) / fmask.sum())
        v = torch.nn.functional.normalize(torch.stack(videos), dim=-1)
    want = evaluate_similarity(t @ v.T, torch.tensor(split.caption_video))
    for direction in ("t2v", "v2t"):
        for key, value in want[direction].items():
            assert metrics["test"]["policies"]["none"][direction][key] == pytest.approx(value, abs=1e-4)


def test_zero_shot_refuses_an_untrained_clip(zero_shot):
    flags = [f if f != str(zero_shot["config"]) else str(ROOT / "configs/synthetic.yaml")
             for f in zero_shot["flags"]]
    with pytest.raises(UserError, match="zero-shot .* needs pretrained CLIP weights"):
        main([*flags, "--do_eval", "1", "--output_dir", str(zero_shot["root"] / "untrained")])
