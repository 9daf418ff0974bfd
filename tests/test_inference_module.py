"""EMCL as an inference module: CLIP2Video checkpoints in the released layout, the blocked EMCL scores
against an independent float64 implementation, the embedding-file CLI, JPEG frame folders."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from emcl.data.frames import FrameFolderSource, frame_folder_indices
from emcl.data.video import VideoError
from emcl.em import EMCL
from emcl.errors import UserError
from emcl.scoring import pooled_emcl_scores, score_matrix
from tests._video_fixtures import REPO, load_script, write_video
from video_retrieval.inference_module import main_task_inference as inference
from video_retrieval.inference_module.clip2video import load_clip2video

# ------------------------------------------------------------------ a tiny CLIP2Video checkpoint
D = 32  # embed dim == text width, as ViT-B/32's 512
VW, PATCH, IMG, CTX, VOCAB = 32, 16, 32, 77, 49408


def _block(prefix: str, w: int) -> dict[str, tuple[int, ...]]:
    """One CLIP residual attention block, OpenAI key names."""
    return {
        f"{prefix}.attn.in_proj_weight": (3 * w, w),
        f"{prefix}.attn.in_proj_bias": (3 * w,),
        f"{prefix}.attn.out_proj.weight": (w, w),
        f"{prefix}.attn.out_proj.bias": (w,),
        f"{prefix}.ln_1.weight": (w,),
        f"{prefix}.ln_1.bias": (w,),
        f"{prefix}.mlp.c_fc.weight": (4 * w, w),
        f"{prefix}.mlp.c_fc.bias": (4 * w,),
        f"{prefix}.mlp.c_proj.weight": (w, 4 * w),
        f"{prefix}.mlp.c_proj.bias": (w,),
        f"{prefix}.ln_2.weight": (w,),
        f"{prefix}.ln_2.bias": (w,),
    }


def released_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of a CLIP2Video ``pytorch_model.bin.N`` (written out from the reference's modules:
    ``clip.*`` is OpenAI's CLIP, the rest are CLIP2Video's TDB / temporal transformer / TAB)."""
    grid = IMG // PATCH
    keys = {
        "clip.positional_embedding": (CTX, D),
        "clip.text_projection": (D, D),
        "clip.logit_scale": (),
        "clip.visual.class_embedding": (VW,),
        "clip.visual.positional_embedding": (grid * grid + 1, VW),
        "clip.visual.proj": (VW, D),
        "clip.visual.conv1.weight": (VW, 3, PATCH, PATCH),
        "clip.visual.ln_pre.weight": (VW,),
        "clip.visual.ln_pre.bias": (VW,),
        "clip.visual.ln_post.weight": (VW,),
        "clip.visual.ln_post.bias": (VW,),
        "clip.token_embedding.weight": (VOCAB, D),
        "clip.ln_final.weight": (D,),
        "clip.ln_final.bias": (D,),
        **_block("clip.visual.transformer.resblocks.0", VW),
        **_block("clip.transformer.resblocks.0", D),
        "frame_position_embeddings.weight": (CTX, D),
        "type_position_embeddings.weight": (2, D),
        **_block("frame2t_attention.resblocks.0", D),
        **{k: v for i in range(4) for k, v in _block(f"transformerClip.resblocks.{i}", D).items()},
        "trans_layernorm.weight": (D,),
        "trans_layernorm.bias": (D,),
        **_block("actionClip.resblocks.0", D),
        "weight_center": (5, D),
        "emb_center": (5, D),
    }
    return keys


