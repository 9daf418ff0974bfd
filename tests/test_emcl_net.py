"""EMCL-Net: the model's pieces, the evaluation policies, and fast-path parity (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emcl.clip import build_clip
from emcl.em import EMCL, EMSettings, em_reconstruct
from emcl.scoring import score_matrix
from tests.test_em import reference_em
from video_retrieval.emcl_net.model import EMCLNet, FrameLSTM, pair_video_vectors

TINY = dict(
    embed_dim=64, image_size=32, patch_size=8, vision_width=64, vision_layers=2, text_width=64, text_layers=2
)


@pytest.fixture(scope="module")
def model() -> EMCLNet:
    torch.manual_seed(0)
    em = EMSettings(k=8, stage_num=5)
    return EMCLNet(build_clip(**TINY), agg_module="seqTransf", agg_layers=2, em=em).eval()


def batch(n: int = 6, t: int = 4, words: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (n, t, 3, 32, 32), dtype=torch.uint8, generator=g)
    fmask = torch.ones(n, t, dtype=torch.long)
    fmask[1, 2:] = 0
    fmask[3, 1:] = 0
    ids = torch.zeros(n, words, dtype=torch.long)
    ids[:, 0] = 49406
    ids[:, 1:5] = torch.randint(1, 40000, (n, 4), generator=g)
    ids[:, 5] = 49407
    tmask = (ids > 0).long()
    return ids, tmask, frames, fmask


def test_initialisation_trick_copies_text_tower(model):
    clip, agg = model.clip, model.agg
    assert torch.equal(agg.position.weight, clip.text_positional_embedding[: agg.position.weight.shape[0]])
    for i, block in enumerate(agg.blocks):
        src = dict(clip.text_blocks[i].named_parameters())
        for name, p in block.named_parameters():
            assert torch.equal(p, src[name]) and p.data_ptr() != src[name].data_ptr()


def test_shapes_masks_and_loss(model):
    ids, tmask, frames, fmask = batch()
    t = model.encode_text(ids, tmask)
    f = model.encode_video(frames, fmask)
    assert t.shape == (6, 64) and f.shape == (6, 4, 64)
    s = model.scores(t, f, fmask)
    assert s.shape == (6, 6) and s.abs().max() <= 1 + 1e-5
    # padded frame slots do not depend on what the padded pixels were
    frames2 = frames.clone()
    frames2[1, 2:] = 7
    f2 = model.encode_video(frames2, fmask)
    assert torch.allclose(f2[1, :2], f[1, :2], atol=1e-5)
    model.train()
    mu0 = model.emcl.mu.clone()
    loss = model(ids, tmask, frames, fmask)
    loss.backward()
    model.eval()
    assert torch.isfinite(loss) and not torch.equal(mu0, model.emcl.mu)
    assert model.clip.visual.conv1.weight.grad is not None and model.agg.position.weight.grad is not None
    model.zero_grad()
    model.emcl.mu.copy_(mu0)


def test_frame_weighting_matches_formula():
    g = torch.Generator().manual_seed(1)
    t, f = torch.randn(3, 8, generator=g), torch.randn(4, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1] * 5, [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    v = pair_video_vectors(t, f, mask, temp=3.0)
    for i in range(3):
        for j in range(4):
            w = torch.softmax(f[j] @ t[i] / 3.0, dim=0) * mask[j]  # over all slots, then masked
            assert torch.allclose(v[i, j], (w[:, None] * f[j]).sum(0), atol=1e-6)


def test_lstm_matches_packed_sequence():
    torch.manual_seed(0)
    agg = FrameLSTM(16)
    x = torch.randn(3, 6, 16)
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    out = agg(x, mask)
    for b, n in enumerate(mask.sum(1).tolist()):
        ref, _ = agg.lstm(x[b : b + 1, :n])
        assert torch.allclose(out[b, :n], ref[0] + x[b, :n], atol=1e-6)
        assert torch.equal(out[b, n:], x[b, n:])


def independent_block_scores(t, f, m, mu, k_iters, lamd, beta, temp, block):
    """The reference's evaluation: a Python loop over 32x32 blocks, EM per block in float64 numpy."""
    a, v = t.shape[0], f.shape[0]
    out = np.zeros((a, v))
    for i in range(0, a, block):
        for j in range(0, v, block):
            tb, fb, mb = t[i : i + block].double(), f[j : j + block].double(), m[j : j + block].double()
            w = torch.softmax(torch.einsum("ad,btd->abt", tb, fb) / temp, dim=-1) * mb[None]
            vb = torch.einsum("abt,btd->abd", w, fb)
            na, nb = vb.shape[:2]
            x = torch.cat([vb.reshape(na * nb, -1), tb]).numpy()
            y, _ = reference_em(x, mu.double().numpy(), k_iters, lamd, beta)
            y = y / np.linalg.norm(y, axis=1, keepdims=True)
            yv, yt = y[: na * nb].reshape(na, nb, -1), y[na * nb :]
            out[i : i + na, j : j + nb] = np.einsum("ad,abd->ab", yt, yv)
    return out


