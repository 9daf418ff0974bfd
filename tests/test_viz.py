"""Figures: the modality-gap numbers against their definitions on fabricated embeddings, the PCA view,
the curves from a fabricated metrics.json, and the figure commands on a tiny run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from emcl.em import EMCL
from emcl.viz.curves import curve_data, draw_curves
from emcl.viz.modality_gap import (
    apply_emcl,
    centroid_distance,
    gap_embeddings,
    pca_2d,
    pick_captions,
    probe_accuracy,
    video_vectors,
)

try:
    from tests._run_fixtures import make_run
except ImportError:  # run from inside tests/
    from _run_fixtures import make_run

PNG = b"\x89PNG\r\n\x1a\n"


def test_centroid_distance_definition():
    t = torch.zeros(5, 3)
    t[:, 0] = 1.0
    v = torch.zeros(7, 3)
    v[:, 1] = 1.0
    assert centroid_distance(t, v) == pytest.approx(math.sqrt(2))
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 6, generator=g), torch.randn(30, 6, generator=g) + 2.0
    assert centroid_distance(a, b) == pytest.approx(float((a.mean(0) - b.mean(0)).norm()), rel=1e-6)
    assert centroid_distance(a, a) == 0.0


def test_probe_separable_and_inseparable():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(200, 8, generator=g)
    b = torch.randn(200, 8, generator=g)
    b[:, 3] += 8.0  # separated along one axis
    assert probe_accuracy(a, b) == 1.0
    # the same distribution: a held-out probe is at chance
    a, b = torch.randn(2000, 4, generator=g), torch.randn(2000, 4, generator=g)
    assert abs(probe_accuracy(a, b) - 0.5) < 0.04
    # partly overlapping: between the two, near the Bayes accuracy Phi(d/2) for a shift d = 1
    a, b = torch.randn(2000, 4, generator=g), torch.randn(2000, 4, generator=g)
    b[:, 0] += 1.0
    bayes = 0.5 * (1 + math.erf(0.5 / math.sqrt(2)))
    assert probe_accuracy(a, b) == pytest.approx(bayes, abs=0.03)
    with pytest.raises(ValueError, match="at least 2 rows"):
        probe_accuracy(a[:1], b)


def test_probe_is_balanced_on_unequal_sets():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(1000, 4, generator=g), torch.randn(100, 4, generator=g)
    # predicting the larger set everywhere would score 0.91 plain accuracy; balanced accuracy stays at chance
    assert abs(probe_accuracy(a, b) - 0.5) < 0.08


def test_pca_shared_projection_is_an_isometry_of_a_plane():
    g = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(10, 2, generator=g))[0]  # a plane in 10-D
    pts = [torch.randn(20, 2, generator=g) @ basis.T + 0.5 for _ in range(3)]
    proj, frac = pca_2d(pts)
    assert [p.shape for p in proj] == [(20, 2)] * 3
    assert sum(frac) == pytest.approx(1.0, abs=1e-9)
    both = torch.cat(pts).double()
    flat = torch.from_numpy(__import__("numpy").concatenate(proj))
    assert torch.allclose(torch.cdist(both, both), torch.cdist(flat, flat), atol=1e-6)


def test_video_vectors_masked_mean():
    f = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    v = video_vectors(f, m)
    assert torch.equal(v[0], (f[0, 0] + f[0, 1]) / 2)
    assert torch.equal(v[1], f[1, 0])


def test_gap_embeddings_definitions():
    g = torch.Generator().manual_seed(4)
    t, v = torch.randn(12, 16, generator=g) * 5, torch.randn(12, 16, generator=g) * 5 + 1
    layer = EMCL(k=4, stage_num=3, beta=3.0, init="gaussian", seed=0).eval()
    emb = gap_embeddings(t, v, layer)
    x = torch.cat([v, t])
    assert torch.allclose(emb["without_emcl"][0], F.normalize(t, dim=-1))
    assert torch.allclose(emb["without_emcl"][1], F.normalize(v, dim=-1))
    with torch.no_grad():
        y = F.normalize(layer(x), dim=-1)  # the layer itself, eval mode: no mu update
    assert torch.allclose(emb["with_emcl"][1], y[:12], atol=1e-6)
    assert torch.allclose(emb["with_emcl"][0], y[12:], atol=1e-6)
    assert not torch.allclose(apply_emcl(x, layer), x)
    layer.beta = 0.0
    emb0 = gap_embeddings(t, v, layer)
    assert torch.allclose(emb0["with_emcl"][0], emb0["without_emcl"][0])


def test_pick_captions_first_per_valid_video():
    caps, vids = pick_captions([1, 0, 0, 2, 1, 3], [True, True, False, True])
    assert vids == [0, 1, 3] and caps == [1, 0, 5]


def _history(n: int, lr: bool = True) -> list[dict]:
    recs = []
    for e in range(1, n + 1):
        r = {"epoch": e, "step": 10 * e, "loss": 3.0 / e, "val": {"t2v": {"R1": 10.0 * e, "R5": 50.0}}}
        if lr:
            r["lr"] = 1e-3 / e
        recs.append(r)
    return recs


def test_curves_from_fabricated_metrics(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"train": {"history": _history(4)}, "test": {}}))
    data = curve_data(json.loads((tmp_path / "metrics.json").read_text()))
    assert data["epoch"] == [1, 2, 3, 4] and data["loss"][1] == 1.5 and data["lr"][3] == 2.5e-4
    assert data["r1"] == [10.0, 20.0, 30.0, 40.0] and data["r1_split"] == "val"
    out = draw_curves(tmp_path)
    assert out == tmp_path / "curves.png" and out.read_bytes().startswith(PNG)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left nothing behind


def test_curves_missing_parts(tmp_path):
    hist = _history(3, lr=False)
    del hist[1]["val"]
    hist[2]["test"] = hist[2].pop("val")
    (tmp_path / "metrics.json").write_text(json.dumps({"train": {"history": hist}}))
    data = curve_data(json.loads((tmp_path / "metrics.json").read_text()))
    assert data["lr"] == [None] * 3 and data["r1"] == [10.0, None, 30.0] and data["r1_split"] == "test/val"
    assert draw_curves(tmp_path) is not None
    (tmp_path / "metrics.json").write_text(json.dumps({"test": {"t2v": {"R1": 1}}}))
    assert draw_curves(tmp_path) is None  # eval-only run: nothing to draw
    (tmp_path / "metrics.json").write_text("{not json")
    assert draw_curves(tmp_path) is None
    assert draw_curves(tmp_path / "nowhere") is None


def _hashes(folder) -> dict[str, str]:
    """sha256 of every file directly in ``folder``, by name."""
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def test_figure_commands_on_a_tiny_run(tmp_path, capsys):
    from emcl.viz import examples, modality_gap

    run, _ = make_run(tmp_path)
    before = _hashes(run)
    res = modality_gap.main(["--run", str(run)])
    saved = json.loads((run / "modality_gap" / "modality_gap.json").read_text())
    assert (run / "modality_gap" / "modality_gap.png").read_bytes().startswith(PNG)
    for key in ("centroid_distance", "probe_accuracy"):
        assert set(saved[key]) == {"without_emcl", "with_emcl"}
        assert saved[key] == pytest.approx(res[key])
    assert saved["num_videos"] == saved["num_texts"] == 5
    assert 0.0 <= saved["centroid_distance"]["with_emcl"] <= 2.0
    out = capsys.readouterr().out
    assert "centroid distance" in out and "probe accuracy" in out

    summary = examples.main(["--run", str(run), "-n", "3", "-k", "2"])
    assert (run / "examples" / "examples.png").read_bytes().startswith(PNG)
    page = (run / "examples" / "examples.html").read_text()
    assert len(summary["queries"]) == 3 and all(len(q["top"]) == 2 for q in summary["queries"])
    first = summary["queries"][0]["top"][0]["video_id"]
    assert f">{first}</a>" in page and "../../data/videos/" in page  # links to the video files
    scores = [t["score"] for q in summary["queries"] for t in q["top"]]
    assert all(-1.0 <= s <= 1.0 for s in scores)
    # the run's own files are untouched; each command wrote only into its folder, and left no lock
    assert _hashes(run) == before
    assert sorted(p.name for p in (run / "examples").iterdir()) == ["examples.html", "examples.json",
                                                                     "examples.png"]
    assert sorted(p.name for p in (run / "modality_gap").iterdir()) == ["modality_gap.json",
                                                                         "modality_gap.png"]