def fabricate_checkpoint(path: Path, seed: int = 0, drop: str | None = None, add: str | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in released_layout().items():
        if key.endswith(
            (
                "ln_1.weight",
                "ln_2.weight",
                "ln_pre.weight",
                "ln_post.weight",
                "ln_final.weight",
                "trans_layernorm.weight",
            )
        ):
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif key == "clip.logit_scale":
            state[key] = torch.tensor(math.log(100.0))
        else:
            state[key] = 0.2 * torch.randn(shape, generator=g)
    for key in ("clip.visual.conv1.weight", "clip.visual.proj", "clip.text_projection"):
        state[key] = state[key].half()  # the reference saves CLIP converted to fp16
    if drop:
        del state[drop]
    if add:
        state[add] = torch.zeros(D)
    torch.save(state, path)
    return state


def write_msrvtt_1k(anno: Path, frames: Path, n: int = 6, rng_seed: int = 0) -> list[str]:
    """MSR-VTT 1k-A test csv and one JPEG folder per video (7 to 40 frames of 40x30 pixels)."""
    anno.mkdir(parents=True, exist_ok=True)
    ids = [f"video{7010 + i}" for i in range(n)]
    words = [
        "a dog runs",
        "a man cooks food",
        "two cars race",
        "a girl sings",
        "people dance",
        "a cat sleeps",
        "a band plays music",
        "kids play football",
    ]
    lines = ["key,vid_key,video_id,sentence"]
    lines += [f"ret{i},msr{7010 + i},{v},{words[i % len(words)]}" for i, v in enumerate(ids)]
    (anno / "MSRVTT_JSFUSION_test.csv").write_text("\n".join(lines) + "\n")
    rng = np.random.default_rng(rng_seed)
    for i, v in enumerate(ids):
        folder = frames / v
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(7 + 6 * i):
            img = rng.integers(0, 255, size=(30, 40, 3), dtype=np.uint8)
            Image.fromarray(img).save(folder / f"{k + 1:08d}.jpg", quality=95)
    return ids


@pytest.fixture(scope="module")
def clip2video_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip2video")
    ck = root / "ckpt"
    ck.mkdir()
    state = fabricate_checkpoint(ck / "pytorch_model.bin.2")
    ids = write_msrvtt_1k(root / "anno", root / "frames")
    return root, state, ids


def _c2v_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--checkpoint",
        str(root / "ckpt"),
        "--model_num",
        "2",
        "--anno_path",
        str(root / "anno"),
        "--frame_path",
        str(root / "frames"),
        "--output_dir",
        str(out),
        "--device",
        "cpu",
        "--workers",
        "0",
        "--batch_size_val",
        "4",
        "--eval_block_size",
        "4",
        *extra,
    ]


