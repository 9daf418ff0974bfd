"""Retrieval metrics against hand-computed ranks and an independent numpy/argsort implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emcl.metrics import (
    CAPTION_DIRECTIONS,
    DIRECTIONS,
    RANK_KEYS,
    dsl,
    dsl_t2v,
    dsl_v2t,
    evaluate_similarity,
    format_table,
    gt_ranks,
    metrics_from_ranks,
    retrieval_metrics,
    t2v_metrics,
    v2t_metrics,
    v2t_ranks,
)


def numpy_ranks(sim: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Independent ranks: position of the ground truth in a stable descending argsort, 1-based."""
    order = np.argsort(-sim, axis=1, kind="stable")
    return np.array([int(np.nonzero(order[q] == gt[q])[0][0]) + 1 for q in range(sim.shape[0])])


def numpy_metrics(ranks: np.ndarray) -> dict[str, float]:
    out = {f"R{k}": 100.0 * float(np.mean(ranks <= k)) for k in (1, 5, 10, 50)}
    out["MdR"] = float(np.median(ranks))
    out["MnR"] = float(np.mean(ranks))
    return out


def assert_metrics_close(got: dict, want: dict) -> None:
    assert set(got) == set(RANK_KEYS)
    for k in RANK_KEYS:
        assert got[k] == pytest.approx(want[k], abs=1e-9), k


def test_hand_computed_ranks_and_metrics():
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.2, 0.0],  # gt col 0 is the best: rank 1
            [0.8, 0.5, 0.7, 0.1],  # gt col 1: 0.8 and 0.7 are higher: rank 3
            [0.1, 0.2, 0.3, 0.4],  # gt col 2: only 0.4 higher: rank 2
            [0.5, 0.6, 0.7, 0.0],  # gt col 3: worst: rank 4
        ]
    )
    ranks = gt_ranks(sim)
    assert ranks.tolist() == [1, 3, 2, 4]
    m = retrieval_metrics(sim)
    assert m["R1"] == pytest.approx(25.0)
    assert m["R5"] == pytest.approx(100.0)
    assert m["R10"] == pytest.approx(100.0)
    assert m["MdR"] == pytest.approx(2.5)  # even count: mean of the two middle ranks 2 and 3
    assert m["MnR"] == pytest.approx(2.5)
    # odd count median, explicit gt
    m3 = retrieval_metrics(sim[:3], torch.tensor([0, 1, 2]))
    assert m3["MdR"] == pytest.approx(2.0)
    assert m3["MnR"] == pytest.approx(2.0)
    assert m3["R1"] == pytest.approx(100 / 3)


def test_explicit_gt_and_r50():
    torch.manual_seed(0)
    sim = torch.rand(3, 60)
    gt = torch.tensor([5, 7, 59])
    # place the ground truth at exact ranks 1, 10 and 51
    for q, want in enumerate([1, 10, 51]):
        order = torch.argsort(sim[q], descending=True)
        others = order[order != gt[q]]
        row = torch.empty(60)
        row[others] = torch.linspace(1.0, 0.0, 59)
        row[gt[q]] = (row[others[want - 2]] + row[others[want - 1]]) / 2 if want > 1 else 2.0
        sim[q] = row
    assert gt_ranks(sim, gt).tolist() == [1, 10, 51]
    m = retrieval_metrics(sim, gt)
    assert m["R1"] == pytest.approx(100 / 3)
    assert m["R5"] == pytest.approx(100 / 3)
    assert m["R10"] == pytest.approx(200 / 3)
    assert m["R50"] == pytest.approx(200 / 3)
    assert m["MdR"] == 10.0
    assert m["MnR"] == pytest.approx(62 / 3)


def test_ties_optimistic_pessimistic_and_average():
    sim = torch.tensor(
        [
            [0.5, 0.5, 0.5],  # all tied: optimistic 1, pessimistic 3
            [0.9, 0.5, 0.5],  # one strictly higher, one tie: optimistic 2, pessimistic 3
            [0.1, 0.2, 0.3],  # no tie: 1 both ways
        ]
    )
    assert gt_ranks(sim).tolist() == [1, 2, 1]
    assert gt_ranks(sim, ties="pessimistic").tolist() == [3, 3, 1]
    assert gt_ranks(sim, ties="average").tolist() == [2.0, 2.5, 1.0]  # the reference MMT's averaging
    # v2t against all captions averages too: video 0's best caption ties with one other caption
    cv = torch.tensor([0, 0, 1])
    sim_tv = torch.tensor([[0.7, 0.1], [0.2, 0.9], [0.7, 0.3]])
    assert v2t_ranks(sim_tv, cv, ties="average", candidates="captions").tolist() == [1.5, 2.0]
    const = torch.ones(5, 5)
    assert retrieval_metrics(const)["R1"] == 100.0  # the documented optimistic-tie caveat
    assert retrieval_metrics(const, ties="pessimistic")["R1"] == 0.0
    with pytest.raises(ValueError, match="ties"):
        gt_ranks(sim, ties="random")


