"""Search: the index round-trips (features equal the model's, queries score as the model does, JSON output),
frame-cache reuse, an unreadable video named and the rest indexed, and eval agreeing with the metrics."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from emcl import search
from emcl.data.video import read_frames
from emcl.errors import UserError
from emcl.metrics import t2v_metrics
from emcl.train.runs import load_run, similarity

try:
    from tests._run_fixtures import make_run
except ImportError:  # run from inside tests/
    from _run_fixtures import make_run


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    run, cfg = make_run(root, num_videos=10)
    videos = Path(cfg.video_path)
    (videos / "zz_broken.mp4").write_bytes(b"this is not a video")
    idx = root / "idx"
    meta = search.build_index(videos, run / "checkpoint_best.pt", idx, progress=False)
    return {"root": root, "run": run, "cfg": cfg, "videos": videos, "idx": idx, "meta": meta}


def test_index_holds_the_models_features(built):
    meta, cfg = built["meta"], built["cfg"]
    ids = sorted(p.stem for p in built["videos"].iterdir() if p.stem != "zz_broken")
    assert meta["video_ids"] == ids
    assert list(meta["failed"]) == ["zz_broken"] and "zz_broken.mp4" in meta["failed"]["zz_broken"]
    data = torch.load(built["idx"] / "features.pt", weights_only=True)
    run = load_run(checkpoint=built["run"] / "checkpoint_best.pt")
    i = ids.index(ids[3])
    frames, mask = read_frames(built["videos"] / meta["paths"][i], framerate=cfg.video_framerate,
                               max_frames=cfg.max_frames, size=cfg.image_size)
    with torch.no_grad():
        want = run.model.encode_video(frames[None], mask[None])[0]
    assert torch.allclose(data["frames"][i], want, atol=1e-5)
    assert torch.equal(data["mask"][i].long(), mask)


def test_unreadable_video_is_named(built, tmp_path, capsys, caplog):
    with caplog.at_level(logging.WARNING, logger="emcl.search"):
        search.main(["index", str(built["videos"]), "--checkpoint", str(built["run"] / "checkpoint_best.pt"),
                     "--out", str(tmp_path / "idx2")])
    assert any("zz_broken.mp4" in r.getMessage() for r in caplog.records)
    err = capsys.readouterr().err
    assert "zz_broken" in err and "left out" in err
    assert len(json.loads((tmp_path / "idx2" / "index.json").read_text())["video_ids"]) == 10


def test_query_json_matches_the_models_scores(built, capsys):
    res = search.main(["query", str(built["idx"]), "a red ball moves left", "-k", "3", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["results"] == res["results"] and len(printed["results"]) == 3
    assert [r["rank"] for r in printed["results"]] == [1, 2, 3]
    assert set(printed["timing_ms"]) >= {"encode_text", "score_and_rank", "search", "command"}
    # the same scores as the model's own scoring without EMCL on these clips
    index = search.Index(built["idx"])
    from emcl.clip import tokenize

    ids, mask = tokenize(["a red ball moves left"], index.run.cfg.max_words)
    with torch.no_grad():
        t = index.run.model.encode_text(ids, mask)
    sim = similarity(index.run, t, index.frames, index.mask, "none")[0]
    order = sim.argsort(descending=True)[:3].tolist()
    assert [r["video_id"] for r in res["results"]] == [index.ids[i] for i in order]
    assert [r["score"] for r in res["results"]] == pytest.approx(sim[order].tolist(), abs=1e-5)
    assert all(os.path.isfile(r["path"]) for r in res["results"])


def test_query_with_emcl_rescoring(built):
    index = search.Index(built["idx"])
    plain = search.query(index, "two blue squares", k=4)
    res = search.query(index, "two blue squares", k=4, use_emcl=True, rerank=6)
    assert len(res["results"]) == 4 and res["emcl"]
    scores = [r["score"] for r in res["results"]]
    assert scores == sorted(scores, reverse=True)
    # re-scored candidates come from the plain top 6, and keep their plain score beside
    top6 = {r["video_id"] for r in search.query(index, "two blue squares", k=6)["results"]}
    assert {r["video_id"] for r in res["results"]} <= top6
    by_id = {r["video_id"]: r["score"] for r in search.query(index, "two blue squares", k=10)["results"]}
    for r in res["results"]:
        assert r["score_without_emcl"] == pytest.approx(by_id[r["video_id"]], abs=1e-5)
    # EMCL over [candidates; text] equals the query policy run on those candidates
    t = index.encode(["two blue squares"])
    cand = [index.ids.index(v) for v in sorted(top6)]
    sim = similarity(index.run, t, index.frames[cand], index.mask[cand], "query")[0]
    want = sorted(zip(sim.tolist(), sorted(top6)), reverse=True)[:4]
    assert [r["video_id"] for r in res["results"]] == [v for _, v in want]
    assert plain["results"][0]["score"] != pytest.approx(res["results"][0]["score"], abs=1e-9)


def test_eval_agrees_with_the_metrics(built, capsys):
    index = search.Index(built["idx"])
    run = index.run
    split = run.split("test")
    res = search.evaluate(index, "test", k=2, gallery="split")
    t, f, m, ok = run.features(split)
    sim = similarity(run, t, f, m, "none")
    want = t2v_metrics(sim, torch.tensor(split.caption_video))
    assert res["num_queries"] == len(split.captions) and res["num_videos"] == len(split.video_ids)
    for k in ("R1", "R5", "R10"):
        assert res["recall"][k] == pytest.approx(want[k], abs=1e-9)
    everything = search.main(["eval", str(built["idx"]), "-k", "2", "--json"])
    assert everything["num_videos"] == 10 and 0.0 <= everything["hit_rate"] <= 1.0
    assert json.loads(capsys.readouterr().out)["hit_rate"] == everything["hit_rate"]


def test_eval_counts_videos_with_the_same_content(built, capsys):
    """--attributes: a video with the caption's video's count, colour, shape and motion (and background)
    among the top k counts, as computed here from the attributes and the plain top k."""
    from emcl.data.synthetic import load_attributes

    data = Path(built["cfg"].anno_path).parent
    res = search.main(["eval", str(built["idx"]), "-k", "2", "--attributes", str(data)])
    out = capsys.readouterr().out
    assert "same count, colour, shape and motion in the top 2" in out
    attrs = load_attributes(data)
    index = search.Index(built["idx"])
    split = index.run.split("test")
    top = index.search(index.encode(split.captions), 2)["index"].tolist()

    def key(vid, bg):
        a = attrs[vid]
        return (a.count, a.color, a.shape, a.motion) + ((a.background,) if bg else ())

    for name, bg in (("hit_rate_same_content", False), ("hit_rate_same_content_and_background", True)):
        want = sum(any(key(index.ids[i], bg) == key(split.video_ids[split.caption_video[c]], bg) for i in row)
                   for c, row in enumerate(top)) / len(split.captions)
        assert res[name] == pytest.approx(want)
    assert res["hit_rate_same_content"] >= res["hit_rate_same_content_and_background"] >= res["hit_rate"]
    with pytest.raises(UserError, match="--attributes"):
        search.evaluate(index, attributes=str(built["root"]))


def test_frame_cache_reused_only_when_current(built, tmp_path):
    from emcl.data.cache import build_cache

    cfg = built["cfg"]
    cache = tmp_path / "frames.h5"
    build_cache(built["videos"], cache, max_frames=cfg.max_frames, framerate=cfg.video_framerate,
                size=cfg.image_size, skip_bad_videos=True, progress=False)
    meta = search.build_index(built["videos"], built["run"] / "checkpoint_best.pt", tmp_path / "idx",
                              frame_cache=str(cache), progress=False)
    assert meta["num_from_frame_cache"] == 10
    a = torch.load(tmp_path / "idx" / "features.pt", weights_only=True)
    b = torch.load(built["idx"] / "features.pt", weights_only=True)
    assert torch.allclose(a["frames"], b["frames"], atol=1e-5)
    # a video file changed after caching is decoded again
    first = built["videos"] / meta["paths"][0]
    st = first.stat()
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = search.build_index(built["videos"], built["run"] / "checkpoint_best.pt", tmp_path / "idx3",
                               frame_cache=str(cache), progress=False)
    assert again["num_from_frame_cache"] == 9


def test_bad_inputs(built, tmp_path):
    with pytest.raises(UserError, match="no index.json"):
        search.Index(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        search.build_index(tmp_path / "none", built["run"] / "checkpoint_best.pt", tmp_path / "i")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "bad.mp4").write_bytes(b"junk")
    with pytest.raises(UserError, match="none of the 1 video"):
        search.build_index(empty, built["run"] / "checkpoint_best.pt", tmp_path / "i", progress=False)
    # an index whose checkpoint changed since it was built
    ck = tmp_path / "ck.pt"
    ck.write_bytes((built["run"] / "checkpoint_best.pt").read_bytes())
    search.build_index(built["videos"], ck, tmp_path / "i2", progress=False)
    ck.write_bytes(ck.read_bytes() + b"\0")
    with pytest.raises(UserError, match="changed since the index was built"):
        search.Index(tmp_path / "i2")


def test_load_run_errors_name_the_file(built, tmp_path):
    with pytest.raises(UserError, match="neither checkpoint_best.pt nor checkpoint_last.pt"):
        load_run(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        load_run(tmp_path / "missing")
    bare = tmp_path / "bare.pt"
    torch.save({"model": {}}, bare)
    with pytest.raises(UserError, match="has no 'config' entry"):
        load_run(checkpoint=bare)
    with pytest.raises(UserError, match="task_module: cannot import 'no.such.module'"):
        load_run(built["run"], overrides={"task_module": "no.such.module"})
    run = load_run(built["run"])  # config.yaml beside checkpoint_best.pt
    assert run.checkpoint.name == "checkpoint_best.pt" and not run.model.training
    # a run made before a setting existed: the setting takes the task's default
    ck = torch.load(built["run"] / "checkpoint_best.pt", weights_only=False)
    del ck["config"]["eval_block_size"], ck["config"]["agg_module"]
    old = tmp_path / "old.pt"
    torch.save(ck, old)
    run = load_run(checkpoint=old)
    assert run.cfg.eval_block_size == 32 and run.cfg.agg_module == "seqTransf"
