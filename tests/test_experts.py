"""MMT's expert features in their published per-video HDF5 layout, the consolidated store, the split
lists and the reference's tokenisation (emcl/data/experts.py, emcl/data/expert_datasets.py)."""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest

from emcl.data.expert_datasets import expert_tokens, tokenize_caption
from emcl.data.experts import (
    ExpertFormatError,
    ExpertStore,
    consolidate_experts,
    load_expert_split,
    read_video_h5,
    video_h5_path,
)

EXPERTS = {"s3d": 6, "vggish": 3, "rgb": 5, "face": 4}


def write_video(root: Path, vid: str, captions: list[str], feats: dict, feats_t: dict | None = None) -> Path:
    """One file exactly as published: bytes word arrays, float features, (n, 2) start/end times."""
    path = video_h5_path(root, vid)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h:
        for i, c in enumerate(captions):
            h.create_dataset(f"raw_captions.{i}", data=np.array([w.encode() for w in c.split()]))
        for k, x in feats.items():
            h.create_dataset(k, data=x)
        for k, x in (feats_t or {}).items():
            h.create_dataset(k, data=x)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "mult_h5"
    s3d_t = np.array([[0.0, 1.0], [1.0, 2.0], [4.0, 6.0]])
    write_video(
        root,
        "video7",
        ["a dog runs", "the puppy sprints"],
        {
            "features.s3d": rng.normal(size=(3, 6)),
            "features.vggish": rng.normal(size=(2, 3)),
            "features.rgb": rng.normal(size=(4, 5)),
            "features.face": rng.normal(size=(2, 4)),
        },
        {"features_t.s3d": s3d_t, "features_t.rgb": np.zeros((4, 2))},
    )
    write_video(
        root,
        "video8",
        ["a red car"],
        {
            "features.s3d": rng.normal(size=(2, 6)),
            "features.vggish": np.full((2, 3), np.nan),  # NaN-marked: missing
            "features.rgb": np.zeros((0, 5)),
        },
    )  # empty: missing; face absent: missing
    write_video(
        root,
        "video9",
        ["a man sings", "singing man"],
        {
            "features.s3d": rng.normal(size=(1, 6)),
            "features.vggish": rng.normal(size=(5, 3)),
            "features.rgb": rng.normal(size=(2, 5)),
            "features.face": rng.normal(size=(1, 4)),
        },
    )
    return root


def test_published_layout_is_read_as_published(folder):
    assert video_h5_path(folder, "video7") == folder / "v" / "i" / "d" / "video7.h5"
    rec = read_video_h5(video_h5_path(folder, "video7"), EXPERTS)
    assert rec.captions == [["a", "dog", "runs"], ["the", "puppy", "sprints"]]
    assert rec.missing == {}
    assert rec.features["s3d"].shape == (3, 6) and rec.features["s3d"].dtype == np.float32
    np.testing.assert_allclose(rec.times["s3d"], [0.5, 1.5, 5.0])  # features_t read for s3d: mean start/end
    np.testing.assert_allclose(rec.times["rgb"], [0.1, 0.3, 0.5, 0.7], rtol=1e-6)  # ignored: fixed 0.2 s
    np.testing.assert_allclose(rec.times["vggish"], [0.5, 1.5])  # no features_t: fixed 1 s
    np.testing.assert_allclose(rec.times["face"], [-1, -1])  # unknown timing
    tok = expert_tokens(rec, EXPERTS, max_tokens=3, rng=None)
    pick = np.sort(np.random.RandomState(0).choice(4, size=3, replace=False))  # the reference's fixed choice
    np.testing.assert_allclose(tok["rgb"]["positions"], np.array([0.1, 0.3, 0.5, 0.7])[pick] + 2, rtol=1e-6)
    np.testing.assert_array_equal(tok["rgb"]["features"], rec.features["rgb"][pick])
    np.testing.assert_allclose(tok["face"]["positions"], [1, 1, 1])  # unknown (-1 + 2) and padding: 1
    np.testing.assert_array_equal(tok["face"]["mask"], [1, 1, 0])
    np.testing.assert_allclose(tok["s3d"]["maxpool"], rec.features["s3d"].max(0))