def test_random_matrix_matches_numpy_argsort():
    rng = np.random.default_rng(1)
    sim = rng.standard_normal((200, 150)).astype(np.float32)  # continuous: no ties
    gt = rng.integers(0, 150, size=200)
    want = numpy_ranks(sim, gt)
    got = gt_ranks(torch.from_numpy(sim), torch.from_numpy(gt))
    np.testing.assert_array_equal(got.numpy(), want)
    assert_metrics_close(retrieval_metrics(torch.from_numpy(sim), torch.from_numpy(gt)), numpy_metrics(want))
    # 1:1 square, default diagonal ground truth; float64 input gives the same ranks
    sq = rng.standard_normal((120, 120)).astype(np.float32)
    want = numpy_ranks(sq, np.arange(120))
    assert_metrics_close(retrieval_metrics(torch.from_numpy(sq)), numpy_metrics(want))
    assert retrieval_metrics(torch.from_numpy(sq).double()) == retrieval_metrics(torch.from_numpy(sq))


def test_multi_caption_t2v_and_v2t_best_caption():
    # videos 0 and 2 have one caption, video 1 has three (captions 1, 2, 3)
    caption_video = torch.tensor([0, 1, 1, 1, 2])
    sim = torch.tensor(
        [
            # v0   v1   v2
            [0.9, 0.1, 0.0],  # c0 (v0): rank 1
            [0.8, 0.2, 0.1],  # c1 (v1): 0.8 higher: rank 2
            [0.1, 0.7, 0.9],  # c2 (v1): 0.9 higher: rank 2
            [0.0, 0.6, 0.3],  # c3 (v1): best: rank 1
            [0.5, 0.8, 0.4],  # c4 (v2): rank 3
        ]
    )
    m_t2v = t2v_metrics(sim, caption_video)
    ranks_t2v = np.array([1, 2, 2, 1, 3])
    assert_metrics_close(m_t2v, numpy_metrics(ranks_t2v))
    # v2t, ranking all 5 captions per video column:
    # v0 column [0.9, 0.8, 0.1, 0.0, 0.5]: its caption c0 (0.9) is first -> 1
    # v1 column [0.1, 0.2, 0.7, 0.6, 0.8]: its captions c1=0.2 (rank 5), c2=0.7 (rank 2), c3=0.6 (rank 3);
    #   best is 2 (c4 of video 2 scores 0.8 above all of them)
    # v2 column [0.0, 0.1, 0.9, 0.3, 0.4]: its caption c4=0.4 is below 0.9 -> 2
    assert v2t_ranks(sim, caption_video, candidates="captions").tolist() == [1, 2, 2]
    assert_metrics_close(
        v2t_metrics(sim, caption_video, candidates="captions"), numpy_metrics(np.array([1, 2, 2]))
    )
    # The reference protocol collapses each video's captions to its best score first:
    # v1 column groups: g0=0.1, g1=max(0.2,0.7,0.6)=0.7, g2=0.8 -> rank 2; v2 column: g0=0.0, g1=0.9,
    # g2=0.4 -> rank 2; v0: g0=0.9, g1=0.8, g2=0.5 -> 1.
    assert v2t_ranks(sim, caption_video, candidates="videos").tolist() == [1, 2, 2]
    # a case where the two protocols differ: two captions of video 0 both beat video 1's caption
    sim2 = torch.tensor([[0.0, 0.9], [0.0, 0.8], [0.0, 0.5]])
    cv2 = torch.tensor([0, 0, 1])
    assert v2t_ranks(sim2, cv2, candidates="captions").tolist() == [1, 3]
    assert v2t_ranks(sim2, cv2, candidates="videos").tolist() == [1, 2]
    assert v2t_ranks(sim2, cv2).tolist() == [1, 2]  # the reference's protocol is the default