def test_clip2video_checkpoint_loads_and_evaluates(clip2video_case, tmp_path):
    root, state, ids = clip2video_case
    model = load_clip2video(root / "ckpt" / "pytorch_model.bin.2")
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key in ("transformerClip.resblocks.3.mlp.c_fc.weight", "clip.visual.proj", "emb_center"):
        assert torch.equal(loaded[key], state[key].float())
    result = inference.main(_c2v_args(root, tmp_path / "out", "--save_embeddings", "1"))
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for part in ("without_emcl", "with_emcl"):
        for d in ("t2v", "v2t", "t2v_dsl", "v2t_dsl"):
            assert set(saved[part][d]) >= {"R1", "R5", "R10", "MdR", "MnR"}
    assert saved["num_texts"] == saved["num_videos"] == len(ids)
    assert saved["settings"]["mu_signs"] == "++++--+" and saved["settings"]["block"] == 4
    t = np.load(tmp_path / "out" / "text_emb.npy")
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    # the same scores from the saved embeddings (main + TAB fused 0.5 / 0.5) through the file path
    out = tmp_path / "files"
    again = inference.main(
        [
            "--text_emb",
            str(tmp_path / "out" / "text_emb.npy"),
            "--video_emb",
            str(tmp_path / "out" / "video_emb.npy"),
            "--tab_text_emb",
            str(tmp_path / "out" / "tab_text_emb.npy"),
            "--tab_video_emb",
            str(tmp_path / "out" / "tab_video_emb.npy"),
            "--eval_block_size",
            "4",
            "--normalize",
            "0",
            "--output_dir",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert again["with_emcl"] == result["with_emcl"] and again["without_emcl"] == result["without_emcl"]


def test_clip2video_video_vector_matches_step_by_step(clip2video_case):
    """TDB interleaving, positions and masks, token by token, for one clip of 5 frames (2 padded)."""
    root, _, _ = clip2video_case
    model = load_clip2video(root / "ckpt" / "pytorch_model.bin.2").double().eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 5, D, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    pos, typ = model.frame_position_embeddings.weight, model.type_position_embeddings.weight
    # difference-level attention: d_i = x_{i+1} - x_i at position i+1, keys masked by mask_{i+1}
    diffs = torch.stack([x[0, i + 1] - x[0, i] + pos[i + 1] for i in range(4)])[None]
    diffs = model.frame2t_attention(diffs, mask[:, 1:])
    diffs = 2 * torch.sigmoid(model.trans_layernorm(diffs)) - 1
    tokens, tmask = [], []
    for i in range(5):
        tokens.append(x[0, i] + pos[i] + typ[1])
        tmask.append(int(mask[0, i]))
        if i < 4:  # difference i sits at position i with mask_i in the main transformer
            tokens.append(diffs[0, i] + pos[i] + typ[0])
            tmask.append(int(mask[0, i]))
    h = model.transformerClip(torch.stack(tokens)[None], torch.tensor([tmask]))
    frames = [h[0, 2 * i] + x[0, i] for i in range(5)]
    frames = [f / f.norm() for f in frames]
    want = sum(frames[i] for i in range(3)) / 3
    want = want / want.norm()
    with torch.no_grad():
        got = model.video_vector(x, mask)[0]
    torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "drop,add",
    [
        ("transformerClip.resblocks.3.ln_2.bias", None),
        ("clip.visual.ln_post.weight", None),
        ("clip.visual.proj", None),
        (None, "transformerClip.resblocks.4.ln_1.weight"),
        (None, "center_bias"),
    ],
)
def test_clip2video_missing_or_unexpected_key_is_named(tmp_path, drop, add):
    path = tmp_path / "pytorch_model.bin.0"
    fabricate_checkpoint(path, drop=drop, add=add)
    with pytest.raises(UserError) as err:
        load_clip2video(path)
    assert repr(drop or add) in str(err.value) and str(path) in str(err.value)
    assert ("missing" if drop else "unexpected") in str(err.value)


def test_clip2video_missing_checkpoint_is_named(clip2video_case, tmp_path, capsys):
    root, _, _ = clip2video_case
    with pytest.raises(SystemExit) as ex:
        from emcl.errors import cli_main

        cli_main(
            inference.main, _c2v_args(root, tmp_path / "o")[:3] + ["7"] + _c2v_args(root, tmp_path / "o")[4:]
        )
    assert ex.value.code == 2
    assert "pytorch_model.bin.7" in capsys.readouterr().err


# ------------------------------------------------------------------ scores: independent float64 EMCL
def reference_scores_f64(
    t: np.ndarray, v: np.ndarray, mu: np.ndarray, block: int, k_iters: int, lamd: float, beta: float
) -> np.ndarray:
    """docs/reference.md, 'EMCL as an inference module', written out in float64: for each (text block,
    video block) EM on [videos; texts]."""
    out = np.zeros((len(t), len(v)))
    for a0 in range(0, len(t), block):
        for b0 in range(0, len(v), block):
            tb, vb = t[a0 : a0 + block], v[b0 : b0 + block]
            x = np.concatenate([vb, tb])  # N x D; the D channels are the data points
            u = np.repeat(mu, len(x), axis=0)  # U0 = 1_N mu
            for _ in range(k_iters):
                logits = x.T @ u / lamd  # D x K
                logits -= logits.max(axis=1, keepdims=True)
                z = np.exp(logits)
                z /= z.sum(axis=1, keepdims=True)
                z = z / (1e-6 + z.sum(axis=0, keepdims=True))
                u = x @ z
                u = u / (1e-6 + np.sqrt((u**2).sum(axis=0, keepdims=True)))
            y = x + beta * (u @ z.T)
            out[a0 : a0 + len(tb), b0 : b0 + len(vb)] = y[len(vb) :] @ y[: len(vb)].T
    return out


def test_upstream_mu_is_the_reference_seed_42_draw():
    torch.manual_seed(42)
    g = torch.Tensor(1, 7).normal_(0, math.sqrt(2.0 / 7))  # the reference's draw, right after seeding
    want = g / (1e-6 + g.norm(dim=0, keepdim=True))
    assert torch.equal(EMCL(k=7, init="upstream", seed=42).mu, want)
    assert "".join("+" if x > 0 else "-" for x in want.flatten().tolist()) == "++++--+"


def test_paper_block_scores_match_float64_reference():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((1000, 512))
    t = v + 1.2 * rng.standard_normal((1000, 512))
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    mu = EMCL(k=7, init="upstream", seed=42).mu
    fn = partial(pooled_emcl_scores, mu=mu, stage_num=10, lamd=0.1, beta=4.0)
    got = score_matrix(
        fn, torch.from_numpy(t).float(), torch.from_numpy(v).float(), None, mode="paper", block=64
    )
    want = reference_scores_f64(t, v, mu.double().numpy(), 64, 10, 0.1, 4.0)
    assert got.dtype == torch.float32 and got.shape == (1000, 1000)
    plain = t @ v.T
    assert np.abs(want - plain).max() > 1e-2  # EMCL does move the scores
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=2e-5)
    # the 40-row remainder block (rows 960..999) and 40-column remainder are covered, and differ from plain
    assert np.abs(want[960:, 960:] - plain[960:, 960:]).max() > 1e-2
    np.testing.assert_allclose(got.numpy()[960:, 960:], want[960:, 960:], rtol=0, atol=2e-5)
    # beta = 0 is exactly no EMCL
    zero = score_matrix(
        partial(pooled_emcl_scores, mu=mu, stage_num=10, lamd=0.1, beta=0.0),
        torch.from_numpy(t).float(),
        torch.from_numpy(v).float(),
        None,
        mode="paper",
        block=64,
    )
    none = score_matrix(
        partial(pooled_emcl_scores, mu=None),
        torch.from_numpy(t).float(),
        torch.from_numpy(v).float(),
        None,
        mode="paper",
        block=64,
    )
    assert torch.equal(zero, none)
    np.testing.assert_allclose(none.numpy(), plain, atol=1e-5)


