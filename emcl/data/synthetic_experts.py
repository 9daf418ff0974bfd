"""Synthetic expert features in MMT's published per-video HDF5 layout, plus a tiny random BERT.

Every video has four latent attributes (colour, object, action, place); its captions describe them in
words (with synonyms and filler), and each expert sees some of them through a fixed random projection
plus noise, in its own dimension and number of temporal features. Some experts are missing the ways the
published files have them: the dataset absent, a NaN-marked array, an empty array. The layout is
MSR-VTT's (``train_list_jsfusion.txt``, ``val_list_jsfusion.txt``, ``jsfusion_val_caption_idx.pkl`` and
``vid_feat_files/mult_h5/{id[0]}/{id[1]}/{id[2]}/{id}.h5``), so the real parser reads it.

The tiny BERT (random weights, a ``vocab.txt`` of the caption words) lets the text tower run with no
download; it is a stand-in for bert-base-cased, not a pretrained model.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from pathlib import Path

import h5py
import numpy as np
import torch

from emcl.fileio import save_bytes, save_json

ATTRIBUTES = {
    "colour": [
        ["red", "crimson"],
        ["blue", "navy"],
        ["green", "olive"],
        ["yellow", "golden"],
        ["black", "dark"],
        ["white", "pale"],
        ["orange", "amber"],
        ["purple", "violet"],
    ],
    "object": [
        ["dog", "puppy"],
        ["car", "vehicle"],
        ["man", "guy"],
        ["woman", "lady"],
        ["ball", "sphere"],
        ["horse", "pony"],
        ["bird", "parrot"],
        ["boat", "ship"],
        ["child", "kid"],
        ["robot", "machine"],
    ],
    "action": [
        ["runs", "sprints"],
        ["jumps", "leaps"],
        ["sings", "chants"],
        ["swims", "floats"],
        ["dances", "spins"],
        ["falls", "drops"],
        ["sleeps", "rests"],
        ["eats", "chews"],
    ],
    "place": [
        ["beach", "shore"],
        ["kitchen", "cookhouse"],
        ["street", "road"],
        ["forest", "woods"],
        ["stage", "podium"],
        ["field", "meadow"],
    ],
}
FILLER = ["a", "the", "in", "on", "at", "video", "of", "clip", "showing", "near", "some", "there"]
# expert -> (dimension, attributes it sees, (min, max) temporal features)
DEFAULT_EXPERTS = {
    "s3d": (48, ("action", "object"), (4, 12)),
    "vggish": (16, ("action",), (2, 8)),
    "rgb": (32, ("colour", "object"), (6, 16)),
    "face": (24, ("place", "object"), (1, 4)),
}
# expert -> (fraction absent, fraction NaN-marked, fraction empty)
DEFAULT_MISSING = {"vggish": (0.0, 0.2, 0.0), "face": (0.3, 0.1, 0.05), "rgb": (0.0, 0.0, 0.05)}
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?", "!"]


def _caption(rng: np.random.Generator, attrs: dict[str, int]) -> list[str]:
    names = list(ATTRIBUTES)
    order = rng.permutation(len(names))
    words = [FILLER[rng.integers(len(FILLER))]]
    for j in order:
        name = names[j]
        if name == "place" and rng.random() < 0.3:
            continue  # not every caption names the place
        words.append(ATTRIBUTES[name][attrs[name]][rng.integers(2)])
        if rng.random() < 0.4:
            words.append(FILLER[rng.integers(len(FILLER))])
    return words


def _write_video(path: Path, captions: list[list[str]], experts: dict, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h:
        for i, c in enumerate(captions):
            h.create_dataset(f"raw_captions.{i}", data=np.array([w.encode() for w in c]))
        for e, (kind, x, t) in experts.items():
            if kind == "absent":
                continue
            if kind == "nan":
                x = np.full_like(x, np.nan)
            if kind == "empty":
                x = x[:0]
            h.create_dataset(f"features.{e}", data=x.astype(np.float32))
            if t is not None:
                h.create_dataset(f"features_t.{e}", data=t[: len(x)])


def make_tiny_bert(
    folder: str | Path, words: list[str], hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 0
) -> Path:
    """A randomly initialised BERT (``config.json``, weights, ``vocab.txt``) whose vocabulary is
    ``words`` plus the special tokens; loadable with ``transformers`` from the folder, offline."""
    from transformers import BertConfig, BertModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL_TOKENS + sorted({w.lower() for w in words} - set(SPECIAL_TOKENS))
    save_bytes(("\n".join(vocab) + "\n").encode(), folder / "vocab.txt")
    save_json({"do_lower_case": True, "tokenizer_class": "BertTokenizer"}, folder / "tokenizer_config.json")
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
        type_vocab_size=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        BertModel(config).save_pretrained(folder)
    return folder


def make_synthetic_experts(
    out: str | Path,
    num_videos: int = 600,
    split_sizes: tuple[int, int] = (500, 100),
    captions_per_video: int = 3,
    noise: float = 0.6,
    seed: int = 0,
    experts: dict | None = None,
    missing: dict | None = None,
    bert_hidden: int = 32,
    bert_layers: int = 2,
) -> dict[str, str]:
    """Write the dataset into ``out`` unless a finished one with the same settings is there.

    Returns the paths: ``data_dir`` (split lists), ``features`` (the per-video folder) and ``bert``.
    """
    out = Path(out)
    experts = {k: (int(v[0]), tuple(v[1]), tuple(v[2])) for k, v in (experts or DEFAULT_EXPERTS).items()}
    missing = {k: tuple(v) for k, v in (DEFAULT_MISSING if missing is None else missing).items()}
    if sum(split_sizes) != num_videos:
        raise ValueError(f"split_sizes {tuple(split_sizes)} must add up to num_videos {num_videos}")
    settings = dict(
        num_videos=num_videos,
        split_sizes=list(split_sizes),
        captions_per_video=captions_per_video,
        noise=noise,
        seed=seed,
        experts={k: [v[0], list(v[1]), list(v[2])] for k, v in experts.items()},
        missing={k: list(v) for k, v in missing.items()},
        bert=[bert_hidden, bert_layers],
    )
    paths = {
        "data_dir": str(out),
        "features": str(out / "vid_feat_files" / "mult_h5"),
        "bert": str(out / "bert"),
    }
    done = out / "done.json"
    if done.is_file() and json.loads(done.read_text()).get("settings") == settings:
        return paths
    rng = np.random.default_rng(seed)
    proj = {
        e: {a: rng.normal(size=(len(ATTRIBUTES[a]), d)) for a in seen} for e, (d, seen, _) in experts.items()
    }
    ids = [f"video{i}" for i in range(num_videos)]
    all_words: set[str] = set(FILLER)
    for syn in ATTRIBUTES.values():
        for pair in syn:
            all_words.update(pair)
    for vid in ids:
        attrs = {a: int(rng.integers(len(v))) for a, v in ATTRIBUTES.items()}
        caps = [_caption(rng, attrs) for _ in range(captions_per_video)]
        feats = {}
        for e, (d, seen, (lo, hi)) in experts.items():
            n = int(rng.integers(lo, hi + 1))
            base = sum(proj[e][a][attrs[a]] for a in seen)
            x = base[None, :] + noise * rng.normal(size=(n, d)) * np.sqrt(len(seen))
            t = None
            if e in ("s3d", "vggish"):
                start = np.sort(rng.uniform(0, 20, size=n))
                t = np.stack([start, start + 1.0], axis=1)
            p_abs, p_nan, p_empty = missing.get(e, (0.0, 0.0, 0.0))
            u = rng.random()
            kind = (
                "absent"
                if u < p_abs
                else "nan"
                if u < p_abs + p_nan
                else "empty"
                if u < p_abs + p_nan + p_empty
                else "ok"
            )
            feats[e] = (kind, x, t)
        _write_video(Path(paths["features"]) / vid[0] / vid[1] / vid[2] / f"{vid}.h5", caps, feats, rng)
    n_train = split_sizes[0]
    save_bytes(("\n".join(ids[:n_train]) + "\n").encode(), out / "train_list_jsfusion.txt")
    save_bytes(("\n".join(ids[n_train:]) + "\n").encode(), out / "val_list_jsfusion.txt")
    save_bytes(
        pickle.dumps({v: int(rng.integers(captions_per_video)) for v in ids[n_train:]}),
        out / "jsfusion_val_caption_idx.pkl",
    )
    make_tiny_bert(paths["bert"], sorted(all_words), hidden=bert_hidden, layers=bert_layers, seed=seed)
    save_json({"settings": settings}, done)
    return paths


def prepare_synthetic_experts(out: str | Path, experts: Mapping[str, int], **settings) -> dict[str, str]:
    """:func:`make_synthetic_experts` into ``out``, then its features consolidated into ``out/experts.h5``
    for ``experts`` (unless a store newer than the dataset is there). Returns the paths, ``store`` added."""
    from emcl.data.experts import consolidate_experts

    out = Path(out)
    paths = make_synthetic_experts(out, **settings)
    store = out / "experts.h5"
    if not store.is_file() or store.stat().st_mtime < (out / "done.json").stat().st_mtime:
        consolidate_experts(paths["features"], store, dict(experts))
    return {**paths, "store": str(store)}
