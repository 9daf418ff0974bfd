"""MMT's precomputed expert features (docs/reference.md, 'Joint training (MMT)'): the published
per-video HDF5 layout, one consolidated store, and the MSR-VTT / LSMDC / ActivityNet split lists the
reference reads.

Published layout: one file per video at ``{root}/{id[0]}/{id[1]}/{id[2]}/{id}.h5`` holding
``features.{expert}`` (n x D), ``features_t.{expert}`` (n x 2 start/end seconds) and ``raw_captions.{i}``
(an array of words). The reference treats an expert as *missing* when its dataset is absent, empty, or
its first value is NaN (the published files mark missing experts that way); a missing expert still
enters the similarity at its text-derived weight (``keep_missing_modalities``). Missing experts are
counted per reason and reported. Anything else out of shape (an unexpected dataset name, a wrong
feature dimension, a ``features_t`` that does not match its features) is an :class:`ExpertFormatError`
naming the file and the expert.

Timings follow the reference: ``features_t`` is read only for s3d and vggish; rgb (0.2 s) and scene
(1 s) get fixed-width timings; face, ocr and speech get "unknown" (-1). A feature's time is the mean of
its start and end.

:func:`consolidate_experts` writes every video of a folder into one HDF5 file (layout in its
docstring) so training reads one file instead of opening 10k; :class:`ExpertStore` reads either form
and returns the same :class:`VideoExperts` records. :func:`parse_experts` reads an ``--experts`` list,
:class:`ExpertSplits` a dataset's split lists over one store.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from emcl.data.annotations import RetrievalSplit
from emcl.errors import UserError

log = logging.getLogger(__name__)

# the reference's expert dimensions (face is 128 on LSMDC)
EXPERT_DIMS: dict[str, int] = {
    "s3d": 1024,
    "vggish": 128,
    "face": 512,
    "rgb": 2048,
    "speech": 300,
    "ocr": 300,
    "scene": 2208,
}
# fixed feature widths in seconds (None: timing unknown), used for experts whose features_t is not read
FEAT_WIDTH: dict[str, float | None] = {
    "rgb": 0.2,
    "scene": 1.0,
    "s3d": 1.0,
    "vggish": 1.0,
    "face": None,
    "ocr": None,
    "speech": None,
}
TIMED_EXPERTS = ("s3d", "vggish")  # the only experts whose features_t the reference reads
MISSING_REASONS = ("absent", "empty", "nan")
STORE_FORMAT = "emcl-experts-v1"
_KEY = re.compile(
    r"^(features|features_t|features_avgpool|features_maxpool)\.([a-z0-9_]+)$|^raw_captions(_t)?\.(\d+)$"
)
# LSMDC16 clips without captions that the reference drops from every list
LSMDC_DROPPED = (
    "0024_THE_LORD_OF_THE_RINGS_THE_FELLOWSHIP_OF_THE_RING_00.31.10.217-00.31.10.706",
    "1014_2012_00.01.21.399-00.01.23.997",
    "1014_2012_00.27.58.174-00.27.59.021",
    "1018_Body_Of_Lies_00.42.15.677-00.42.18.534",
    "1037_The_Curious_Case_Of_Benjamin_Button_02.25.14.743-02.25.17.312",
)


def parse_experts(value: str | Mapping[str, int]) -> dict[str, int]:
    """The experts in modality order with their dimensions: ``s3d:1024,vggish:128``, or a mapping (a YAML
    ``experts:`` block); a bare name takes the reference's dimension (:data:`EXPERT_DIMS`)."""
    if isinstance(value, Mapping):
        items = list(value.items())
    else:
        items = []
        for part in str(value).split(","):
            name, _, dim = part.strip().partition(":")
            items.append((name, dim or EXPERT_DIMS.get(name)))
    out = {}
    for name, dim in items:
        if dim is None:
            raise UserError(
                f"--experts: expert '{name}' needs a dimension (name:dim); known defaults: "
                f"{', '.join(f'{k}:{v}' for k, v in EXPERT_DIMS.items())}"
            )
        out[str(name)] = int(dim)
    if not out:
        raise UserError("--experts: no expert given")
    return out


class ExpertFormatError(UserError, ValueError):
    """A feature file that does not follow the published layout; the message names file and expert."""