def test_query_policy_is_independent_of_order():
    # D = 512: with few channels the sharp lambda = 0.1 softmax lets round-off split near-ties
    # (docs/reference.md, 'EMCL as an inference module')
    g = torch.Generator().manual_seed(1)
    t = torch.nn.functional.normalize(torch.randn(20, 512, generator=g), dim=-1)
    v = torch.nn.functional.normalize(torch.randn(130, 512, generator=g), dim=-1)
    fn = partial(
        pooled_emcl_scores, mu=EMCL(k=7, init="upstream", seed=42).mu, stage_num=10, lamd=0.1, beta=4.0
    )
    s = score_matrix(fn, t, v, None, mode="query")
    perm_t, perm_v = torch.randperm(20, generator=g), torch.randperm(130, generator=g)
    s2 = score_matrix(fn, t[perm_t], v[perm_v], None, mode="query")
    torch.testing.assert_close(s2, s[perm_t][:, perm_v], rtol=0, atol=1e-5)


# ------------------------------------------------------------------ the embedding-file CLI
def _pairs(n: int, d: int, seed: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, d)).astype(np.float32)
    return (v + noise * rng.standard_normal((n, d))).astype(np.float32), v


def test_cli_one_to_one_writes_metrics(tmp_path):
    t, v = _pairs(150, 64, 0, 2.5)
    np.save(tmp_path / "T.npy", t)
    np.save(tmp_path / "V.npy", v)
    out = tmp_path / "D"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "video_retrieval.inference_module.main_task_inference",
            "--text_emb",
            str(tmp_path / "T.npy"),
            "--video_emb",
            str(tmp_path / "V.npy"),
            "--output_dir",
            str(out),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "metrics.json").read_text())
    for part in ("without_emcl", "with_emcl"):
        for d in ("t2v", "v2t"):
            assert set(m[part][d]) >= {"R1", "R5", "R10", "MdR", "MnR"}
    assert 0 < m["without_emcl"]["t2v"]["R1"] < 100
    assert m["settings"]["K"] == 7 and m["settings"]["T"] == 10 and m["settings"]["policy"] == "paper"
    assert (out / "inference.log").is_file() and "with EMCL" in (out / "results.md").read_text()
    # the same without EMCL as plain cosine ranking
    tn = t / np.linalg.norm(t, axis=1, keepdims=True)
    vn = v / np.linalg.norm(v, axis=1, keepdims=True)
    sim = tn @ vn.T
    r1 = 100 * float(np.mean(sim.argmax(axis=1) == np.arange(150)))
    assert m["without_emcl"]["t2v"]["R1"] == pytest.approx(r1)


def test_cli_multi_caption_with_mapping_hdf5(tmp_path):
    import h5py

    rng = np.random.default_rng(1)
    v = rng.standard_normal((40, 32)).astype(np.float32)
    caption_video = np.repeat(np.arange(40), 3)
    rng.shuffle(caption_video)
    t = v[caption_video] + 2.0 * rng.standard_normal((120, 32)).astype(np.float32)
    with h5py.File(tmp_path / "emb.h5", "w") as fh:
        fh["text"] = t
        fh["video"] = v
    np.savetxt(tmp_path / "map.txt", caption_video, fmt="%d")
    out = tmp_path / "D"
    res = inference.main(
        [
            "--text_emb",
            f"{tmp_path / 'emb.h5'}:text",
            "--video_emb",
            f"{tmp_path / 'emb.h5'}:video",
            "--caption_video",
            str(tmp_path / "map.txt"),
            "--output_dir",
            str(out),
            "--device",
            "cpu",
        ]
    )
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_texts"] == 120 and m["num_videos"] == 40
    assert m["with_emcl"] == res["with_emcl"]
    # text->video ranks each caption among the 40 videos; video->text ranks the 40 caption groups
    tn = t / np.linalg.norm(t, axis=1, keepdims=True)
    vn = v / np.linalg.norm(v, axis=1, keepdims=True)
    sim = tn @ vn.T
    assert m["without_emcl"]["t2v"]["R1"] == pytest.approx(100 * np.mean(sim.argmax(1) == caption_video))
    group = np.full((40, 40), -np.inf)
    for c, g in enumerate(caption_video):
        group[g] = np.maximum(group[g], sim[c])
    assert m["without_emcl"]["v2t"]["R1"] == pytest.approx(100 * np.mean(group.T.argmax(1) == np.arange(40)))
    with pytest.raises(UserError, match="--caption_video"):
        inference.main(
            [
                "--text_emb",
                f"{tmp_path / 'emb.h5'}:text",
                "--video_emb",
                f"{tmp_path / 'emb.h5'}:video",
                "--output_dir",
                str(tmp_path / "D_bad"),
            ]
        )
    np.savetxt(tmp_path / "bad.txt", np.minimum(caption_video, 38), fmt="%d")
    with pytest.raises(UserError, match="video 39"):
        inference.main(
            [
                "--text_emb",
                f"{tmp_path / 'emb.h5'}:text",
                "--video_emb",
                f"{tmp_path / 'emb.h5'}:video",
                "--caption_video",
                str(tmp_path / "bad.txt"),
                "--output_dir",
                str(tmp_path / "D_bad"),
            ]
        )