def test_consolidated_store_equals_the_per_video_files(folder, tmp_path):
    out = tmp_path / "experts.h5"
    counts = consolidate_experts(folder, out, EXPERTS)
    a, b = ExpertStore(folder, EXPERTS), ExpertStore(out, EXPERTS)
    assert b.video_ids == ["video7", "video8", "video9"]
    for vid in b.video_ids:
        ra, rb = a.get(vid), b.get(vid)
        assert ra.captions == rb.captions and ra.missing == rb.missing
        for e in EXPERTS:
            if ra.features[e] is None:
                assert rb.features[e] is None
            else:
                np.testing.assert_array_equal(ra.features[e], rb.features[e])
                np.testing.assert_array_equal(ra.times[e], rb.times[e])
    assert counts["vggish"] == {"absent": 0, "empty": 0, "nan": 1}
    assert counts["face"] == {"absent": 1, "empty": 0, "nan": 0}
    assert counts["rgb"] == {"absent": 0, "empty": 1, "nan": 0}
    assert b.missing_counts(b.video_ids) == counts == a.missing_counts(b.video_ids)
    assert ExpertStore(out, EXPERTS, in_memory=True).get("video9").features["vggish"].shape == (5, 3)
    with pytest.raises(ExpertFormatError, match="dimension 6 in the store"):
        ExpertStore(out, {"s3d": 7})


def test_missing_and_nan_marked_experts_follow_the_reference(folder):
    rec = read_video_h5(video_h5_path(folder, "video8"), EXPERTS)
    assert rec.missing == {"vggish": "nan", "rgb": "empty", "face": "absent"}
    tok = expert_tokens(rec, EXPERTS, max_tokens=4, rng=np.random.default_rng(0))
    for e in ("vggish", "rgb", "face"):  # zeros, mask 0, position 1: still scored at the text weight
        assert not tok[e]["features"].any() and not tok[e]["maxpool"].any()
        assert not tok[e]["mask"].any() and (tok[e]["positions"] == 1).all()
    assert tok["s3d"]["mask"].tolist() == [1, 1, 0, 0]


@pytest.mark.parametrize(
    "key, shape, match",
    [
        ("features.S3D", (3, 6), r"video5\.h5.*unexpected dataset 'features\.S3D' \(expert 'S3D'\)"),
        ("feature.s3d", (3, 6), r"video5\.h5.*unexpected dataset 'feature\.s3d' \(expert 's3d'\)"),
        (
            "features.s3d",
            (3, 7),
            r"video5\.h5: expert 's3d': features\.s3d has shape \(3, 7\), expected \(n, 6\)",
        ),
        ("features.s3d", (6,), r"video5\.h5: expert 's3d'"),
    ],
)
def test_malformed_file_names_the_file_and_the_expert(tmp_path, key, shape, match):
    write_video(tmp_path, "video5", ["a cat"], {key: np.ones(shape)})
    with pytest.raises(ExpertFormatError, match=match):
        read_video_h5(video_h5_path(tmp_path, "video5"), EXPERTS)
    with pytest.raises(ExpertFormatError, match=match):  # the converter validates every file
        consolidate_experts(tmp_path, tmp_path / "out.h5", EXPERTS)
    assert not (tmp_path / "out.h5").exists()


def test_bad_features_t_names_the_file_and_the_expert(tmp_path):
    write_video(
        tmp_path, "video5", ["a cat"], {"features.s3d": np.ones((3, 6))}, {"features_t.s3d": np.ones((2, 2))}
    )
    with pytest.raises(
        ExpertFormatError, match=r"video5\.h5: expert 's3d': features_t\.s3d has shape \(2, 2\)"
    ):
        read_video_h5(video_h5_path(tmp_path, "video5"), EXPERTS)


