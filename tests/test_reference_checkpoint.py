"""The authors' EMCL-Net / CLIP4Clip checkpoints: fabricated in the reference's layout (fp16, saved from DDP),
loaded through --init_model, load_run and the converter, and checked against an independent float64
re-implementation of the reference's forward (tests/_reference_emcl_net.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from emcl.errors import UserError
from emcl.train.runner import build_parser
from emcl.train.runs import load_run, similarity
from tests._reference_emcl_net import (
    block_scores,
    encode_text,
    fabricate_reference_state,
    loss_and_mu,
    video_features,
)
from tests._run_fixtures import make_data
from tests._video_fixtures import load_script
from tests.test_bad_input import cli, error_line
from video_retrieval.emcl_net import main_task_retrieval as mtr

ROOT = Path(__file__).resolve().parents[1]
SOT, EOT = 49406, 49407
# a tiny CLIP: what the file cannot show (head counts) comes from the config
TINY = dict(embed_dim=32, width=32, heads=2, image=16, patch=8, context=16, vocab=49408, agg_layers=2)
SCORE = dict(centerK=8, stage_num=5, temp=3.0, lamd=1.0, beta=3.0, momentum=0.9)


def save_reference(sd: dict[str, torch.Tensor], path: Path) -> Path:
    """As the reference writes it from DDP: ``module.``-prefixed keys, CLIP in fp16."""
    torch.save({"module." + k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, path)
    return path


def file_weights(path: Path) -> dict[str, torch.Tensor]:
    """The weights as stored (fp16 values), in float64 and without the prefix: the independent side."""
    return {k.removeprefix("module."): v.double() for k, v in torch.load(path).items()}


def inputs(n: int = 6, t: int = 5, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (n, t, 3, size, size), dtype=torch.uint8, generator=g)
    lengths = [5, 3, 2, 5, 4, 1][:n]  # the longest clip fills every slot (see the seqLSTM note below)
    fmask = torch.tensor([[1] * k + [0] * (t - k) for k in lengths])
    ids = torch.zeros(n, 12, dtype=torch.long)
    for i in range(n):
        k = 3 + i % 5
        ids[i, 0], ids[i, k + 1] = SOT, EOT
        ids[i, 1 : k + 1] = torch.randint(1, 40000, (k,), generator=g)
    return ids, (ids > 0).long(), frames, fmask


@pytest.mark.parametrize("agg", ["seqTransf", "seqLSTM", "None"])
def test_scores_loss_and_mu_match_the_reference_in_float64(agg, tmp_path):
    """Paper-policy scores (3x3 blocks), the training loss and the mu update of the loaded model equal the
    reference's forward computed in float64 on the file's weights. The reference's seqLSTM gives padded
    slots past the batch's longest clip twice their input (batch-dependent); with a clip that fills every
    slot, as here, both agree."""
    path = save_reference(fabricate_reference_state(agg, seed=1, **TINY), tmp_path / "pytorch_model.bin.4")
    config = {"clip_config": {"vision_heads": 2, "text_heads": 2}, "seed": 0, "eval_block_size": 3,
              "max_frames": 5, "max_words": 12, "image_size": 16, **SCORE}
    run = load_run(checkpoint=path, config=config)
    model, sd = run.model, file_weights(path)
    assert run.cfg.agg_module == agg and run.cfg.clip_config["vision_layers"] == 2
    k = SCORE["centerK"]
    torch.manual_seed(0)  # the reference draws mu first thing after seeding with the run's seed
    draw = torch.Tensor(1, k).normal_(0, math.sqrt(2.0 / k))
    assert torch.allclose(model.emcl.mu, draw / (1e-6 + draw.norm(dim=0, keepdim=True)), atol=1e-6)

    ids, tmask, frames, fmask = inputs()
    with torch.no_grad():
        t, f = model.encode_text(ids, tmask), model.encode_video(frames, fmask)
    t_ref, f_ref = encode_text(sd, ids), video_features(sd, agg, frames, fmask)
    assert torch.allclose(t.double(), t_ref, atol=1e-5) and torch.allclose(f.double(), f_ref, atol=1e-5)

    mu0 = model.emcl.mu.clone()
    kw = {key: SCORE[key] for key in ("temp", "stage_num", "lamd", "beta")}
    paper = similarity(run, t, f, fmask, policy="paper")
    paper_ref = block_scores(t_ref, f_ref, fmask, mu0.double(), block=3, **kw)
    assert (paper.double() - paper_ref).abs().max() < 1e-5

    model.train()
    loss = model(ids, tmask, frames, fmask)
    loss_ref, mu_ref = loss_and_mu(t_ref, f_ref, fmask, mu0.double(), sd["clip.logit_scale"],
                                   momentum=SCORE["momentum"], **kw)
    assert abs(loss.item() - loss_ref.item()) < 1e-5 * max(1.0, loss_ref.item())
    assert torch.allclose(model.emcl.mu.double(), mu_ref, atol=1e-6)


# ------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("refck"), num_videos=10)


def synthetic_file(tmp_path: Path, agg: str, **change) -> Path:
    """A reference file shaped like configs/synthetic.yaml's tiny CLIP (2 temporal layers; the config
    says 1, so runs pass --agg_layers 2 unless they test that contradiction)."""
    shape = dict(embed_dim=64, width=64, heads=2, image=32, patch=8, context=77, vocab=49408, agg_layers=2)
    sd = fabricate_reference_state(agg, seed=2, **shape)
    drop, add = change.get("drop"), change.get("add")
    if drop:
        sd.pop(drop)
    if add:
        sd[add] = torch.zeros(3)
    return save_reference(sd, tmp_path / f"pytorch_model.bin.{agg}")


def run_flags(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config", str(ROOT / "configs/synthetic.yaml"), "--anno_path", str(data / "annotations"),
        "--video_path", str(data / "videos"), "--output_dir", str(out), "--batch_size", "4",
        "--batch_size_val", "8", "--workers", "0", "--max_frames", "3", "--device", "cpu", "--seed", "0",
        "--eval_block_size", "4", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("agg,flag", [
    ("seqTransf", ["--agg_layers", "2"]),
    ("seqLSTM", ["--agg_module", "seqLSTM"]),
    ("None", ["--agg_module", "meanP"]),
])
def test_eval_only_from_a_reference_file(agg, flag, data, tmp_path):
    path = synthetic_file(tmp_path, agg)
    out = tmp_path / "eval"
    code, err = cli(run_flags(data, out, "--do_eval", "1", "--init_model", str(path), *flag))
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] and metrics["init_model_format"] == "reference"
    assert metrics["em_state"].startswith("drawn from --seed 0")
    assert set(metrics["test"]["policies"]) == {"paper", "query", "none"}
    saved = (out / "config.yaml").read_text()
    assert f"agg_module: {'meanP' if agg == 'None' else agg}" in saved


@pytest.mark.parametrize("change,flag,named", [
    ({"drop": "transformerClip.resblocks.1.mlp.c_fc.bias"}, ["--agg_layers", "2"],
     "1 missing: transformerClip.resblocks.1.mlp.c_fc.bias"),
    ({"add": "cross.pooler.dense.weight"}, ["--agg_layers", "2"], "unexpected key(s)"),
    ({}, [], "agg_layers: 1 in the config, 2 in"),
    ({}, ["--agg_layers", "2", "--agg_module", "seqLSTM"],
     "agg_module: 'seqLSTM' in the config, 'seqTransf'"),
])  # fmt: skip
def test_bad_reference_files_are_one_line_errors(change, flag, named, data, tmp_path):
    path = synthetic_file(tmp_path, "seqTransf", **change)
    code, err = cli(run_flags(data, tmp_path / "bad", "--do_eval", "1", "--init_model", str(path), *flag))
    assert code == 2
    line = error_line(err)
    assert named in line and str(path) in line
    if "add" in change:
        assert "cross.pooler.dense.weight" in line


def test_fine_tune_saves_our_checkpoint_with_mu_and_resumes(data, tmp_path):
    """Default settings (the synthetic config without its from-scratch exception): conv1 stays fixed."""
    path = synthetic_file(tmp_path, "seqTransf")
    text = (ROOT / "configs/synthetic.yaml").read_text()
    config = tmp_path / "defaults.yaml"
    config.write_text("\n".join(ln for ln in text.splitlines() if not ln.startswith("freeze_patch_embed")))
    assert "freeze_patch_embed" not in config.read_text()
    out = tmp_path / "ft"
    train = ["--do_train", "1", "--do_eval", "1", "--init_model", str(path), "--agg_layers", "2",
             "--config", str(config)]
    code, err = cli(run_flags(data, out, *train, "--epochs", "1"))
    assert code == 0, err
    ck = torch.load(out / "checkpoint_last.pt", weights_only=False)
    state, before = ck["model"], file_weights(path)
    assert "emcl.mu" in state and ck["config"]["clip_config"]["vision_width"] == 64
    # the patch embedding stayed as loaded; the rest of CLIP trained
    assert torch.equal(state["clip.visual.conv1.weight"].double(), before["clip.visual.conv1.weight"])
    assert not torch.equal(state["clip.visual.ln_pre.weight"].double(), before["clip.visual.ln_pre.weight"])
    code, err = cli(run_flags(data, out, *train, "--epochs", "2", "--resume"))
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith("checkpoint_last.pt")
    assert torch.load(out / "checkpoint_last.pt", weights_only=False)["epoch"] == 2


def test_paper_configs_keep_the_reference_frozen_patch_embedding():
    defaults = {a.dest: a.default for a in build_parser(mtr.TASK)._actions}
    assert defaults["freeze_patch_embed"] == 1
    for name in ("msrvtt", "msvd", "lsmdc", "activitynet", "didemo"):
        assert "freeze_patch_embed" not in (ROOT / "configs" / f"{name}.yaml").read_text()


def test_patch_embedding_trains_when_asked(data, tmp_path):
    path = synthetic_file(tmp_path, "seqTransf")
    out = tmp_path / "ft0"
    code, err = cli(run_flags(data, out, "--do_train", "1", "--init_model", str(path), "--agg_layers", "2",
                              "--freeze_patch_embed", "0", "--epochs", "1", "--max_steps", "1"))
    assert code == 0, err
    state = torch.load(out / "checkpoint_last.pt", weights_only=False)["model"]
    assert not torch.equal(state["clip.visual.conv1.weight"].double(),
                           file_weights(path)["clip.visual.conv1.weight"])


def test_converter_writes_our_checkpoint(data, tmp_path):
    convert = load_script("convert_checkpoint").main
    path = synthetic_file(tmp_path, "seqTransf")
    dst = tmp_path / "ours.pt"
    flags = ["--config", str(ROOT / "configs/synthetic.yaml"), "--agg_layers", "2", "--seed", "0"]
    assert convert([str(path), str(dst), *flags]) == 0
    ours = torch.load(dst, weights_only=False)
    assert ours["config"]["agg_layers"] == 2 and ours["init_model_format"] == "reference"
    direct = load_run(checkpoint=path, config={**ours["config"]})
    converted = load_run(checkpoint=dst)
    for key, value in direct.model.state_dict().items():
        assert torch.equal(value, converted.model.state_dict()[key]), key
    with pytest.raises(UserError, match="exists: pass --overwrite"):
        convert([str(path), str(dst), *flags])


def test_inference_module_and_search_take_a_reference_file(data, tmp_path):
    """The inference module's EMCL-Net source and the search index read the authors' file as it is."""
    from emcl.search import build_index
    from emcl.search import main as search
    from video_retrieval.inference_module import main_task_inference as inference

    path = synthetic_file(tmp_path, "seqLSTM")
    out = tmp_path / "infer"
    res = inference.main(["--emcl_net_checkpoint", str(path), "--datatype", "msvd", "--anno_path",
                          str(data / "annotations"), "--video_path", str(data / "videos"), "--workers", "0",
                          "--output_dir", str(out), "--eval_block_size", "4", "--device", "cpu"])
    assert res["source"]["source"] == "emcl_net" and res["num_videos"] == 5
    assert (out / "metrics.json").is_file()
    index = build_index(data / "videos", path, tmp_path / "idx", config={"agg_module": "seqLSTM"},
                        progress=False)
    assert len(index["video_ids"]) == 10 and not index["failed"]
    found = search(["query", str(tmp_path / "idx"), "a red ball", "-k", "3", "--emcl"])
    assert len(found["results"]) == 3