def test_cli_per_frame_embeddings_and_sweep(tmp_path):
    rng = np.random.default_rng(2)
    frames = rng.standard_normal((30, 4, 16)).astype(np.float32)
    frames[:5, 3] = 0.0  # padded last frame
    t = frames[:, :3].mean(axis=1) + 1.0 * rng.standard_normal((30, 16)).astype(np.float32)
    np.save(tmp_path / "T.npy", t)
    np.save(tmp_path / "F.npy", frames)
    nan = t.copy()
    nan[7, 2] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    with pytest.raises(UserError, match="row 7"):
        inference.main(
            [
                "--text_emb",
                str(tmp_path / "nan.npy"),
                "--video_emb",
                str(tmp_path / "F.npy"),
                "--output_dir",
                str(tmp_path / "x"),
            ]
        )
    out = tmp_path / "sweep"
    res = inference.main(
        [
            "--text_emb",
            str(tmp_path / "T.npy"),
            "--video_emb",
            str(tmp_path / "F.npy"),
            "--output_dir",
            str(out),
            "--eval_block_size",
            "8",
            "--sweep",
            "--sweep_K",
            "1,7",
            "--sweep_T",
            "5",
            "--sweep_lamd",
            "0.1,1",
            "--sweep_beta",
            "0,4",
            "--sweep_seeds",
            "3",
        ]
    )
    rows = (out / "sweep.csv").read_text().strip().splitlines()
    assert (
        len(rows) == 1 + 1 + 2 + 1 + 2 + 2 + 2 * 4 + 1
    )  # header, baseline, K, T, lamd, beta, seeds, linspace
    beta0 = [r for r in rows[1:] if r.startswith("beta,") and ",0.0000," in r]
    assert beta0 and beta0[0].split(",")[8] == rows[1].split(",")[8]  # beta 0 == no EMCL (t2v R@1)
    assert (out / "sweep.png").stat().st_size > 10_000
    assert res["sweep"]["seeds_upstream"]["n"] == 4  # seeds 0, 1, 2 and the run's 42
    text = inference.main(
        [
            "--text_emb",
            str(tmp_path / "T.npy"),
            "--video_emb",
            str(tmp_path / "F.npy"),
            "--output_dir",
            str(tmp_path / "text"),
            "--frame_pooling",
            "text",
        ]
    )
    assert text["source"]["frame_pooling"].startswith("text-conditioned")


# ------------------------------------------------------------------ JPEG frame folders and extraction
def test_frame_folder_indices_follow_the_reference():
    # 61 files at 5 fps, every 2nd: linspace(0, 60, 30) truncated, then 12 of those 30, truncated
    pre = [int(x) for x in np.linspace(0, 60, num=30)]
    pick = [int(x) for x in np.linspace(0, 29, num=12)]
    assert frame_folder_indices(61, 2, 12).tolist() == [pre[i] for i in pick]
    assert frame_folder_indices(9, 2, 12).tolist() == [int(x) for x in np.linspace(0, 8, num=4)]
    assert frame_folder_indices(1, 2, 12).tolist() == []


