"""Annotation parsing for the five retrieval datasets (docs/reference.md, 'Datasets and formats') and
MSRVTT-QA (docs/reference.md, 'EMCL-QA'), from their real file layouts.

Each retrieval parser returns a :class:`RetrievalSplit`: the split's video ids, its captions, and for every
caption the index of its video; the QA parser returns a :class:`QASplit` of :class:`QARecord`. Bad input
raises ``FileNotFoundError`` / :class:`~emcl.errors.UserValueError` (a ``ValueError`` that the command line
prints as one line) naming the file, the record and what is wrong; nothing is skipped silently.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import pickle
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from emcl.errors import UserValueError

log = logging.getLogger("emcl.data")

DATATYPES = ("msrvtt", "msvd", "lsmdc", "activitynet", "didemo")
SPLITS = ("train", "val", "test")
DIDEMO_WINDOW = (0.0, 31.0)  # DiDeMo annotations cover the first 30 s (5 s segments); read 0-31 s
_VIDEO_EXTS = {".mp4", ".avi", ".mov", ".m4v", ".3gp", ".3gpp", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv",
               ".flv", ".mts", ".m2ts"}


@dataclass
class RetrievalSplit:
    """One split of a retrieval dataset.

    ``caption_video[i]`` is the index into ``video_ids`` of the video that caption ``i`` describes.
    ``windows`` optionally maps a video id to the (start, end) seconds to read.
    """

    datatype: str
    split: str
    video_ids: list[str]
    captions: list[str]
    caption_video: list[int]
    windows: dict[str, tuple[float, float]] | None = None
    files: dict[str, str] = field(default_factory=dict, repr=False)  # the files read, for messages

    def __post_init__(self) -> None:
        if len(self.captions) != len(self.caption_video):
            raise UserValueError(f"{self.datatype}/{self.split}: {len(self.captions)} captions but "
                                 f"{len(self.caption_video)} caption_video entries")
        n = len(self.video_ids)
        bad = [i for i, v in enumerate(self.caption_video) if not 0 <= v < n]
        if bad:
            raise UserValueError(f"{self.datatype}/{self.split}: caption {bad[0]} points to video index "
                                 f"{self.caption_video[bad[0]]}, outside 0..{n - 1}")

    @property
    def num_videos(self) -> int:
        return len(self.video_ids)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    @property
    def multi_caption(self) -> bool:
        """True when some video has more than one caption (text->video over captions, video->text best)."""
        return len(self.captions) != len(self.video_ids)

    def video_captions(self) -> list[list[int]]:
        """Caption indices of every video, in caption order."""
        out: list[list[int]] = [[] for _ in self.video_ids]
        for c, v in enumerate(self.caption_video):
            out[v].append(c)
        return out


# --- helpers -------------------------------------------------------------------------------------
def _need(anno_path: str | os.PathLike, name: str, datatype: str, split: str) -> Path:
    folder = Path(anno_path)
    path = folder / name
    if not path.is_file():
        if not folder.is_dir():
            raise FileNotFoundError(f"{datatype} {split}: annotation folder '{folder}' does not exist "
                                    f"(expected '{name}' in it)")
        raise FileNotFoundError(f"{datatype} {split}: expected annotation file '{name}' in folder "
                                f"'{folder}', not found")
    return path


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise UserValueError(f"{path}: not valid JSON ({e})") from e


def _check_unique(ids: list[str], path: Path, what: str = "video id") -> None:
    seen: dict[str, int] = {}
    for i, v in enumerate(ids):
        if v in seen:
            raise UserValueError(f"{path}: duplicate {what} '{v}' (entries {seen[v] + 1} and {i + 1})")
        seen[v] = i


def _one_line(value, where: str, what: str, empty: str = "empty") -> str:
    """``value`` as one line of text (runs of whitespace made one space); raises naming ``where`` and
    ``what`` when it is no text, or nothing is left."""
    if not isinstance(value, str):
        raise UserValueError(f"{where}: {what} is {type(value).__name__}, not text: {value!r}")
    text = " ".join(value.split())
    if not text:
        raise UserValueError(f"{where}: {what} is {empty}")
    return text


def _check_caption(text, path: Path, record: str) -> str:
    return _one_line(text, f"{path}: record {record}", "caption", "empty (nothing to tokenise)")


def _read_id_list(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        ids = [line.strip() for line in fh]
    ids = [v for v in ids if v]
    _check_unique(ids, path)
    return ids


def _check_csv_row(row: dict, fieldnames: list[str], path: Path, lineno: int) -> None:
    """A row with fewer or more fields than the header (a truncated file, an unquoted comma) is an error."""
    if None in row or any(row.get(k) is None for k in fieldnames):
        got = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or [])
        raise UserValueError(f"{path}: line {lineno}: expected {len(fieldnames)} comma-separated fields "
                             f"({','.join(fieldnames)}), got {got}; the file may be truncated or a field "
                             "holds an unquoted comma")


def _read_csv_rows(path: Path, columns: Iterable[str], expected: str) -> list[dict]:
    """Every row of a CSV file with a header holding ``columns``; rows checked against the header."""
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not set(columns) <= set(reader.fieldnames):
            raise UserValueError(f"{path}: expected {expected}, got {reader.fieldnames}")
        rows = []
        for row in reader:
            _check_csv_row(row, list(reader.fieldnames), path, reader.line_num)
            rows.append(row)
        return rows


def _read_csv_column(path: Path, column: str) -> list[str]:
    rows = _read_csv_rows(path, [column], f"a header with column '{column}'")
    return [row[column].strip() for row in rows]


def _from_groups(datatype: str, split: str, video_ids: list[str], groups: dict[str, list[str]],
                 windows: dict[str, tuple[float, float]] | None = None, **files: str) -> RetrievalSplit:
    captions: list[str] = []
    caption_video: list[int] = []
    for v_index, vid in enumerate(video_ids):
        for cap in groups[vid]:
            captions.append(cap)
            caption_video.append(v_index)
    if not video_ids:
        raise UserValueError(f"{datatype} {split}: the split is empty ({', '.join(files.values())})")
    return RetrievalSplit(datatype, split, video_ids, captions, caption_video, windows, dict(files))


def _missing(ids: Iterable[str], have, list_path: Path, anno_file: Path) -> None:
    for v in ids:
        if v not in have:
            raise UserValueError(f"{list_path}: video id '{v}' has no annotation in {anno_file}")


# --- MSR-VTT -------------------------------------------------------------------------------------
def _msrvtt(anno_path: str, split: str, msrvtt_train: str | None = "9k", msrvtt_test: str | None = "1k",
            **_: object) -> RetrievalSplit:
    msrvtt_train = msrvtt_train or "9k"
    msrvtt_test = msrvtt_test or "1k"
    if msrvtt_train not in ("9k", "7k", "full"):
        raise UserValueError(f"msrvtt_train must be '9k', '7k' or 'full', got {msrvtt_train!r}")
    if msrvtt_test not in ("1k", "full"):
        raise UserValueError(f"msrvtt_test must be '1k' or 'full', got {msrvtt_test!r}")
    if split == "test" and msrvtt_test == "1k":
        path = _need(anno_path, "MSRVTT_JSFUSION_test.csv", "msrvtt", split)
        rows = _read_csv_rows(path, ["video_id", "sentence"], "columns key,vid_key,video_id,sentence")
        ids = [r["video_id"].strip() for r in rows]
        _check_unique(ids, path)
        groups = {}
        for i, (vid, r) in enumerate(zip(ids, rows)):
            groups[vid] = [_check_caption(r["sentence"], path, f"{r.get('key', i)} (video {vid})")]
        return _from_groups("msrvtt", split, ids, groups, file=str(path))

    if split == "val" and msrvtt_train != "full":
        raise UserValueError("msrvtt has no val split unless msrvtt_train='full' (the 9k/7k lists contain "
                             "the 'validate' videos); see has_split")
    data_path = _need(anno_path, "MSRVTT_data.json", "msrvtt", split)
    data = _read_json(data_path)
    if not isinstance(data, dict) or "sentences" not in data or "videos" not in data:
        raise UserValueError(f"{data_path}: expected a JSON object with 'videos' and 'sentences'")
    groups: dict[str, list[str]] = {}
    for k, s in enumerate(data["sentences"]):
        try:
            vid, cap = s["video_id"], s["caption"]
        except (KeyError, TypeError) as e:
            raise UserValueError(f"{data_path}: sentences[{k}] lacks {e} (need video_id, caption)") from e
        groups.setdefault(vid, []).append(_check_caption(cap, data_path, f"sentences[{k}] "
                                                                        f"(sen_id {s.get('sen_id')}, {vid})"))
    if split == "train" and msrvtt_train in ("9k", "7k"):
        list_path = _need(anno_path, f"MSRVTT_train.{msrvtt_train}.csv", "msrvtt", split)
        ids = _read_csv_column(list_path, "video_id")
        _check_unique(ids, list_path)
        _missing(ids, groups, list_path, data_path)
        return _from_groups("msrvtt", split, ids, groups, file=str(list_path), captions=str(data_path))
    wanted = {"train": "train", "val": "validate", "test": "test"}[split]
    ids = []
    for k, v in enumerate(data["videos"]):
        try:
            if v["split"] == wanted:
                ids.append(v["video_id"])
        except (KeyError, TypeError) as e:
            raise UserValueError(f"{data_path}: videos[{k}] lacks {e} (need video_id, split)") from e
    _check_unique(ids, data_path)
    for v in ids:
        if v not in groups:
            raise UserValueError(f"{data_path}: video '{v}' (split {wanted}) has no sentence")
    return _from_groups("msrvtt", split, ids, groups, file=str(data_path))


# --- MSVD ----------------------------------------------------------------------------------------
def _msvd(anno_path: str, split: str, **_: object) -> RetrievalSplit:
    list_path = _need(anno_path, f"{split}_list.txt", "msvd", split)
    cap_path = _need(anno_path, "raw-captions.pkl", "msvd", split)
    ids = _read_id_list(list_path)
    with open(cap_path, "rb") as fh:
        try:
            raw = pickle.load(fh)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
            raise UserValueError(f"{cap_path}: cannot unpickle ({type(e).__name__}: {e})") from e
    if not isinstance(raw, dict):
        kind = type(raw).__name__
        raise UserValueError(f"{cap_path}: expected a dict {{video_id: [token lists]}}, got {kind}")
    _missing(ids, raw, list_path, cap_path)
    groups: dict[str, list[str]] = {}
    for vid in ids:
        caps = raw[vid]
        if not isinstance(caps, (list, tuple)) or not caps:
            raise UserValueError(f"{cap_path}: video '{vid}' has no captions")
        out = []
        for j, tokens in enumerate(caps):
            if isinstance(tokens, str):
                tokens = tokens.split()
            if not isinstance(tokens, (list, tuple)) or not all(isinstance(t, str) for t in tokens):
                raise UserValueError(f"{cap_path}: video '{vid}' caption {j}: expected a list of word tokens")
            out.append(_check_caption(" ".join(tokens), cap_path, f"video '{vid}' caption {j}"))
        groups[vid] = out
    return _from_groups("msvd", split, ids, groups, file=str(list_path), captions=str(cap_path))


# --- LSMDC ---------------------------------------------------------------------------------------
LSMDC_FILES = {"train": "LSMDC16_annos_training.csv", "val": "LSMDC16_annos_val.csv",
               "test": "LSMDC16_challenge_1000_publictect.csv"}
#: Clips the reference drops from every LSMDC split (hard-coded in its loader); we drop them too, logged.
LSMDC_SKIPPED_CLIPS = frozenset({
    "0017_Pianist_00.23.28.872-00.23.34.843",
    "0017_Pianist_00.30.36.767-00.30.38.009",
    "3064_SPARKLE_2012_01.41.07.000-01.41.11.793",
})


def _lsmdc(anno_path: str, split: str, **_: object) -> RetrievalSplit:
    """LSMDC as it ships: a clip id may appear on several lines (``<CLIP_ID>`` is not unique in the
    training and val csvs); each repeat is one more caption of the same clip, as in the reference.
    Captions keep the file's line order (the reference's text order, which the ``paper`` evaluation
    blocks depend on); clips are numbered by first appearance. The reference's three skipped clips
    (:data:`LSMDC_SKIPPED_CLIPS`) are dropped. Both are counted in the log."""
    path = _need(anno_path, LSMDC_FILES[split], "lsmdc", split)
    ids: list[str] = []
    index: dict[str, int] = {}
    captions: list[str] = []
    caption_video: list[int] = []
    repeats = 0
    skipped: dict[str, int] = {}
    with open(path, encoding="utf-8", newline="") as fh:
        # The sentences contain unbalanced quotes: no quote handling at all.
        for lineno, row in enumerate(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if not row or not any(x.strip() for x in row):
                continue
            if len(row) < 6:
                raise UserValueError(f"{path}: line {lineno}: expected 6 tab-separated fields (clip_id, "
                                     f"4 times, sentence), got {len(row)}")
            clip_id = row[0].strip()
            if not clip_id:
                raise UserValueError(f"{path}: line {lineno}: empty clip id")
            if clip_id in LSMDC_SKIPPED_CLIPS:
                skipped[clip_id] = skipped.get(clip_id, 0) + 1
                continue
            sentence = _check_caption(" ".join(x for x in row[5:] if x.strip()), path,
                                      f"line {lineno} ({clip_id})")
            if clip_id in index:
                repeats += 1
            else:
                index[clip_id] = len(ids)
                ids.append(clip_id)
            captions.append(sentence)
            caption_video.append(index[clip_id])
    if skipped:
        log.info("lsmdc %s (%s): skipped %d line(s) of %d clip(s) the reference skips: %s", split, path,
                 sum(skipped.values()), len(skipped), ", ".join(sorted(skipped)))
    if repeats:
        log.info("lsmdc %s (%s): %d line(s) repeat an earlier clip id and are kept as extra captions of "
                 "that clip (%d clips, %d captions)", split, path, repeats, len(ids), len(captions))
    if not ids:
        raise UserValueError(f"lsmdc {split}: the split is empty ({path})")
    return RetrievalSplit("lsmdc", split, ids, captions, caption_video, None, {"file": str(path)})


# --- ActivityNet Captions ------------------------------------------------------------------------
def _paragraph(sentences, path: Path, record: str) -> str:
    if isinstance(sentences, str):
        sentences = [sentences]
    if not isinstance(sentences, (list, tuple)):
        raise UserValueError(f"{path}: record {record}: expected a list of sentences")
    for j, s in enumerate(sentences):
        if not isinstance(s, str):
            raise UserValueError(f"{path}: record {record}: sentence {j} is {type(s).__name__}, not text")
    return _check_caption(" ".join(s.strip() for s in sentences if s.strip()), path, record)


def _activitynet(anno_path: str, split: str, **_: object) -> RetrievalSplit:
    if split == "val":
        raise UserValueError("activitynet has no val split (val_1 is the test set); see has_split")
    if split == "train":
        anno_name, ids_name = "train.json", "train_ids.json"
    else:
        anno_name, ids_name = "val_1.json", "val_ids.json"
    anno_file = _need(anno_path, anno_name, "activitynet", split)
    ids_file = _need(anno_path, ids_name, "activitynet", split)
    anno = _read_json(anno_file)
    ids = _read_json(ids_file)
    if not isinstance(anno, dict):
        raise UserValueError(f"{anno_file}: expected a JSON object "
                             f"{{video_id: {{duration, timestamps, sentences}}}}")
    if not isinstance(ids, list) or not all(isinstance(v, str) for v in ids):
        raise UserValueError(f"{ids_file}: expected a JSON list of video ids")
    _check_unique(ids, ids_file)
    _missing(ids, anno, ids_file, anno_file)
    groups = {}
    for vid in ids:
        rec = anno[vid]
        if not isinstance(rec, dict) or "sentences" not in rec:
            raise UserValueError(f"{anno_file}: record '{vid}' has no 'sentences'")
        groups[vid] = [_paragraph(rec["sentences"], anno_file, f"'{vid}'")]
    return _from_groups("activitynet", split, ids, groups, file=str(anno_file), ids=str(ids_file))


# --- DiDeMo --------------------------------------------------------------------------------------
def _didemo_id(name: str) -> str:
    stem, ext = os.path.splitext(name.strip())
    return stem if ext.lower() in _VIDEO_EXTS else name.strip()


def _didemo(anno_path: str, split: str, **_: object) -> RetrievalSplit:
    anno_file = _need(anno_path, f"{split}_data.json", "didemo", split)
    records = _read_json(anno_file)
    if not isinstance(records, list):
        raise UserValueError(f"{anno_file}: expected a JSON list of records {{video, times, description}}")
    texts: dict[str, list[str]] = {}
    order: list[str] = []
    for k, r in enumerate(records):
        if not isinstance(r, dict) or "video" not in r or "description" not in r:
            raise UserValueError(f"{anno_file}: record {k} lacks 'video' or 'description'")
        vid = _didemo_id(r["video"])
        if not isinstance(r["description"], str):
            raise UserValueError(f"{anno_file}: record {k} ({r['video']}): description is not text")
        if vid not in texts:
            texts[vid] = []
            order.append(vid)
        texts[vid].append(r["description"])
    groups = {vid: [_paragraph(t, anno_file, f"video '{vid}'")] for vid, t in texts.items()}
    list_file = Path(anno_path) / f"{split}_list.txt"
    source = {"file": str(anno_file)}
    if list_file.is_file():
        ids = [_didemo_id(v) for v in _read_id_list(list_file)]
        _check_unique(ids, list_file)
        _missing(ids, groups, list_file, anno_file)
        source["list"] = str(list_file)
    else:
        ids = order
    windows = {vid: DIDEMO_WINDOW for vid in ids}
    return _from_groups("didemo", split, ids, groups, windows, **source)


_PARSERS = {"msrvtt": _msrvtt, "msvd": _msvd, "lsmdc": _lsmdc, "activitynet": _activitynet, "didemo": _didemo}


def has_split(datatype: str, split: str, anno_path: str | None = None, **options: object) -> bool:
    """Whether ``datatype`` has ``split`` under the given options.

    MSR-VTT has a val split only with ``msrvtt_train="full"`` (the 9k/7k lists contain the 'validate'
    videos); ActivityNet never (val_1 is its test set); DiDeMo only when ``anno_path`` is given and
    holds ``val_data.json``.
    """
    if datatype not in DATATYPES:
        raise UserValueError(f"unknown datatype {datatype!r}; expected one of {DATATYPES}")
    if split not in SPLITS:
        raise UserValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if split != "val":
        return True
    if datatype == "msrvtt":
        return (options.get("msrvtt_train") or "9k") == "full"
    if datatype == "activitynet":
        return False
    if datatype == "didemo":
        return anno_path is not None and (Path(anno_path) / "val_data.json").is_file()
    return True


def load_split(datatype: str, anno_path: str | os.PathLike, split: str, **options: object) -> RetrievalSplit:
    """Read one split of ``datatype`` from the real annotation files in ``anno_path``.

    Options: ``msrvtt_train`` ("9k" | "7k" | "full"), ``msrvtt_test`` ("1k" | "full"); other options
    are ignored by the datasets they do not concern.
    """
    if datatype not in DATATYPES:
        raise UserValueError(f"unknown datatype {datatype!r}; expected one of {DATATYPES}")
    if split not in SPLITS:
        raise UserValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return _PARSERS[datatype](str(anno_path), split, **options)


# --- MSRVTT-QA (docs/reference.md, 'EMCL-QA') -------------------------------------------------------------
QA_FILES = {"train": "train.jsonl", "val": "val.jsonl", "test": "test.jsonl"}
QA_VOCAB_FILE = "train_ans2label.json"


@dataclass(frozen=True)
class QARecord:
    """One question of a QA split: the video it asks about, the question, the answer and its type."""

    video_id: str
    question: str
    answer: str
    answer_type: str
    line: int  # 1-based line in the jsonl file, for messages


@dataclass
class QASplit:
    """One split of an MSRVTT-QA-layout dataset: its records in file order and the file they came from.

    ``datatype`` and ``windows`` (none: whole clips) let the retrieval video datasets read its videos.
    """

    split: str
    records: list[QARecord]
    file: str
    datatype: str = "msrvtt_qa"
    windows: dict[str, tuple[float, float]] | None = None
    video_ids: list[str] = field(init=False, repr=False)  # distinct, in order of first appearance
    record_video: list[int] = field(init=False, repr=False)  # index into video_ids of each record

    def __post_init__(self) -> None:
        index: dict[str, int] = {}
        self.record_video = [index.setdefault(r.video_id, len(index)) for r in self.records]
        self.video_ids = list(index)

    def __len__(self) -> int:
        return len(self.records)


def _qa_field(obj: dict, key: str, path: Path, lineno: int, required: bool = True) -> str | None:
    if key not in obj:
        if not required:
            return None
        raise UserValueError(f"{path}: line {lineno}: record lacks '{key}' (need answer, question, video_id)")
    return _one_line(obj[key], f"{path}: line {lineno}", f"'{key}'")


def load_qa_split(anno_path: str | os.PathLike, split: str) -> QASplit:
    """Read ``{anno_path}/{split}.jsonl`` (one JSON object per line: answer, question, video_id,
    answer_type). Blank lines are ignored; a line that is not such an object raises ``ValueError``
    naming the file and the line. A record without ``answer_type`` gets ``"unknown"``."""
    if split not in QA_FILES:
        raise UserValueError(f"unknown split {split!r}; expected one of {tuple(QA_FILES)}")
    path = _need(anno_path, QA_FILES[split], "msrvtt_qa", split)
    records: list[QARecord] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserValueError(f"{path}: line {lineno}: not valid JSON ({e.msg}): "
                                 f"{line.strip()[:80]!r}") from e
            if not isinstance(obj, dict):
                raise UserValueError(f"{path}: line {lineno}: expected a JSON object, "
                                     f"got {type(obj).__name__}")
            vid = _qa_field(obj, "video_id", path, lineno)
            question = _qa_field(obj, "question", path, lineno)
            answer = _qa_field(obj, "answer", path, lineno)
            atype = _qa_field(obj, "answer_type", path, lineno, required=False) or "unknown"
            records.append(QARecord(vid, question, answer, atype, lineno))
    if not records:
        raise UserValueError(f"{path}: no records (the {split} split is empty)")
    return QASplit(split, records, str(path))


def load_ans2label(anno_path: str | os.PathLike) -> dict[str, int]:
    """The answer vocabulary ``{answer: id}`` of ``{anno_path}/train_ans2label.json``; ids must be
    exactly 0..n-1 (checked, the error names the file and the offending entry)."""
    path = _need(anno_path, QA_VOCAB_FILE, "msrvtt_qa", "vocabulary")
    data = _read_json(path)
    if not isinstance(data, dict) or not data:
        raise UserValueError(f"{path}: expected a non-empty JSON object {{answer: id}}")
    seen: dict[int, str] = {}
    for answer, idx in data.items():
        if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < len(data):
            raise UserValueError(f"{path}: answer {answer!r} has id {idx!r}, not an integer in "
                             f"0..{len(data) - 1}")
        if idx in seen:
            raise UserValueError(f"{path}: answers {seen[idx]!r} and {answer!r} share id {idx}")
        seen[idx] = answer
    return dict(data)