def random_features(a=70, v=75, t=5, d=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats_t = F.normalize(torch.randn(a, d, generator=g), dim=-1)
    feats_f = F.normalize(torch.randn(v, t, d, generator=g), dim=-1)
    m = (torch.rand(v, t, generator=g) > 0.3).long()
    m[:, 0] = 1
    return feats_t, feats_f, m


@pytest.mark.parametrize("block", [32, 16])
def test_paper_block_matches_independent_loop(block):
    t, f, m = random_features()
    em = EMCL(k=32, stage_num=9, lamd=1.0, beta=3.0).eval()
    net = EMCLNet.__new__(EMCLNet)
    torch.nn.Module.__init__(net)
    net.emcl, net.temp, net.pool = em, 3.0, "text"
    got = score_matrix(net.scores, t, f, m, mode="paper", block=block, chunk=2)
    want = independent_block_scores(t, f, m, em.mu, 9, 1.0, 3.0, 3.0, block)
    assert np.abs(got.numpy() - want).max() < 1e-4
    # blocks really matter in paper mode: the same pair scores differently in another block layout
    other = score_matrix(net.scores, t, f, m, mode="paper", block=block // 2 + 3)
    assert (other - got).abs().max() > 1e-4
    # rows dealt to ranks reassemble to the same matrix
    parts = [
        score_matrix(net.scores, t, f, m, mode="paper", block=block, rank=r, world_size=3) for r in range(3)
    ]
    assert torch.allclose(torch.cat(parts), got, atol=1e-6)


def test_query_mode_is_order_and_blocking_invariant():
    t, f, m = random_features()
    em = EMCL(k=32, stage_num=9).eval()

    def fn(tb, fb, mb):
        from video_retrieval.emcl_net.model import emcl_scores

        return emcl_scores(tb, fb, mb, em, 3.0)

    base = score_matrix(fn, t, f, m, mode="query", chunk=7)
    pt, pv = torch.randperm(t.shape[0]), torch.randperm(f.shape[0])
    perm = score_matrix(fn, t[pt], f[pv], m[pv], mode="query", chunk=16)
    assert torch.allclose(perm, base[pt][:, pv], atol=1e-5)
    assert torch.allclose(score_matrix(fn, t, f, m, mode="query", chunk=70, block=5), base, atol=1e-5)


def test_bf16_fast_path_matches_fp32(model):
    from emcl.amp import autocast

    ids, tmask, frames, fmask = batch(n=8, seed=3)
    out = {}
    with torch.no_grad():
        for prec in ("fp32", "bf16"):
            with autocast("cpu", prec):
                t = model.encode_text(ids, tmask).float()
                f = model.encode_video(frames, fmask).float()
                out[prec] = (model.loss_from_features(t, f, fmask).item(), model.scores(t, f, fmask))
    assert abs(out["bf16"][0] - out["fp32"][0]) / out["fp32"][0] < 2e-2
    assert (out["bf16"][1] - out["fp32"][1]).abs().max() < 3e-2


# --------------------------------------------- precision (docs/reference.md, 'Precision')


def _unit_features(a: int, v: int, t: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    feats_t = F.normalize(torch.randn(a, d, generator=g), dim=-1)
    feats_f = F.normalize(torch.randn(v, t, d, generator=g), dim=-1)
    m = torch.ones(v, t, dtype=torch.long)
    m[::3, t // 2 :] = 0
    return feats_t, feats_f, m


def test_emcl_scores_under_bf16_autocast_equal_fp32():
    """Pooling, EM, residual, normalisation and cosine run in fp32 with autocast off (docs/reference.md,
    'Precision'): under bf16 autocast the scores equal the fp32 ones to 1e-5 (in bf16 they moved by up to
    ~3e-3)."""
    from video_retrieval.emcl_net.model import emcl_scores

    t, f, m = _unit_features(32, 32, 12, 512, seed=7)
    em = EMCL(k=32, stage_num=9, lamd=1.0, beta=3.0).eval()
    ref = emcl_scores(t, f, m, em, 3.0)
    # 2x2 blocks of 16 texts x 16 videos in one call (leading block dims, as the paper policy)
    tb, fb, mb = t.view(2, 16, 512)[:, None], f.view(2, 16, 12, 512)[None], m.view(2, 16, 12)[None]
    ref_blocks = emcl_scores(tb, fb, mb, em, 3.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = emcl_scores(t, f, m, em, 3.0)
        got_blocks = emcl_scores(tb, fb, mb, em, 3.0)
        # bf16 features, as the encoders give them under autocast: scored in fp32 all the same
        got_bf16_in = emcl_scores(t.bfloat16(), f.bfloat16(), m, em, 3.0)
    assert got.dtype == torch.float32 and got_blocks.dtype == torch.float32
    assert (got - ref).abs().max() < 1e-5
    assert (got_blocks - ref_blocks).abs().max() < 1e-5
    want_bf16_in = emcl_scores(t.bfloat16().float(), f.bfloat16().float(), m, em, 3.0)
    assert got_bf16_in.dtype == torch.float32 and (got_bf16_in - want_bf16_in).abs().max() < 1e-5
    # the same holds with EMCL off and in training (mu update), and the updated state is the same
    no_em = emcl_scores(t, f, m, None, 3.0)
    assert (no_em - _autocast_call(emcl_scores, t, f, m, None, 3.0)).abs().max() < 1e-5
    em_a, em_b = EMCL(k=32, stage_num=9).train(), EMCL(k=32, stage_num=9).train()
    em_b.load_state_dict(em_a.state_dict())
    s_a = emcl_scores(t, f, m, em_a, 3.0, update=True)
    s_b = _autocast_call(emcl_scores, t, f, m, em_b, 3.0, update=True)
    assert (s_a - s_b).abs().max() < 1e-5 and torch.allclose(em_a.mu, em_b.mu, atol=1e-6)


def _autocast_call(fn, *args, **kwargs):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return fn(*args, **kwargs)


def test_training_loss_and_gradients_under_bf16_autocast_equal_fp32():
    """The loss on given features (what follows the encoders) and its gradient do not depend on autocast."""
    from video_retrieval.emcl_net.model import emcl_scores

    t, f, m = _unit_features(16, 16, 6, 256, seed=8)
    out = {}
    for name in ("fp32", "bf16"):
        tt, ff = t.clone().requires_grad_(), f.clone().requires_grad_()
        em = EMCL(k=16, stage_num=5).train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
            s = emcl_scores(tt, ff, m, em, 3.0, update=True)
            loss = F.cross_entropy(100 * s, torch.arange(16))
        loss.backward()
        out[name] = (loss.detach(), tt.grad, ff.grad)
    assert abs(out["bf16"][0] - out["fp32"][0]) < 1e-4
    for a, b in zip(out["bf16"][1:], out["fp32"][1:]):
        assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("mode", ["paper", "query", "none"])
def test_score_matrix_under_bf16_autocast_equals_fp32(mode):
    """score_matrix turns autocast off around any score_fn, here one that does not do it itself."""
    t, f, m = _unit_features(40, 36, 5, 512, seed=9)
    em = EMCL(k=32, stage_num=9).eval()

    def plain(tb, fb, mb):  # pooling + EM + cosine with no autocast handling of its own
        assert not torch.is_autocast_enabled("cpu") and tb.dtype == fb.dtype == torch.float32
        v = pair_video_vectors(tb, fb, mb, 3.0)
        if mode != "none":
            a, b, d = v.shape[-3], v.shape[-2], v.shape[-1]
            x = torch.cat([v.reshape(*v.shape[:-3], a * b, d), tb.expand(*v.shape[:-3], a, d)], dim=-2)
            x = F.normalize(x + em.beta * em_reconstruct(x, em.mu, em.stage_num, em.lamd)[0], dim=-1)
            v, tb = x[..., : a * b, :].reshape(*v.shape[:-3], a, b, d), x[..., a * b :, :]
        return torch.einsum("...ad,...abd->...ab", F.normalize(tb, dim=-1), F.normalize(v, dim=-1))

    ref = score_matrix(plain, t, f, m, mode=mode, block=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = score_matrix(plain, t, f, m, mode=mode, block=16)
        got_bf16_in = score_matrix(plain, t.bfloat16(), f.bfloat16(), m, mode=mode, block=16)
    assert got.dtype == torch.float32 and (got - ref).abs().max() < 1e-5
    want = score_matrix(plain, t.bfloat16().float(), f.bfloat16().float(), m, mode=mode, block=16)
    assert (got_bf16_in - want).abs().max() < 1e-5


# ----------------------------------------------------------------------------- multi-positive loss


def test_forward_with_video_ids_uses_the_multi_positive_loss_and_gathers_them(model):
    from emcl.loss import multi_positive_ce, symmetric_ce

    ids, tmask, frames, fmask = batch(n=6, seed=4)
    with torch.no_grad():
        t, f = model.encode_text(ids, tmask), model.encode_video(frames, fmask)
        s = model.logit_scale.exp() * model.scores(t, f, fmask)
        distinct = torch.arange(6)
        shared = torch.tensor([0, 1, 0, 2, 1, 3])
        assert torch.allclose(model(ids, tmask, frames, fmask), symmetric_ce(s), atol=1e-5)
        plain = model(ids, tmask, frames, fmask, video_ids=distinct)
        assert torch.allclose(plain, symmetric_ce(s), atol=1e-5)
        got = model(ids, tmask, frames, fmask, video_ids=shared)
        assert torch.allclose(got, multi_positive_ce(s, shared), atol=1e-5)
        assert not torch.allclose(got, symmetric_ce(s), atol=1e-3)
        # the ids travel through the rank gather like the features (here: a fake 2-rank gather)
        seen = []

        def gather(x):
            seen.append(x.dtype)
            return torch.cat([x, x.flip(0)])

        two = model(ids, tmask, frames, fmask, gather=gather, video_ids=shared)
        s2 = model.logit_scale.exp() * model.scores(torch.cat([t, t.flip(0)]), torch.cat([f, f.flip(0)]),
                                                    torch.cat([fmask, fmask.flip(0)]))
        assert torch.long in seen
        assert torch.allclose(two, multi_positive_ce(s2, torch.cat([shared, shared.flip(0)])), atol=1e-5)