@dataclass
class VideoExperts:
    """One video's captions (word lists) and, per expert, its features (n x D float32) and times (n,),
    or ``None`` with the reason in ``missing``."""

    video_id: str
    captions: list[list[str]]
    features: dict[str, np.ndarray | None]
    times: dict[str, np.ndarray | None]
    missing: dict[str, str] = field(default_factory=dict)


def video_h5_path(root: str | os.PathLike, video_id: str) -> Path:
    """``{root}/{id[0]}/{id[1]}/{id[2]}/{id}.h5``, the published nesting."""
    if len(video_id) < 3:
        raise UserError(f"video id {video_id!r} is shorter than the 3 characters the feature layout nests by")
    return Path(root) / video_id[0] / video_id[1] / video_id[2] / f"{video_id}.h5"


def feature_times(expert: str, n: int, features_t: np.ndarray | None) -> np.ndarray:
    """Centre times (n,) of an expert's features, as the reference computes them."""
    if features_t is not None and expert in TIMED_EXPERTS:
        return features_t[:n].astype(np.float32).mean(axis=1)
    width = FEAT_WIDTH.get(expert, 1.0)
    if width is None:
        return np.full(n, -1.0, dtype=np.float32)
    starts = np.arange(n, dtype=np.float64) * width
    return (starts + width / 2).astype(np.float32)


def _words(value, path: Path, key: str) -> list[str]:
    arr = np.asarray(value)
    if arr.ndim == 0:
        arr = np.asarray(
            str(arr.item() if not isinstance(arr.item(), bytes) else arr.item().decode()).split()
        )
    if arr.ndim != 1:
        raise ExpertFormatError(f"{path}: {key} must be a 1-D array of words, got shape {arr.shape}")
    words = [w.decode("utf-8") if isinstance(w, bytes) else str(w) for w in arr.tolist()]
    if not words:
        raise ExpertFormatError(f"{path}: {key} is empty (a caption needs at least one word)")
    return words


def read_video_h5(
    path: str | os.PathLike, experts: Mapping[str, int], video_id: str | None = None
) -> VideoExperts:
    """Parse one published per-video file for the ``experts`` (name -> feature dimension) asked for."""
    path = Path(path)
    video_id = video_id or path.stem
    if not path.is_file():
        raise FileNotFoundError(f"expert features of video '{video_id}' not found: {path}")
    try:
        fh = h5py.File(path, "r")
    except OSError as e:
        raise ExpertFormatError(f"{path}: not a readable HDF5 file ({e})") from e
    with fh:
        keys = list(fh.keys())
        for k in keys:
            if not _KEY.match(k):
                name = k.rsplit(".", 1)[-1]
                raise ExpertFormatError(
                    f"{path}: unexpected dataset '{k}' (expert '{name}'): expected features.{{expert}}, "
                    "features_t.{expert} or raw_captions.{i} with lower-case expert names"
                )
        n_caps = sum(1 for k in keys if k.startswith("raw_captions."))
        captions = []
        for i in range(n_caps):
            key = f"raw_captions.{i}"
            if key not in fh:
                raise ExpertFormatError(
                    f"{path}: {n_caps} captions but '{key}' is absent (numbering must run 0..n-1)"
                )
            captions.append(_words(fh[key][()], path, key))
        if not captions:
            raise ExpertFormatError(f"{path}: no raw_captions.{{i}} dataset (every video needs a caption)")
        feats: dict[str, np.ndarray | None] = {}
        times: dict[str, np.ndarray | None] = {}
        missing: dict[str, str] = {}
        for expert, dim in experts.items():
            key = f"features.{expert}"
            feats[expert] = times[expert] = None
            if key not in fh:
                missing[expert] = "absent"
                continue
            x = np.asarray(fh[key][()])
            if x.ndim != 2 or (x.shape[0] > 0 and x.shape[1] != dim):
                raise ExpertFormatError(
                    f"{path}: expert '{expert}': {key} has shape {x.shape}, expected (n, {dim})"
                )
            if x.shape[0] == 0:
                missing[expert] = "empty"
                continue
            if np.isnan(x[0, 0]):
                missing[expert] = "nan"
                continue
            ft = None
            tkey = f"features_t.{expert}"
            if expert in TIMED_EXPERTS and tkey in fh:
                ft = np.asarray(fh[tkey][()])
                if ft.ndim != 2 or ft.shape[1] != 2 or ft.shape[0] < x.shape[0]:
                    raise ExpertFormatError(
                        f"{path}: expert '{expert}': {tkey} has shape {ft.shape}, expected "
                        f"({x.shape[0]}, 2) start/end times for its {x.shape[0]} features"
                    )
                if ft.shape[0] > x.shape[0]:
                    log.warning(
                        "%s: %s has %d rows for %d features; using the first %d (as the reference)",
                        path,
                        tkey,
                        ft.shape[0],
                        x.shape[0],
                        x.shape[0],
                    )
            feats[expert] = x.astype(np.float32, copy=False)
            times[expert] = feature_times(expert, x.shape[0], ft)
    return VideoExperts(video_id, captions, feats, times, missing)