def test_frame_folder_source(tmp_path):
    folder = tmp_path / "frames" / "vid1"
    folder.mkdir(parents=True)
    for k in range(9):  # frame k is a flat grey of level 20 k
        Image.fromarray(np.full((30, 40, 3), 20 * k, np.uint8)).save(folder / f"{k + 1:08d}.jpg", quality=100)
    src = FrameFolderSource(tmp_path / "frames", sample_fp=2, max_frames=12, size=24)
    frames, mask = src.load("vid1")
    assert frames.shape == (12, 3, 24, 24) and frames.dtype == torch.uint8
    assert mask.tolist() == [1] * 4 + [0] * 8
    levels = [round(float(frames[i].float().mean()) / 20) for i in range(4)]
    assert levels == [int(x) for x in np.linspace(0, 8, num=4)]
    assert int(frames[4:].abs().sum()) == 0
    with pytest.raises(VideoError, match="vid2"):
        src.load("vid2")
    (tmp_path / "frames" / "vid3").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "frames" / "vid3" / "00000001.jpg")
    with pytest.raises(VideoError, match="fewer than sample_fp"):
        src.load("vid3")


def test_extract_frames_script(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "clip_a.mp4", 20, fps=10, width=48, height=32)
    script = load_script("extract_frames")
    assert (
        script.main(
            [
                "--input_path",
                str(videos),
                "--output_path",
                str(tmp_path / "frames"),
                "--workers",
                "1",
                "--no_progress",
            ]
        )
        == 0
    )
    files = sorted(os.listdir(tmp_path / "frames" / "clip_a"))
    assert files[0] == "00000001.jpg" and 9 <= len(files) <= 13  # 2 s at 5 fps (ffmpeg -r pads the ends)
    assert not [p for p in (tmp_path / "frames").iterdir() if p.name.startswith(".")]
    frames, mask = FrameFolderSource(tmp_path / "frames", max_frames=12, size=32).load("clip_a")
    assert int(mask.sum()) == len(files) // 2
    assert (
        script.main(
            [
                "--input_path",
                str(videos),
                "--output_path",
                str(tmp_path / "frames"),
                "--workers",
                "1",
                "--no_progress",
            ]
        )
        == 0
    )  # rerun: skipped, still fine


# ------------------------------------------------------------------ our own EMCL-Net checkpoints
def test_emcl_net_checkpoint_source(tmp_path):
    import yaml

    from emcl import dist
    from emcl.data.synthetic import make_synthetic
    from emcl.metrics import evaluate_similarity
    from emcl.train.runs import task_defaults
    from video_retrieval.emcl_net import main_task_retrieval as retrieval
    from video_retrieval.emcl_net.model import emcl_scores

    data = tmp_path / "syn"
    make_synthetic(data, 14, seed=3, format="msvd", split_sizes=(4, 2, 8), frames=8, fps=4, size=32)
    config = yaml.safe_load((REPO / "configs" / "synthetic.yaml").read_text())
    config.pop("synthetic")
    config.update(anno_path=str(data / "annotations"), video_path=str(data / "videos"), frame_cache=None,
                  max_frames=4, use_emcl=0, clip_path=None, grad_checkpointing=False, msrvtt_train="9k",
                  msrvtt_test="1k", decode_backend="pyav", cache_in_memory=0, skip_bad_videos=False,
                  precision="fp32", workers=0, batch_size_val=16, em_init="upstream")  # fmt: skip
    cfg = argparse.Namespace(**{**task_defaults(retrieval.TASK), **config})
    info = dist.DistInfo(0, 1, 0, torch.device("cpu"), True)
    task = retrieval.TASK(cfg, info)
    model = task.build_model().eval()
    torch.save({"model": model.state_dict(), "config": config}, tmp_path / "checkpoint_best.pt")
    out = tmp_path / "out"
    args = [
        "--emcl_net_checkpoint",
        str(tmp_path / "checkpoint_best.pt"),
        "--output_dir",
        str(out),
        "--eval_block_size",
        "4",
        "--workers",
        "0",
        "--device",
        "cpu",
    ]
    res = inference.main(args)
    assert res["source"]["source"] == "emcl_net" and res["source"]["trained_with_emcl"] is False
    # without EMCL it is the model's own (text-conditioned) scoring of the test split
    split = task.load_split("test")
    t, f, m, _ = task.encode(model, split)
    want = evaluate_similarity(emcl_scores(t, f, m, None, cfg.temp), torch.tensor(split.caption_video))
    assert res["without_emcl"]["t2v"] == want["t2v"] and res["without_emcl"]["v2t"] == want["v2t"]
    assert res["num_videos"] == 8 and res["num_texts"] == len(split.captions) > 8
    pooled = inference.main([*args, "--frame_pooling", "mean", "--output_dir", str(tmp_path / "mean")])
    assert pooled["source"]["frame_pooling"].startswith("mean")