def test_multi_caption_v2t_random_matches_numpy():
    rng = np.random.default_rng(2)
    n_vid = 40
    caps = rng.integers(1, 4, size=n_vid)  # 1..3 captions per video
    cv = np.repeat(np.arange(n_vid), caps)
    rng.shuffle(cv)
    sim = rng.standard_normal((cv.size, n_vid))
    sim_vt = sim.T
    want = []
    for v in range(n_vid):
        r = numpy_ranks(np.repeat(sim_vt[v : v + 1], caps[v], axis=0), np.nonzero(cv == v)[0])
        want.append(r.min())
    got = v2t_ranks(torch.from_numpy(sim), torch.from_numpy(cv), candidates="captions")
    np.testing.assert_array_equal(got.numpy(), np.array(want))
    # the reference's V x V protocol: max over each video's captions, then rank the diagonal
    group = np.stack([sim[cv == g].max(axis=0) for g in range(n_vid)])  # [group, video]
    np.testing.assert_array_equal(
        v2t_ranks(torch.from_numpy(sim), torch.from_numpy(cv)).numpy(),
        numpy_ranks(group.T, np.arange(n_vid)),
    )
    np.testing.assert_array_equal(
        gt_ranks(torch.from_numpy(sim), torch.from_numpy(cv)).numpy(), numpy_ranks(sim, cv)
    )


def test_one_to_one_v2t_is_transpose():
    torch.manual_seed(3)
    sim = torch.randn(30, 30)
    assert v2t_metrics(sim) == retrieval_metrics(sim.T)
    assert v2t_metrics(sim, torch.arange(30), candidates="videos") == retrieval_metrics(sim.T)


def test_dsl_matches_numpy_formula():
    rng = np.random.default_rng(4)
    sim = rng.uniform(-0.2, 0.6, size=(12, 9))

    def np_softmax(x, axis):
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)

    t = torch.from_numpy(sim)
    want_t2v = sim * np_softmax(sim / 0.01, axis=0) * sim.shape[0]  # over texts, n = T
    want_v2t = sim * np_softmax(sim / 0.01, axis=1) * sim.shape[1]  # over videos, n = V
    np.testing.assert_allclose(dsl_t2v(t).numpy(), want_t2v, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dsl_v2t(t).numpy(), want_v2t, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        dsl(t, dim=0, temperature=0.05).numpy(), sim * np_softmax(sim / 0.05, axis=0) * 12, rtol=1e-10
    )
    # columns of the t2v prior sum to one across texts
    np.testing.assert_allclose((dsl_t2v(t) / t / 12).sum(0).numpy(), np.ones(9), rtol=1e-9)
    with pytest.raises(ValueError, match="non-finite"):
        dsl_t2v(torch.tensor([[0.0, float("-inf")], [1.0, 0.0]]))


def test_dsl_changes_ranks_with_a_hub():
    # video 0 is a hub: high score for every text; text 1 belongs to video 1 but video 0 scores higher
    sim = torch.tensor([[0.90, 0.10, 0.10], [0.80, 0.75, 0.10], [0.85, 0.10, 0.70]])
    raw = evaluate_similarity(sim)
    assert raw["t2v"]["R1"] == pytest.approx(100 / 3)
    assert raw["t2v_dsl"]["R1"] == pytest.approx(100.0)  # the prior penalises the hub
    # raw rows are computed on the raw matrix only
    assert raw["t2v"] == t2v_metrics(sim)
    assert raw["v2t"] == v2t_metrics(sim)
    assert raw["v2t_dsl"] == v2t_metrics(dsl_v2t(sim))