def find_video_files(root: str | os.PathLike) -> list[str]:
    """Video ids of every ``{id}.h5`` under ``root`` in the published nesting, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"expert feature folder not found: {root}")
    return sorted(p.stem for p in root.glob("*/*/*/*.h5"))


# ---------------------------------------------------------------------------------- consolidated store
def consolidate_experts(
    root: str | os.PathLike,
    out: str | os.PathLike,
    experts: Mapping[str, int],
    video_ids: Iterable[str] | None = None,
) -> dict[str, dict[str, int]]:
    """Read every per-video file (validating each) and write one HDF5 store at ``out``, atomically.

    Layout: attrs ``format`` and ``experts`` (JSON name -> dim); ``video_ids`` (V,) and ``captions`` (V,)
    (JSON lists of word lists) as UTF-8 strings; per expert a group with ``features`` (sum n, D) float32,
    ``times`` (sum n,) float32, ``offsets`` (V+1,) int64 and ``missing`` (V,) uint8 (0 present, then 1 + the
    index in ``MISSING_REASONS``). Returns the missing-expert counts.
    """
    ids = list(video_ids) if video_ids is not None else find_video_files(root)
    if not ids:
        raise UserError(f"no video feature files (*/*/*/{{id}}.h5) under {root}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    str_dt = h5py.string_dtype("utf-8")
    counts = {e: dict.fromkeys(MISSING_REASONS, 0) for e in experts}
    try:
        with h5py.File(tmp, "w") as h:
            h.attrs["format"] = STORE_FORMAT
            h.attrs["experts"] = json.dumps(dict(experts))
            h.create_dataset("video_ids", data=np.array(ids, dtype=object), dtype=str_dt)
            caps = h.create_dataset("captions", (len(ids),), dtype=str_dt)
            groups = {}
            for e, dim in experts.items():
                g = h.create_group(e)
                g.create_dataset("features", (0, dim), maxshape=(None, dim), dtype="f4", chunks=(256, dim))
                g.create_dataset("times", (0,), maxshape=(None,), dtype="f4", chunks=(4096,))
                g.create_dataset("offsets", (len(ids) + 1,), dtype="i8")
                g.create_dataset("missing", (len(ids),), dtype="u1")
                groups[e] = g
            fill = dict.fromkeys(experts, 0)
            buf: dict[str, list] = {e: [] for e in experts}

            def flush() -> None:
                for e, g in groups.items():
                    if not buf[e]:
                        continue
                    x = np.concatenate([b[0] for b in buf[e]])
                    t = np.concatenate([b[1] for b in buf[e]])
                    n0 = g["features"].shape[0]
                    g["features"].resize(n0 + len(x), axis=0)
                    g["features"][n0:] = x
                    g["times"].resize(n0 + len(t), axis=0)
                    g["times"][n0:] = t
                    buf[e] = []

            offsets = {e: np.zeros(len(ids) + 1, np.int64) for e in experts}
            codes = {e: np.zeros(len(ids), np.uint8) for e in experts}
            texts = []
            for i, vid in enumerate(ids):
                rec = read_video_h5(video_h5_path(root, vid), experts, vid)
                texts.append(json.dumps(rec.captions))
                for e in experts:
                    offsets[e][i] = fill[e]
                    x = rec.features[e]
                    if x is None:
                        reason = rec.missing[e]
                        counts[e][reason] += 1
                        codes[e][i] = 1 + MISSING_REASONS.index(reason)
                        continue
                    buf[e].append((x, rec.times[e]))
                    fill[e] += x.shape[0]
                if i % 256 == 255:
                    flush()
            flush()
            caps[:] = np.array(texts, dtype=object)
            for e, g in groups.items():
                offsets[e][len(ids)] = fill[e]
                g["offsets"][:] = offsets[e]
                g["missing"][:] = codes[e]
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return counts


class ExpertStore:
    """Per-video :class:`VideoExperts` from a consolidated store (a ``.h5`` file) or a published folder.

    The HDF5 handle opens lazily in each process, so a store can be handed to DataLoader workers. The
    per-video index (offsets, missing codes, captions) is read into RAM once per process; ``in_memory``
    reads the features too.
    """

    def __init__(self, path: str | os.PathLike, experts: Mapping[str, int], in_memory: bool = False) -> None:
        self.path = Path(path)
        self.experts = dict(experts)
        self.in_memory = in_memory
        self.consolidated = self.path.is_file()
        self._h: h5py.File | None = None
        self._pid = -1
        self._mem: dict | None = None
        if self.consolidated:
            try:
                with h5py.File(self.path, "r") as h:
                    self.video_ids = self._check_store(h)
            except (OSError, KeyError) as e:  # truncated, or not a store of ours
                raise ExpertFormatError(
                    f"{self.path}: cannot read the expert store ({type(e).__name__}: {e}); it may be "
                    "truncated: rebuild it with scripts/consolidate_experts.py"
                ) from e
            self._row = {v: i for i, v in enumerate(self.video_ids)}
        elif self.path.is_dir():
            self.video_ids = None
            self._row = None
        else:
            raise FileNotFoundError(
                f"expert features not found: {self.path} (a consolidated .h5 store or the "
                "folder of per-video files)"
            )

    def _check_store(self, h: h5py.File) -> list[str]:
        """The store's video ids, once its format, experts, dimensions and index lengths are checked."""
        if h.attrs.get("format") != STORE_FORMAT:
            raise ExpertFormatError(
                f"{self.path}: not an expert store written by consolidate_experts "
                f"(format attribute {h.attrs.get('format')!r})"
            )
        have = json.loads(h.attrs["experts"])
        video_ids = [v.decode() if isinstance(v, bytes) else v for v in h["video_ids"][()]]
        for e, dim in self.experts.items():
            if e not in have:
                raise ExpertFormatError(
                    f"{self.path}: expert '{e}' is not in this store (it holds {', '.join(have)}); re-run "
                    "the converter"
                )
            if have[e] != dim:
                raise ExpertFormatError(
                    f"{self.path}: expert '{e}' has dimension {have[e]} in the store, the config says {dim}"
                )
            shape, rows = h[e]["features"].shape, h[e]["offsets"].shape
            if len(shape) != 2 or shape[1] != dim or rows != (len(video_ids) + 1,):
                raise ExpertFormatError(
                    f"{self.path}: expert '{e}': features of shape {shape} and {rows[0]} offsets do not "
                    f"fit {len(video_ids)} videos of dimension {dim}; rebuild the store"
                )
        return video_ids

    def nonfinite(self, video_ids: Iterable[str], limit: int = 5) -> list[str]:
        """Up to ``limit`` of ``video_ids`` whose present features hold NaN or infinity, as
        ``"video7010 (s3d)"`` (missing experts, NaN-marked as the reference marks them, do not count)."""
        bad: list[str] = []
        for v in video_ids:
            item = self.get(v)
            bad += [f"{v} ({e})" for e, x in item.features.items()
                    if x is not None and not np.isfinite(x).all()]
            if len(bad) >= limit:
                break
        return bad[:limit]

    def __contains__(self, video_id: str) -> bool:
        if self._row is not None:
            return video_id in self._row
        return video_h5_path(self.path, video_id).is_file()

    def _file(self) -> h5py.File:
        if self._h is None or self._pid != os.getpid():
            self._h = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._h

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_h"], state["_pid"], state["_mem"] = None, -1, None
        return state

    def _index_arrays(self) -> dict:
        """Offsets, missing codes and captions of every video (small), read once per process."""
        if self._mem is None or self._mem.get("_pid") != os.getpid():
            h = self._file()
            mem: dict = {"_pid": os.getpid(), "captions": h["captions"][()]}
            for e in self.experts:
                mem[e] = {k: h[e][k][()] for k in ("offsets", "missing")}
                if self.in_memory:
                    mem[e].update({k: h[e][k][()] for k in ("features", "times")})
            self._mem = mem
        return self._mem

    def captions(self, video_id: str) -> list[list[str]]:
        """The caption word lists of one video (without reading its features when consolidated)."""
        if self._row is None:
            return self.get(video_id).captions
        raw = self._index_arrays()["captions"][self._index(video_id)]
        return json.loads(raw.decode() if isinstance(raw, bytes) else raw)

    def _index(self, video_id: str) -> int:
        try:
            return self._row[video_id]
        except KeyError:
            raise UserError(f"{self.path}: video '{video_id}' is not in the expert store") from None

    def get(self, video_id: str) -> VideoExperts:
        if self._row is None:
            return read_video_h5(video_h5_path(self.path, video_id), self.experts, video_id)
        i = self._index(video_id)
        index = self._index_arrays()
        feats, times, missing = {}, {}, {}
        for e in self.experts:
            lo, hi = (int(x) for x in index[e]["offsets"][i : i + 2])
            code = int(index[e]["missing"][i])
            if code:
                feats[e] = times[e] = None
                missing[e] = MISSING_REASONS[code - 1]
                continue
            src = index[e] if self.in_memory else self._file()[e]
            try:
                feats[e] = np.asarray(src["features"][lo:hi], dtype=np.float32)
                times[e] = np.asarray(src["times"][lo:hi], dtype=np.float32)
            except OSError as err:  # a truncated file reads its index but not its data
                raise ExpertFormatError(
                    f"{self.path}: cannot read expert '{e}' of video '{video_id}' ({err}); the store may be "
                    "truncated: rebuild it with scripts/consolidate_experts.py"
                ) from err
        raw = index["captions"][i]
        caps = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        return VideoExperts(video_id, caps, feats, times, missing)

    def missing_counts(self, video_ids: Iterable[str]) -> dict[str, dict[str, int]]:
        """Per expert, how many of ``video_ids`` miss it, by reason (absent / empty / nan)."""
        counts = {e: dict.fromkeys(MISSING_REASONS, 0) for e in self.experts}
        if self._row is not None:
            index = self._index_arrays()
            rows = np.array([self._index(v) for v in video_ids], dtype=np.int64)
            for e in self.experts:
                codes = index[e]["missing"][rows]
                for j, reason in enumerate(MISSING_REASONS):
                    counts[e][reason] = int((codes == j + 1).sum())
            return counts
        for v in video_ids:
            for e, reason in self.get(v).missing.items():
                counts[e][reason] += 1
        return counts


