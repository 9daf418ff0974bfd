"""EMCL as a joint training module: MMT with EM per modality (batched), its two evaluation policies,
the training run and the eval-only reproduction from a checkpoint, and EMCL-Net's meanP baseline."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from emcl.em import EMCL, EMSettings
from emcl.loss import hinge_topk
from emcl.scoring import embedding_score_matrix, paper_block_embeddings

ROOT = Path(__file__).resolve().parents[1]


def tiny_mmt(use_emcl: bool = True, **kw):
    from transformers import BertConfig, BertModel

    from video_retrieval.joint_training.mmt import MMT

    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=30,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
        ),
        add_pooling_layer=False,
    )
    return MMT(
        bert,
        {"a": 5, "b": 3, "c": 4},
        same_dim=16,
        layers=2,
        heads=2,
        intermediate=32,
        max_position=16,
        em=EMSettings(k=4, stage_num=3, beta=3.0) if use_emcl else None,
        **kw,
    )


def test_batched_em_equals_independent_single_modality_ems():
    m, n, d, k = 3, 24, 40, 8
    torch.manual_seed(0)
    x = torch.randn(m, n, d)
    batched = EMCL(k=k, stage_num=5, num_modalities=m, lamd_mode="multiply", normalize_output=True, seed=3)
    singles = []
    for i in range(m):
        s = EMCL(k=k, stage_num=5, lamd_mode="multiply", normalize_output=True)
        s.mu.copy_(batched.mu[i])
        singles.append(s)
    for training in (True, False):  # training updates every modality's mu; evaluation none
        batched.train(training)
        y = batched(x)
        for i, s in enumerate(singles):
            s.train(training)
            torch.testing.assert_close(y[i], s(x[i]), atol=1e-6, rtol=0)
            torch.testing.assert_close(batched.mu[i], s.mu, atol=1e-6, rtol=0)
    assert batched.mu.shape == (m, 1, k)


def test_hinge_over_topk_negatives_as_the_reference():
    torch.manual_seed(0)
    s = torch.randn(6, 6)
    pos = s.diag()
    neg = s.masked_fill(torch.eye(6, dtype=torch.bool), float("-inf"))
    hard = torch.cat([neg.max(1).values, neg.max(0).values])
    assert torch.allclose(hinge_topk(s, 0.05, 1), F.relu(0.05 - pos.repeat(2) + hard).mean())
    # k = B: the B-1 real negatives plus the masked diagonal (a zero term), averaged over B
    terms = F.relu(0.05 - pos[:, None] + s) * (1 - torch.eye(6))
    terms_t = F.relu(0.05 - pos[:, None] + s.t()) * (1 - torch.eye(6))
    assert torch.allclose(hinge_topk(s, 0.05, 32), torch.cat([terms, terms_t]).sum() / (12 * 6))


@pytest.fixture(scope="module")
def embeddings():
    model = tiny_mmt().eval()
    torch.manual_seed(1)
    a, mm, d = 70, 3, 16
    t = F.normalize(torch.randn(a, mm, d), dim=-1)
    v = F.normalize(torch.randn(a, mm, d), dim=-1)
    w = torch.softmax(torch.randn(a, mm), dim=-1)
    return model, t, w, v


def _pair(tt, vv, ww):
    from video_retrieval.joint_training.mmt import pair_scores

    return pair_scores(tt, ww, vv)


def test_paper_policy_is_em_per_block_of_matched_pairs(embeddings):
    model, t, w, v = embeddings
    sim = embedding_score_matrix(model.em_transform, _pair, t, v, extra=w, mode="paper", block=32)
    tt, vv = torch.empty_like(t), torch.empty_like(v)
    for s in range(0, 70, 32):  # 32 + 32 + 6, each block EM'd on its own [videos; texts]
        x = torch.cat([v[s : s + 32], t[s : s + 32]]).transpose(0, 1)  # (M, 2b, D)
        y = model.emcl.__class__.forward(copy.deepcopy(model.emcl).eval(), x).transpose(0, 1)
        b = min(32, 70 - s)
        vv[s : s + b], tt[s : s + b] = y[:b], y[b:]
    torch.testing.assert_close(sim, _pair(tt, vv, w), atol=1e-5, rtol=0)
    for mode in ("paper", "none"):  # rows dealt to ranks in whole blocks: 64 + 6
        full = embedding_score_matrix(model.em_transform, _pair, t, v, extra=w, mode=mode, block=32)
        parts = [
            embedding_score_matrix(
                model.em_transform, _pair, t, v, extra=w, mode=mode, block=32, rank=r, world_size=2
            )
            for r in (0, 1)
        ]
        assert [len(x) for x in parts] == [64, 6]
        torch.testing.assert_close(torch.cat(parts), full, atol=0, rtol=0)
    # training and the paper block agree: a batch's similarity is the same transform (mu untouched in eval)
    torch.testing.assert_close(model.similarity(t[:32], w[:32], v[:32]), sim[:32, :32], atol=1e-5, rtol=0)
    # the reference's transduction: a text's scores change when its block's videos change
    v2 = v.clone()
    v2[1] = F.normalize(torch.randn(3, 16), dim=-1)
    sim2 = embedding_score_matrix(model.em_transform, _pair, t, v2, extra=w, mode="paper", block=32)
    assert (sim2[0, 40:] - sim[0, 40:]).abs().max() > 1e-4


def test_query_policy_is_em_per_query_over_all_videos(embeddings):
    model, t, w, v = embeddings
    sim = embedding_score_matrix(model.em_transform, _pair, t, v, extra=w, mode="query", chunk=5)
    for q in (0, 33, 69):
        tq, vq = model.em_transform(t[q : q + 1], v)
        torch.testing.assert_close(sim[q], _pair(tq, vq, w[q : q + 1])[0], atol=1e-5, rtol=0)
    perm = torch.randperm(70)
    sim_p = embedding_score_matrix(model.em_transform, _pair, t[perm], v[perm], extra=w[perm], mode="query")
    torch.testing.assert_close(sim_p, sim[perm][:, perm], atol=1e-5, rtol=0)
    half = embedding_score_matrix(
        model.em_transform, _pair, t, v, extra=w, mode="query", rank=1, world_size=2
    )
    torch.testing.assert_close(half, sim[64:], atol=1e-6, rtol=0)
    tp, vp = paper_block_embeddings(model.em_transform, t, v, 32)
    assert tp.shape == t.shape and vp.shape == v.shape


def test_model_without_emcl_normalises_the_experts():
    model = tiny_mmt(use_emcl=False, normalize_experts=True).eval()
    ids = torch.randint(0, 30, (4, 7))
    experts = {
        e: {
            "features": torch.randn(4, 5, d),
            "positions": torch.full((4, 5), 2.0),
            "mask": torch.ones(4, 5),
            "maxpool": torch.randn(4, d),
        }
        for e, d in (("a", 5), ("b", 3), ("c", 4))
    }
    experts["c"]["mask"][1] = 0  # a missing expert still gets an embedding, scored at its text weight
    t, w = model.encode_text(ids, torch.ones_like(ids))
    v = model.encode_video(experts)
    assert torch.allclose(t.norm(dim=-1), torch.ones(4, 3), atol=1e-5)
    assert torch.allclose(v.norm(dim=-1), torch.ones(4, 3), atol=1e-5)
    assert torch.allclose(w.sum(-1), torch.ones(4))
    assert model.emcl is None and torch.isfinite(model(ids, torch.ones_like(ids), experts)).all()


# ------------------------------------------------------------------------------------ end to end runs
@pytest.fixture(scope="module")
def mmt_config(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("mmt")
    cfg = yaml.safe_load((ROOT / "configs/mmt_synthetic.yaml").read_text())
    cfg["synthetic"].update(out=str(tmp / "data"), num_videos=72, split_sizes=[32, 40])
    cfg.update(
        epochs=2,
        iters_per_epoch=3,
        batch_size=8,
        batch_size_val=16,
        vid_layers=1,
        same_dim=32,
        n_display=1,
        device="cpu",
    )
    path = tmp / "mmt_tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_then_eval_only_reproduces_both_policies(mmt_config, tmp_path):
    from emcl.train.runner import run
    from video_retrieval.joint_training.main_task_joint import TASK

    out = tmp_path / "run"
    trained = run(TASK, ["--config", str(mmt_config), "--output_dir", str(out)])
    test = trained["test"]
    assert set(test["policies"]) == {"paper", "query", "none"} and test["eval_block"] == "paper"
    assert test["num_texts"] == test["num_videos"] == 40  # 40 = 32 + 8: one full block and a remainder
    missing = test["missing_experts"]
    assert sum(missing["face"].values()) > 0 and missing["s3d"] == {"absent": 0, "empty": 0, "nan": 0}
    ck = torch.load(out / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    mu = ck["model"]["emcl.mu"]
    assert mu.shape == (4, 1, 64)  # (M, 1, K): one EM state per modality, saved with the model
    assert not torch.equal(mu, tiny_state_mu(mmt_config))  # updated by training
    again = run(
        TASK,
        [
            "--config",
            str(mmt_config),
            "--do_eval",
            "1",
            "--init_model",
            str(out / "checkpoint_last.pt"),
            "--output_dir",
            str(tmp_path / "eval"),
        ],
    )
    assert again["test"]["policies"] == test["policies"]


def tiny_state_mu(config: Path) -> torch.Tensor:
    cfg = yaml.safe_load(config.read_text())
    return EMCL(k=cfg["centerK"], num_modalities=4, seed=cfg["seed"]).mu


def test_meanp_baseline_with_and_without_emcl_runs_end_to_end(tmp_path):
    from emcl.data.synthetic import make_synthetic
    from emcl.train.runner import run
    from video_retrieval.emcl_net.main_task_retrieval import TASK

    data = tmp_path / "syn"
    make_synthetic(data, 20, seed=1, format="msvd", split_sizes=(12, 4, 4), frames=8, fps=4, size=32)
    results = {}
    for use in (1, 0):
        results[use] = run(TASK, [
            "--config", str(ROOT / "configs/synthetic.yaml"), "--anno_path", str(data / "annotations"),
            "--video_path", str(data / "videos"), "--output_dir", str(tmp_path / f"meanP{use}"),
            "--agg_module", "meanP", "--use_emcl", str(use), "--batch_size", "4", "--batch_size_val", "8",
            "--workers", "0", "--max_frames", "4", "--epochs", "1", "--max_steps", "2", "--device", "cpu",
        ])  # fmt: skip
    assert set(results[1]["test"]["policies"]) == {"paper", "query", "none"}
    assert set(results[0]["test"]["policies"]) == {"none"}
    for r in results.values():
        assert 0 <= r["test"]["t2v"]["R1"] <= 100


def test_meanp_scores_are_cosines_of_mean_pooled_frames_after_em():
    from video_retrieval.emcl_net.model import emcl_scores, mean_video_vectors

    torch.manual_seed(0)
    t, f = torch.randn(5, 12), torch.randn(7, 4, 12)
    mask = torch.ones(7, 4)
    mask[2, 3:] = 0
    v = mean_video_vectors(f, mask)
    torch.testing.assert_close(v[2], F.normalize(f[2, :3], dim=-1).mean(0))
    cos = F.normalize(t, dim=-1) @ F.normalize(v, dim=-1).t()
    torch.testing.assert_close(emcl_scores(t, f, mask, None, temp=3.0, pool="mean"), cos)
    em = EMCL(k=4, stage_num=3)
    x = em.eval()(torch.cat([v, t]))
    want = F.normalize(x[7:], dim=-1) @ F.normalize(x[:7], dim=-1).t()
    torch.testing.assert_close(emcl_scores(t, f, mask, em, temp=3.0, pool="mean"), want)


def test_steplr_per_epoch_as_a_per_step_schedule_and_the_baseline_normalises():
    from argparse import Namespace

    from video_retrieval.joint_training.main_task_joint import TASK, _normalize

    task = TASK(Namespace(lr=5e-5, weight_decay=0.0, gamma=0.9), None)
    opt, sched = task.build_optimizer(torch.nn.Linear(2, 2), total_steps=9, steps_per_epoch=3)
    lrs = []
    for _ in range(9):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([5e-5] * 3 + [4.5e-5] * 3 + [4.05e-5] * 3)  # gamma once per epoch
    assert isinstance(opt, torch.optim.Adam) and not isinstance(opt, torch.optim.AdamW)
    # "MMT without EMCL" L2-normalises the experts; with EMCL the layer's output is normalised instead
    assert _normalize(Namespace(normalize_experts="auto", use_emcl=0))
    assert not _normalize(Namespace(normalize_experts="auto", use_emcl=1))
    assert _normalize(Namespace(normalize_experts="1", use_emcl=1))


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--margin", "-1", "-1 is out of range (a number >= 0)"),
        ("--lamd", "0", "0 is out of range (a number > 0)"),
        ("--beta", "-3", "-3 is out of range (a number >= 0)"),
        ("--gamma", "0", "0 is out of range (a number > 0)"),
    ],
)
def test_out_of_range_flags_are_refused_naming_the_flag(flag, value, expected, tmp_path):
    import contextlib
    import io

    from emcl.errors import cli_main
    from video_retrieval.joint_training.main_task_joint import main

    err = io.StringIO()
    argv = ["--config", str(ROOT / "configs/mmt_synthetic.yaml"), "--output_dir", str(tmp_path / "o")]
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        cli_main(main, [*argv, flag, value])
    assert e.value.code == 2
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip() and not ln.startswith(("usage:", " "))]
    assert len(lines) == 1 and lines[0].endswith(f"error: argument {flag}: {expected}"), err.getvalue()
    assert not (tmp_path / "o").exists()  # stopped while parsing