def test_clip2video_under_torchrun_matches_one_process(clip2video_case, tmp_path):
    """Two gloo ranks share the videos, texts and score rows; the embeddings come back in dataset order.

    Compared at the embedding level: the random tiny model's scores hold near-ties that batch-size
    dependent round-off (batches of 2-3 per rank instead of 4) may flip."""
    root, _, _ = clip2video_case
    inference.main(_c2v_args(root, tmp_path / "one", "--save_embeddings", "1"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "video_retrieval.inference_module.main_task_inference",
           *_c2v_args(root, tmp_path / "two", "--save_embeddings", "1")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert set(two["with_emcl"]) == {"t2v", "v2t", "t2v_dsl", "v2t_dsl"}
    for name in ("text_emb", "video_emb", "tab_text_emb", "tab_video_emb"):
        a, b = np.load(tmp_path / "one" / f"{name}.npy"), np.load(tmp_path / "two" / f"{name}.npy")
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def _parse(argv: list[str]) -> argparse.Namespace:
    from emcl.train.runner import parse

    return parse(inference.TASK, argv)


def test_shipped_config_parses_with_reference_defaults():
    config = str(REPO / "configs" / "inference_clip2video.yaml")
    cfg = _parse(["--config", config, "--checkpoint", "CK", "--model_num", "2", "--output_dir", "out"])
    got = (cfg.centerK, cfg.stage_num, cfg.lamd, cfg.beta, cfg.seed, cfg.eval_block, cfg.eval_block_size)
    assert got == (7, 10, 0.1, 4, 42, "paper", 64)
    assert (cfg.tab_centers, cfg.center_weight, cfg.max_frames, cfg.feature_framerate) == (5, 0.5, 12, 2)
    assert cfg.source == "clip2video"
    defaults = _parse(["--text_emb", "T", "--output_dir", "out"])
    got = (defaults.centerK, defaults.stage_num, defaults.lamd, defaults.beta, defaults.em_init)
    assert got == (7, 10, 0.1, 4.0, "upstream") and defaults.tab_centers == 5
    frames = (defaults.workers, defaults.video_framerate, defaults.max_frames, defaults.max_words)
    assert frames == (2, 2.5, 12, 32)
    assert defaults.batch_size_val == 64 and defaults.eval_block_size == 64


def test_output_dir_from_the_command_line_or_the_config(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"output_dir: {tmp_path / 'from_config'}\n")
    assert _parse(["--config", str(config), "--text_emb", "T"]).output_dir == str(tmp_path / "from_config")
    with pytest.raises(UserError, match="--output_dir is required"):
        _parse(["--text_emb", "T"])


def test_em_bases_are_center_k_with_k_as_other_name(tmp_path, capsys):
    """``--centerK`` is the number of EM bases, as in the trainers; ``--K`` (and a config key ``K``) is
    another name of it; CLIP2Video's TAB centres are ``--tab_centers``."""
    base = ["--text_emb", "T", "--output_dir", "out"]
    assert _parse([*base, "--K", "3"]).centerK == 3 == _parse([*base, "--centerK", "3"]).centerK
    assert _parse([*base, "--tab_centers", "4"]).tab_centers == 4
    old = tmp_path / "old.yaml"
    old.write_text("K: 3\n")
    assert _parse([*base, "--config", str(old)]).centerK == 3
    old.write_text("K: 7\ncenterK: 5\n")  # the former meaning of centerK (TAB centres) beside K
    with pytest.raises(UserError, match="'K' and 'centerK' both set --centerK"):
        _parse([*base, "--config", str(old)])
    with pytest.raises(SystemExit):
        _parse([*base, "--K", "0"])
    assert "--centerK/--K: 0 is out of range" in capsys.readouterr().err
    with pytest.raises(UserError, match="give exactly one source"):
        _parse(["--text_emb", "T", "--emcl_net_checkpoint", "C", "--output_dir", str(tmp_path / "none")])
    assert not (tmp_path / "none").exists()  # refused before the output folder is touched


# ------------------------------------------------------------------ output folder: lock, refusal, cleanup
def _files_args(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    t, v = _pairs(40, 16, 1, 1.0)
    np.save(tmp_path / "T.npy", t)
    np.save(tmp_path / "V.npy", v)
    return ["--text_emb", str(tmp_path / "T.npy"), "--video_emb", str(tmp_path / "V.npy"),
            "--output_dir", str(out), "--device", "cpu", *extra]


def _digest(folder: Path) -> dict[str, str]:
    import hashlib

    files = [p for p in sorted(folder.iterdir()) if p.is_file()]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _cli(argv: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    from emcl.errors import cli_main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            cli_main(inference.main, argv)
            return 0, err.getvalue()
        except SystemExit as e:
            return int(e.code), err.getvalue()


def test_busy_folder_and_earlier_results_are_refused(tmp_path):
    from emcl.train.lock import RunLock

    out = tmp_path / "run"
    with RunLock(out) as lock:  # another run (this process, alive) holds the folder
        code, err = _cli(_files_args(tmp_path, out))
        assert code == 2 and f"output folder {out} is in use by another run" in err
        assert lock.path.is_file()
    assert not any(out.glob("metrics.json"))
    sweep = ["--sweep", "--sweep_seeds", "2", "--sweep_K", "7", "--sweep_T", "10", "--sweep_lamd", "0.1",
             "--sweep_beta", "4"]
    assert _cli(_files_args(tmp_path, out, *sweep))[0] == 0
    before = _digest(out)
    assert "sweep.csv" in before and not (out / ".run.lock").exists()
    code, err = _cli(_files_args(tmp_path, out))  # a second run into the same folder
    assert code == 2 and "already holds a finished run" in err.strip().splitlines()[-1]
    assert _digest(out) == before
    assert _cli(_files_args(tmp_path, out, "--overwrite"))[0] == 0  # replaced: no stale sweep beside it
    assert not (out / "sweep.csv").exists() and (out / "metrics.json").is_file()


def test_a_trainers_folder_is_refused_and_overwrite_keeps_its_checkpoint(tmp_path):
    """A folder holding a training run's results (metrics.json, a checkpoint) is refused with one line and
    left as it was; ``--overwrite`` replaces the inference result files only, never the checkpoint."""
    out = tmp_path / "trained"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"finished": True, "task": "retrieval", "test": {}}))
    torch.save({"model": {"w": torch.ones(3)}}, out / "checkpoint_best.pt")
    (out / "train.log").write_text("epoch 1 done\n")
    (out / "config.yaml").write_text("task: retrieval\n")
    before = _digest(out)
    code, err = _cli(_files_args(tmp_path, out))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: output folder {out} already holds a finished run") and "--overwrite" in err
    assert _digest(out) == before
    assert _cli(_files_args(tmp_path, out, "--overwrite"))[0] == 0
    after = _digest(out)
    for kept in ("checkpoint_best.pt", "train.log"):
        assert after[kept] == before[kept]
    assert after["metrics.json"] != before["metrics.json"]
    assert json.loads((out / "metrics.json").read_text())["task"] == "inference"
    assert {"results.md", "inference.log", "config.yaml"} <= set(after)


def test_process_group_and_lock_released_on_error(tmp_path, monkeypatch):
    """A bad embedding file found inside the evaluation (after the lock and the process group): the lock
    is released, the process group torn down, and the next run can use the folder."""
    from emcl import dist

    calls = []
    real = dist.cleanup
    monkeypatch.setattr(dist, "cleanup", lambda: (calls.append(1), real()))
    out = tmp_path / "bad"
    args = _files_args(tmp_path, out)
    np.save(tmp_path / "V.npy", np.zeros((39, 16), np.float32))  # one video short of the 40 texts
    code, err = _cli(args)
    assert code == 2 and "error:" in err and "--caption_video" in err
    assert (out / "inference.log").is_file()  # the run had started: the error came from the evaluation
    assert calls == [1] and not (out / ".run.lock").exists() and not (out / "metrics.json").exists()
    assert _cli(_files_args(tmp_path, out))[0] == 0  # the next run takes the folder, no --overwrite needed
    assert calls == [1, 1] and (out / "metrics.json").is_file() and not (out / ".run.lock").exists()


def test_a_failed_sweep_keeps_the_main_result(tmp_path, monkeypatch):
    """A sweep that fails part-way (here: an error at its third setting; bad sweep lists are refused while
    parsing, tests/test_bad_input.py) keeps the main result written before it."""
    from emcl.errors import UserError
    from video_retrieval.inference_module import sweep

    real, calls = sweep.evaluate_settings, []

    def fail_at_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise UserError("sweep point 3 failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep, "evaluate_settings", fail_at_third)
    out = tmp_path / "sweep"
    code, err = _cli(_files_args(tmp_path, out, "--sweep"))
    assert code == 2 and err.strip().splitlines() == ["error: sweep point 3 failed"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["finished"] is True and saved["task"] == "inference" and "sweep" not in saved
    assert set(saved["with_emcl"]) == {"t2v", "v2t", "t2v_dsl", "v2t_dsl"}
    assert not (out / ".run.lock").exists()