def find_store(anno_path: str | os.PathLike) -> Path:
    """The expert store next to a dataset's split lists: ``experts.h5`` in ``anno_path``, else the
    published per-video folder (``vid_feat_files/mult_h5`` beside or inside it)."""
    root = Path(anno_path)
    cands = [
        root / "experts.h5",
        root.parent / "vid_feat_files" / "mult_h5",
        root / "vid_feat_files" / "mult_h5",
    ]
    found = next((c for c in cands if c.exists()), None)
    if found is None:
        raise UserError(f"--features not given and none of {', '.join(map(str, cands))} exists")
    return found


def missing_summary(counts: Mapping[str, Mapping[str, int]]) -> str:
    """``face 42 (absent 26, empty 7, nan 9), ...`` from :meth:`ExpertStore.missing_counts`; "none"."""
    parts = [
        f"{e} {sum(c.values())} ({', '.join(f'{k} {v}' for k, v in c.items() if v)})"
        for e, c in counts.items()
        if sum(c.values())
    ]
    return ", ".join(parts) or "none"


# ----------------------------------------------------------------------------------------------- splits
MMT_DATATYPES = ("msrvtt", "lsmdc", "activitynet")


def _list_file(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"split list not found: {path}")
    with open(path, encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip()]


def _csv_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"split list not found: {path}")
    with open(path, encoding="utf-8") as fh:
        return [line.split("\t", 1)[0].strip() for line in fh if line.strip()]