def test_evaluate_similarity_multi_caption_and_table():
    torch.manual_seed(5)
    cv = torch.tensor([0, 0, 0, 1, 2, 2])
    sim = torch.randn(6, 3)
    res = evaluate_similarity(sim, cv)
    assert list(res) == list(DIRECTIONS) + list(CAPTION_DIRECTIONS)
    assert res["t2v"] == t2v_metrics(sim, cv)
    assert res["v2t"] == v2t_metrics(sim, cv, candidates="videos")
    assert res["t2v_dsl"] == t2v_metrics(dsl_t2v(sim), cv)
    assert res["v2t_dsl"] == v2t_metrics(dsl_v2t(sim), cv, candidates="videos")
    assert res["v2t_captions"] == v2t_metrics(sim, cv, candidates="captions")
    assert res["v2t_captions_dsl"] == v2t_metrics(dsl_v2t(sim), cv, candidates="captions")
    table = format_table(res)
    lines = table.splitlines()
    assert len(lines) == 2 + 6 + 1  # header, rule, six rows, the note on the two v2t protocols
    assert len({len(line) for line in lines[:-1]}) == 1  # fixed width
    assert "v2t_captions" in lines[-1] and "reference" in lines[-1]
    for key in RANK_KEYS:
        assert key in lines[0]
    assert [line.split()[0] for line in lines[2:-1]] == list(DIRECTIONS) + list(CAPTION_DIRECTIONS)
    # 1:1 data: the two protocols coincide, so no extra rows and no note
    one = evaluate_similarity(torch.randn(5, 5))
    assert list(one) == list(DIRECTIONS) and len(format_table(one).splitlines()) == 2 + 4
    assert f"{res['t2v']['MnR']:.1f}" in lines[2]
    assert "-" in format_table({"t2v": {"R1": 1.0}}).splitlines()[2]
    # non-row entries (eval_block, nested policies) are not printed as rows
    nested = {**res, "eval_block": "paper", "policies": {"paper": {"t2v": res["t2v"]}}}
    assert format_table(nested) == table


def test_multi_caption_v2t_reference_protocol_beside_all_captions():
    """Hand-built: video 0 has three captions, videos 1 and 2 one each (T=5, V=3).

    Video 1's column: its caption c3 scores 0.6; captions c0 (0.9) and c1 (0.7) of video 0 score higher.
    All-captions protocol: rank 3. The reference's V x V protocol: video 0's group counts once, by its
    best caption (0.9), so video 1 ranks 2. Video 2: own caption 0.8, only c2 (0.85) above -> 2 either way.
    """
    cv = torch.tensor([0, 0, 0, 1, 2])
    sim = torch.tensor(
        [
            # v0   v1    v2
            [0.95, 0.9, 0.1],  # c0 (v0)
            [0.30, 0.7, 0.2],  # c1 (v0)
            [0.20, 0.1, 0.85],  # c2 (v0)
            [0.10, 0.6, 0.3],  # c3 (v1)
            [0.00, 0.2, 0.8],  # c4 (v2)
        ]
    )
    assert v2t_ranks(sim, cv).tolist() == [1, 2, 2]
    assert v2t_ranks(sim, cv, candidates="captions").tolist() == [1, 3, 2]
    res = evaluate_similarity(sim, cv)
    assert res["v2t"]["R1"] == pytest.approx(100 / 3) and res["v2t"]["MnR"] == pytest.approx(5 / 3)
    assert res["v2t_captions"]["R1"] == pytest.approx(100 / 3) and res["v2t_captions"]["MnR"] == 2.0
    assert res["v2t_captions"]["MdR"] == 2.0 and res["v2t"]["MdR"] == 2.0
    # t2v: c0 -> v0 rank 1, c1 -> v0 (0.3 < 0.7) rank 2, c2 -> v0 (0.2 < 0.85) rank 2, c3, c4 rank 1
    assert gt_ranks(sim, cv).tolist() == [1, 2, 2, 1, 1]
    # the caller can still choose the all-captions protocol as the headline v2t; the extra rows stay
    swapped = evaluate_similarity(sim, cv, v2t_candidates="captions")
    assert swapped["v2t"] == res["v2t_captions"]
    table = format_table(res)
    assert "v2t_captions " in table and "v2t_captions_dsl" in table


def test_metrics_from_ranks_and_bad_inputs():
    assert_metrics_close(
        metrics_from_ranks(torch.tensor([1, 1, 60, 7])), numpy_metrics(np.array([1, 1, 60, 7]))
    )
    with pytest.raises(ValueError, match="1-based"):
        metrics_from_ranks(torch.tensor([0, 1]))
    nan = torch.zeros(3, 3)
    nan[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"NaN.*row 1, column 2"):
        retrieval_metrics(nan)
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="non-square"):
        retrieval_metrics(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="no caption"):
        v2t_metrics(torch.zeros(3, 3), torch.tensor([0, 0, 2]))
    with pytest.raises(ValueError, match="shape"):
        t2v_metrics(torch.zeros(3, 3), torch.tensor([0, 1]))
    # -inf marks a masked pair and simply ranks last
    masked = torch.eye(3)
    masked[0, 1] = float("-inf")
    assert gt_ranks(masked).tolist() == [1, 1, 1]