def test_split_lists_as_the_reference_reads_them(folder, tmp_path):
    store = ExpertStore(folder, EXPERTS)
    d = tmp_path / "lists"
    d.mkdir()
    (d / "train_list_jsfusion.txt").write_text("video7\nvideo8\n")
    (d / "val_list_jsfusion.txt").write_text("video9\nvideo7\n")
    (d / "jsfusion_val_caption_idx.pkl").write_bytes(pickle.dumps({"video9": 1, "video7": 0}))
    train = load_expert_split("msrvtt", d, "train", store)
    assert train.captions == ["a dog runs", "the puppy sprints", "a red car"] and train.caption_video == [
        0,
        0,
        1,
    ]
    test = load_expert_split("msrvtt", d, "test", store)
    assert test.captions == ["singing man", "a dog runs"]
    (d / "train_list.txt").write_text("video7\n")
    (d / "val_1_list.txt").write_text("video9\n")
    anet = load_expert_split("activitynet", d, "test", store)  # paragraphs: captions concatenated
    assert anet.captions == ["a man sings singing man"]
    (d / "LSMDC16_challenge_1000_publictect.csv").write_text(
        "video9\t0\t1\ta man sings\n1014_2012_00.01.21.399-00.01.23.997\t0\t1\tdropped\n"
    )
    assert load_expert_split("lsmdc", d, "test", store).video_ids == ["video9"]


class _Tok:
    """A WordPiece tokenizer over a tiny vocabulary, made on the spot."""

    def __new__(cls, tmp_path: Path, lower: bool):
        from transformers import BertTokenizer

        words = [
            "[PAD]",
            "[UNK]",
            "[CLS]",
            "[SEP]",
            "[MASK]",
            ".",
            "a",
            "dog",
            "runs",
            "fast",
            "A",
            "Dog",
            "the",
        ]
        (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
        return BertTokenizer(str(tmp_path / "vocab.txt"), do_lower_case=lower)


def test_faithful_tokenisation_quirks(tmp_path):
    faithful = _Tok(tmp_path, lower=True)
    ids = tokenize_caption(faithful, "A Dog runs", 30, faithful=True)
    assert faithful.convert_ids_to_tokens(ids) == ["[CLS]", "a", "dog", "runs", ".", "[SEP]"]
    ids = tokenize_caption(faithful, "a dog runs fast", 4, faithful=True)  # cut, last token forced to [SEP]
    assert faithful.convert_ids_to_tokens(ids) == ["[CLS]", "a", "dog", "[SEP]"]
    cased = _Tok(tmp_path, lower=False)
    ids = tokenize_caption(cased, "A Dog runs", 30, faithful=False)  # as written: no period, case kept
    assert cased.convert_ids_to_tokens(ids) == ["[CLS]", "A", "Dog", "runs", "[SEP]"]


def test_truncated_store_and_wrong_columns_are_named(folder, tmp_path):
    out = tmp_path / "experts.h5"
    consolidate_experts(folder, out, EXPERTS)
    cut = tmp_path / "cut.h5"
    cut.write_bytes(out.read_bytes()[: out.stat().st_size // 3])  # an interrupted copy
    with pytest.raises(ExpertFormatError, match=r"cut\.h5: cannot read the expert store.*truncated"):
        ExpertStore(cut, EXPERTS)
    wide = tmp_path / "wide.h5"
    wide.write_bytes(out.read_bytes())
    with h5py.File(wide, "a") as h:  # features written with another column count than the store says
        rows = h["s3d"]["features"].shape[0]
        del h["s3d"]["features"]
        h["s3d"].create_dataset("features", data=np.zeros((rows, 8), dtype=np.float32))
    with pytest.raises(ExpertFormatError, match=r"wide\.h5: expert 's3d': features of shape \(\d+, 8\)"):
        ExpertStore(wide, EXPERTS)


def test_non_finite_features_are_listed_by_video_and_expert(folder, tmp_path):
    out, bad = tmp_path / "experts.h5", tmp_path / "bad.h5"
    consolidate_experts(folder, out, EXPERTS)
    bad.write_bytes(out.read_bytes())
    with h5py.File(bad, "a") as h:
        lo = int(h["s3d"]["offsets"][1])  # video8's first s3d row, past its first element
        h["s3d"]["features"][lo, 2] = np.inf
    ids = ["video7", "video8", "video9"]
    assert ExpertStore(out, EXPERTS).nonfinite(ids) == []  # NaN-marked missing experts do not count
    assert ExpertStore(bad, EXPERTS).nonfinite(ids) == ["video8 (s3d)"]