def split_video_ids(datatype: str, data_dir: str | os.PathLike, split: str) -> tuple[list[str], dict]:
    """Video ids of ``split`` ("train" or "test") and, for MSR-VTT test, the JSFusion caption index.

    The reference trains on the whole training list ("trainval") and evaluates on the test list:
    MSR-VTT ``train_list_jsfusion.txt`` / ``val_list_jsfusion.txt`` + ``jsfusion_val_caption_idx.pkl``;
    LSMDC ``LSMDC16_annos_training.csv`` / ``LSMDC16_challenge_1000_publictect.csv`` minus 5 clips without
    captions; ActivityNet ``train_list.txt`` / ``val_1_list.txt``.
    """
    d = Path(data_dir)
    if split not in ("train", "test"):
        raise UserError(f"{datatype}: MMT splits are 'train' and 'test', got {split!r}")
    cap_idx: dict = {}
    if datatype == "msrvtt":
        ids = _list_file(d / ("train_list_jsfusion.txt" if split == "train" else "val_list_jsfusion.txt"))
        if split == "test":
            pkl = d / "jsfusion_val_caption_idx.pkl"
            if not pkl.is_file():
                raise FileNotFoundError(f"MSR-VTT 1k-A caption choice not found: {pkl}")
            with open(pkl, "rb") as fh:
                cap_idx = pickle.load(fh)  # the published file; a plain dict video id -> caption index
            if not isinstance(cap_idx, dict):
                raise UserError(
                    f"{pkl}: expected a dict video id -> caption index, got {type(cap_idx).__name__}"
                )
    elif datatype == "lsmdc":
        name = "LSMDC16_annos_training.csv" if split == "train" else "LSMDC16_challenge_1000_publictect.csv"
        ids = [v for v in _csv_ids(d / name) if v not in LSMDC_DROPPED]
    elif datatype == "activitynet":
        ids = _list_file(d / ("train_list.txt" if split == "train" else "val_1_list.txt"))
    else:
        raise UserError(f"unknown MMT datatype {datatype!r}; expected one of {MMT_DATATYPES}")
    seen: set[str] = set()
    for v in ids:
        if v in seen:
            raise UserError(f"{d}: {datatype} {split} list names video '{v}' twice")
        seen.add(v)
    return ids, cap_idx


def load_expert_split(
    datatype: str, data_dir: str | os.PathLike, split: str, store: ExpertStore
) -> RetrievalSplit:
    """The split as a :class:`RetrievalSplit` whose captions are space-joined word lists.

    Train: every caption of every video (MSR-VTT trains on one random caption per video per step;
    LSMDC and ActivityNet on the concatenation of all of a video's captions, one per video).
    Test: one caption per video: MSR-VTT the JSFusion caption, the others the concatenation.
    """
    ids, cap_idx = split_video_ids(datatype, data_dir, split)
    captions, caption_video = [], []
    for i, vid in enumerate(ids):
        if vid not in store:
            raise UserError(f"{datatype} {split}: video '{vid}' has no expert features in {store.path}")
        caps = store.captions(vid)
        if datatype == "msrvtt":
            if split == "test":
                k = int(cap_idx.get(vid, 0))
                if not 0 <= k < len(caps):
                    raise UserError(
                        f"{data_dir}/jsfusion_val_caption_idx.pkl: video '{vid}' caption index {k} "
                        f"but the video has {len(caps)} captions"
                    )
                caps = [caps[k]]
        else:  # "cat": the captions concatenated in order
            caps = [[w for c in caps for w in c]]
        for c in caps:
            captions.append(" ".join(c))
            caption_video.append(i)
    return RetrievalSplit(datatype, split, ids, captions, caption_video, files={"features": str(store.path)})


class ExpertSplits:
    """A dataset's split lists (``datatype`` in ``anno_path``) over one expert store; each split is
    parsed once."""

    def __init__(
        self,
        datatype: str,
        anno_path: str | os.PathLike,
        features: str | os.PathLike,
        experts: Mapping[str, int],
        in_memory: bool = False,
    ) -> None:
        self.datatype, self.anno_path = datatype, anno_path
        self.store = ExpertStore(features, experts, in_memory=in_memory)
        self._splits: dict[str, RetrievalSplit] = {}

    def __getitem__(self, split: str) -> RetrievalSplit:
        if split not in self._splits:
            self._splits[split] = load_expert_split(self.datatype, self.anno_path, split, self.store)
        return self._splits[split]

    def missing(self, split: str) -> dict[str, dict[str, int]]:
        """Per expert, the videos of ``split`` without it, by reason (absent / empty / nan)."""
        return self.store.missing_counts(self[split].video_ids)

    def describe(self, split: str) -> str:
        """``train: 500 videos, 1500 captions; missing experts: face 42 (absent 26, ...), ...``."""
        s = self[split]
        return (
            f"{self.datatype}/{split}: {s.num_videos} videos, {s.num_captions} captions; missing experts "
            f"(kept at their text weight, as the reference): {missing_summary(self.missing(split))}"
        )
