"""Synthetic video-text retrieval data in the real datasets' file layouts.

Each clip shows 1-3 identical objects (one colour, one shape) on a plain background, all moving in
one direction (or staying still). Every caption names the count, colour, shape and motion (and often
the background), with several paraphrases per clip, so that a tiny model trained from scratch at
32-64 px can learn retrieval. The annotations are written exactly as the real MSR-VTT, MSVD, LSMDC,
ActivityNet Captions and DiDeMo files are laid out (docs/reference.md, 'Datasets and formats'), so the
same loaders read both.

Format ``msrvtt_qa`` writes video question answering data in MSRVTT-QA's layout (docs/reference.md,
'EMCL-QA'): ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` (one ``{"answer", "question", "video_id",
"answer_type"}`` object per line) and ``train_ans2label.json``. Every clip gets one question about each
of its colour and background (``what``), shape (``what``), motion (``where``) and count (``how``). Some
answers are paraphrases ("ball", "violet") drawn rarely; the vocabulary keeps the most frequent training
answers, as the real one keeps the 1,500 most frequent, so those paraphrases are out of vocabulary.

Command line::

    python -m emcl.data.synthetic --out DIR --num_videos N --seed S [--format msvd|msrvtt_qa|...] \
        [--split-sizes TRAIN,VAL,TEST] [--frames F --fps R --size S] [--vocab-size V]

The same seed gives byte-identical annotation files (and identical videos with the same PyAV build).
A completion marker with the arguments lets :func:`make_synthetic` skip work already done.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import pickle
import random
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from emcl.fileio import save_bytes

FORMATS = ("msrvtt", "msvd", "lsmdc", "activitynet", "didemo")
QA_FORMATS = ("msrvtt_qa",)
ALL_FORMATS = FORMATS + QA_FORMATS
GENERATOR_VERSION = 1
MARKER_NAME = ".synthetic_complete.json"
ATTRIBUTES_NAME = "synthetic_attributes.json"

# --- visual attributes ---------------------------------------------------------------------------
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (235, 20, 20),
    "green": (20, 200, 40),
    "blue": (30, 60, 255),
    "yellow": (255, 225, 0),
    "purple": (150, 30, 220),
    "cyan": (0, 215, 215),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (120, 120, 120),
}
SHAPES = ("square", "circle", "triangle", "cross")
MOTIONS = ("left", "right", "up", "down", "still")
COUNTS = (1, 2, 3)

# --- caption vocabulary --------------------------------------------------------------------------
COLOR_WORDS = {
    "red": ["red"],
    "green": ["green"],
    "blue": ["blue"],
    "yellow": ["yellow"],
    "purple": ["purple", "violet"],
    "cyan": ["cyan", "turquoise"],
}
BACKGROUND_WORDS = {"black": ["black", "dark"], "white": ["white"], "gray": ["gray", "grey"]}
# (singular, plural)
SHAPE_WORDS = {
    "square": [("square", "squares"), ("box", "boxes"), ("block", "blocks")],
    "circle": [("circle", "circles"), ("ball", "balls"), ("disc", "discs")],
    "triangle": [("triangle", "triangles")],
    "cross": [("cross", "crosses"), ("plus sign", "plus signs")],
}
# (words, grammatical number)
COUNT_WORDS = {
    1: [("a", "sg"), ("one", "sg"), ("a single", "sg")],
    2: [("two", "pl"), ("a pair of", "pl")],
    3: [("three", "pl"), ("a group of three", "pl"), ("a trio of", "pl")],
}
# (plural/base verb, singular verb, -ing form, direction phrase)
MOTION_WORDS = {
    "left": [("move", "moves", "moving", "left"), ("move", "moves", "moving", "to the left"),
             ("slide", "slides", "sliding", "to the left"), ("drift", "drifts", "drifting", "leftward"),
             ("travel", "travels", "traveling", "from right to left"), ("go", "goes", "going", "left")],
    "right": [("move", "moves", "moving", "right"), ("move", "moves", "moving", "to the right"),
              ("slide", "slides", "sliding", "to the right"), ("drift", "drifts", "drifting", "rightward"),
              ("travel", "travels", "traveling", "from left to right"), ("go", "goes", "going", "right")],
    "up": [("move", "moves", "moving", "up"), ("rise", "rises", "rising", "upward"),
           ("float", "floats", "floating", "up"), ("travel", "travels", "traveling", "from bottom to top"),
           ("go", "goes", "going", "up")],
    "down": [("move", "moves", "moving", "down"), ("fall", "falls", "falling", "down"),
             ("drop", "drops", "dropping", "downward"),
             ("travel", "travels", "traveling", "from top to bottom"),
             ("sink", "sinks", "sinking", "down")],
    "still": [("stay", "stays", "staying", "still"), ("remain", "remains", "remaining", "in place"),
              ("stand", "stands", "standing", "still"), ("remain", "remains", "remaining", "motionless")],
}

# LSMDC-like movie names (fictional).
MOVIES = ("Shape_Parade", "Color_Drift", "Moving_Blocks", "The_Bouncing_Ball", "Triangle_Street",
          "Crossroads_Of_Color", "Grey_Days", "Night_Of_Shapes")


@dataclass(frozen=True)
class ClipAttributes:
    """What one synthetic clip shows."""

    count: int
    color: str
    shape: str
    motion: str
    background: str

    def key(self) -> tuple:
        return (self.count, self.color, self.shape, self.motion, self.background)


def num_attribute_combinations() -> int:
    """Number of distinct attribute combinations the generator can draw."""
    return len(COUNTS) * len(COLORS) * len(SHAPES) * len(MOTIONS) * len(BACKGROUNDS)


def sample_attributes(rng: random.Random) -> ClipAttributes:
    """Draw one clip's attributes uniformly."""
    return ClipAttributes(
        count=rng.choice(COUNTS),
        color=rng.choice(list(COLORS)),
        shape=rng.choice(SHAPES),
        motion=rng.choice(MOTIONS),
        background=rng.choice(list(BACKGROUNDS)),
    )


# --- captions ------------------------------------------------------------------------------------
def _parts(attrs: ClipAttributes, rng: random.Random) -> dict[str, str]:
    count, number = rng.choice(COUNT_WORDS[attrs.count])
    sg, pl = rng.choice(SHAPE_WORDS[attrs.shape])
    base, third, ing, direction = rng.choice(MOTION_WORDS[attrs.motion])
    return {
        "count": count,
        "noun": sg if number == "sg" else pl,
        "color": rng.choice(COLOR_WORDS[attrs.color]),
        "bg": rng.choice(BACKGROUND_WORDS[attrs.background]),
        "verb": (third if number == "sg" else base) + " " + direction,
        "ing": ing + " " + direction,
        "be": "is" if number == "sg" else "are",
        "the_noun": "the " + (sg if number == "sg" else pl),
    }


TEMPLATES = (
    "{count} {color} {noun} {verb}",
    "{count} {color} {noun} {verb} on a {bg} background",
    "there {be} {count} {color} {noun} {ing}",
    "a {bg} screen with {count} {color} {noun} {ing}",
    "on a {bg} background {count} {color} {noun} {verb}",
    "{count} {noun} colored {color} {verb}",
    "we see {count} {color} {noun} {ing} against a {bg} backdrop",
    "the video shows {count} {color} {noun} {ing}",
    "{count} {color} {noun} {ing} over a {bg} background",
)


def make_caption(attrs: ClipAttributes, rng: random.Random) -> str:
    """One lower-case paraphrase naming count, colour, shape and motion (often background too)."""
    return rng.choice(TEMPLATES).format(**_parts(attrs, rng))


def make_captions(attrs: ClipAttributes, rng: random.Random, n: int) -> list[str]:
    """``n`` distinct paraphrases (distinct as long as the vocabulary allows)."""
    out: list[str] = []
    for _ in range(50 * n):
        if len(out) == n:
            break
        cap = make_caption(attrs, rng)
        if cap not in out:
            out.append(cap)
    while len(out) < n:  # vocabulary exhausted: repeat (cannot happen for n <= 20)
        out.append(make_caption(attrs, rng))
    return out


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def make_paragraph_sentences(attrs: ClipAttributes, rng: random.Random, n: int) -> list[str]:
    """ActivityNet-style sentences: what is there, then what it does (then optional extras)."""
    p = _parts(attrs, rng)
    first = rng.choice([
        "{count} {color} {noun} {appear} on a {bg} background",
        "we see {count} {color} {noun} against a {bg} backdrop",
        "a {bg} screen shows {count} {color} {noun}",
    ])
    appear = "appears" if p["be"] == "is" else "appear"
    sentences = [_sentence(first.format(appear=appear, **p))]
    sentences.append(_sentence(rng.choice(["{the_noun} then {verb}", "{the_noun} {verb}",
                                           "after that {the_noun} {verb}"]).format(**p)))
    extras = [
        "the {bg} background does not change",
        "{the_noun} keep{s} {ing}",
        "the {color} {noun} {be} still visible at the end",
    ]
    rng.shuffle(extras)
    for extra in extras[: max(0, n - 2)]:
        sentences.append(_sentence(extra.format(s="s" if p["be"] == "is" else "", **p)))
    return sentences[:n] if n >= 2 else sentences[:1]


# --- rendering -----------------------------------------------------------------------------------
def shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean ``side``×``side`` mask of one object."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5
    c = side / 2.0
    if shape == "square":
        return np.ones((side, side), dtype=bool)
    if shape == "circle":
        return (yy - c) ** 2 + (xx - c) ** 2 <= c * c
    if shape == "triangle":  # apex at the top, base at the bottom
        return np.abs(xx - c) <= yy / 2.0
    if shape == "cross":
        t = side / 6.0
        return (np.abs(xx - c) <= t) | (np.abs(yy - c) <= t)
    raise ValueError(f"unknown shape {shape!r}")


def render_clip(attrs: ClipAttributes, frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render a clip as uint8 (frames, size, size, 3) RGB.

    Objects are ~30% of the frame side (24% when there are three), in separate lanes across the motion
    axis with a clear gap between them, and travel 40% of the side over the clip, so colour, shape,
    count and direction stay visible after a downscale to 32 px.
    """
    obj = max(4, int(round((0.3 if attrs.count < 3 else 0.24) * size)))
    travel = int(round(0.4 * size))
    mask = shape_mask(attrs.shape, obj)
    video = np.empty((frames, size, size, 3), dtype=np.uint8)
    video[:] = np.array(BACKGROUNDS[attrs.background], dtype=np.uint8)
    color = np.array(COLORS[attrs.color], dtype=np.uint8)

    horizontal = attrs.motion in ("left", "right") or (attrs.motion == "still" and rng.random() < 0.5)
    lane = size / attrs.count
    margin = min((lane - obj) / 2.0, max(1.0, 0.05 * size))  # objects stay >= 2*margin apart
    starts = []
    for k in range(attrs.count):  # position across the motion axis: one lane per object
        lo = k * lane + margin
        hi = (k + 1) * lane - margin - obj
        across = int(round(lo + rng.random() * max(0.0, hi - lo)))
        along = int(rng.integers(0, size - obj - travel + 1))
        starts.append((min(max(across, 0), size - obj), along))
    sign = {"left": -1, "up": -1, "right": 1, "down": 1, "still": 0}[attrs.motion]
    for f in range(frames):
        shift = (f / max(1, frames - 1)) * travel
        for across, along in starts:
            pos = along + (travel - shift if sign < 0 else shift if sign > 0 else travel / 2)
            pos = int(round(pos))
            y, x = (across, pos) if horizontal else (pos, across)
            region = video[f, y:y + obj, x:x + obj]
            region[mask] = color
    return video


def _pick_codec() -> str:
    import av

    for name in ("libx264", "mpeg4", "libopenh264"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 - codec absent from this build
            continue
    raise RuntimeError("PyAV has none of the encoders libx264, mpeg4, libopenh264")


def write_video(path: Path, video: np.ndarray, fps: int, codec: str | None = None) -> None:
    """Encode uint8 (T,H,W,3) frames to ``path`` (container from the suffix), atomically."""
    import av

    codec = codec or _pick_codec()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp_", suffix=path.suffix)
    os.close(fd)
    try:
        container = av.open(tmp, "w", format="avi" if path.suffix == ".avi" else "mp4")
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = video.shape[2], video.shape[1]
        if codec == "libx264":
            # full-resolution chroma: with 4:2:0 a 32 px clip has 16 px colour planes and thin shapes on
            # the gray background lose their colour at the edges
            stream.pix_fmt = "yuv444p"
            stream.options = {"crf": "18", "preset": "veryfast", "bf": "0", "threads": "1"}
        else:
            stream.pix_fmt = "yuv420p"
            stream.bit_rate = 2_000_000
            stream.options = {"bf": "0", "threads": "1"}
        for frame in video:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        container.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --- ids -----------------------------------------------------------------------------------------
_YT_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"


def _youtube_id(rng: random.Random) -> str:
    return "".join(rng.choice(_YT_CHARS) for _ in range(11))


def _lsmdc_time(seconds: float) -> str:
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}.{m:02d}.{s:02d}.{ms:03d}"


def make_video_ids(fmt: str, n: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """(ids, file names) in the naming style of each dataset."""
    ids: list[str] = []
    names: list[str] = []
    seen: set[str] = set()
    t = 30.0
    for i in range(n):
        while True:
            if fmt in ("msrvtt", "msrvtt_qa"):
                vid, name = f"video{i}", f"video{i}.mp4"
            elif fmt == "msvd":
                start = rng.randint(0, 300)
                vid = f"{_youtube_id(rng)}_{start}_{start + rng.randint(2, 20)}"
                name = vid + ".avi"
            elif fmt == "lsmdc":
                movie = i // 5
                t = 30.0 if i % 5 == 0 else t
                t += rng.uniform(2.0, 30.0)
                end = t + rng.uniform(1.5, 6.0)
                vid = (f"{movie + 1:04d}_{MOVIES[movie % len(MOVIES)]}"
                       f"_{_lsmdc_time(t)}-{_lsmdc_time(end)}")
                t = end
                name = vid + ".mp4"
            elif fmt == "activitynet":
                vid = "v_" + _youtube_id(rng)
                name = vid + ".mp4"
            elif fmt == "didemo":
                vid = (f"{rng.randint(10**7, 10**8 - 1)}@N{rng.randint(0, 9):02d}"
                       f"_{rng.randint(10**9, 10**10 - 1)}_{rng.getrandbits(40):010x}")
                name = vid + ".mp4"
            else:
                raise ValueError(f"unknown format {fmt!r}; expected one of {ALL_FORMATS}")
            if vid not in seen:
                break
        seen.add(vid)
        ids.append(vid)
        names.append(name)
    return ids, names


# --- writing annotation files --------------------------------------------------------------------
def _json_bytes(obj) -> bytes:
    return json.dumps(obj, indent=None, ensure_ascii=False).encode("utf-8")


def _csv_bytes(rows: Sequence[Sequence]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue().encode("utf-8")


def _tsv_bytes(rows: Sequence[Sequence[str]]) -> bytes:
    """Tab-separated lines with no quoting at all (LSMDC style: quotes inside fields stay raw)."""
    return "".join("\t".join(str(x) for x in row) + "\n" for row in rows).encode("utf-8")


def _lines_bytes(lines: Sequence[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode("utf-8")


def default_split_sizes(n: int) -> tuple[int, int, int]:
    """70/10/20% split (at least one test video and, from 3 videos on, one val video)."""
    test = max(1, int(round(0.2 * n)))
    val = max(1 if n >= 3 else 0, int(round(0.1 * n)))
    train = n - val - test
    if train < 1:
        raise ValueError(f"num_videos={n} is too small for a train/val/test split")
    return train, val, test


def _write_annotations(fmt: str, anno: Path, ids: list[str], names: list[str],
                       attrs: list[ClipAttributes], split_of: list[str], rng: random.Random,
                       captions_per_video: int, duration: float) -> None:
    by_split = {s: [i for i, sp in enumerate(split_of) if sp == s] for s in ("train", "val", "test")}

    if fmt == "msrvtt":
        videos, sentences = [], []
        sen_id = 0
        split_name = {"train": "train", "val": "validate", "test": "test"}
        first_caption = {}
        for i, vid in enumerate(ids):
            videos.append({"category": rng.randint(0, 19), "url": f"https://www.youtube.com/watch?v={vid}",
                           "video_id": vid, "start time": 0.0, "end time": duration,
                           "split": split_name[split_of[i]], "id": i})
            for cap in make_captions(attrs[i], rng, captions_per_video):
                sentences.append({"caption": cap, "video_id": vid, "sen_id": sen_id})
                first_caption.setdefault(vid, cap)
                sen_id += 1
        data = {"info": {"contributor": "synthetic", "year": 2016}, "videos": videos, "sentences": sentences}
        save_bytes(_json_bytes(data), anno / "MSRVTT_data.json")
        train_ids = [ids[i] for i in by_split["train"]]
        save_bytes(_csv_bytes([["video_id"]] + [[v] for v in train_ids]), anno / "MSRVTT_train.9k.csv")
        n7 = max(1, int(round(len(train_ids) * 7 / 9)))
        save_bytes(_csv_bytes([["video_id"]] + [[v] for v in train_ids[:n7]]), anno / "MSRVTT_train.7k.csv")
        rows = [["key", "vid_key", "video_id", "sentence"]]
        for k, i in enumerate(by_split["test"]):
            num = ids[i][len("video"):]
            rows.append([f"ret{k}", f"msr{num}", ids[i], first_caption[ids[i]]])
        save_bytes(_csv_bytes(rows), anno / "MSRVTT_JSFUSION_test.csv")

    elif fmt == "msvd":
        raw = {}
        for i, vid in enumerate(ids):
            n = 1 if i % 4 == 3 else captions_per_video  # some videos with exactly one caption
            raw[vid] = [cap.split() for cap in make_captions(attrs[i], rng, n)]
        save_bytes(pickle.dumps(raw, protocol=4), anno / "raw-captions.pkl")
        for split, fname in (("train", "train_list.txt"), ("val", "val_list.txt"), ("test", "test_list.txt")):
            save_bytes(_lines_bytes([ids[i] for i in by_split[split]]), anno / fname)

    elif fmt == "lsmdc":
        files = {"train": "LSMDC16_annos_training.csv", "val": "LSMDC16_annos_val.csv",
                 "test": "LSMDC16_challenge_1000_publictect.csv"}
        for split, fname in files.items():
            rows = []
            for i in by_split[split]:
                vid = ids[i]
                start, end = vid.rsplit("_", 1)[1].split("-")
                cap = _sentence(make_caption(attrs[i], rng))
                if i % 3 == 2:  # unbalanced quote, as in the real files (needs QUOTE_NONE to read)
                    cap = '"' + cap
                rows.append([vid, start, end, start, end, cap])
            save_bytes(_tsv_bytes(rows), anno / fname)

    elif fmt == "activitynet":
        def block(idx: list[int]) -> dict:
            out = {}
            for i in idx:
                n = rng.randint(2, 3)
                cuts = sorted(round(rng.uniform(0.2, 0.8) * duration, 2) for _ in range(n - 1))
                bounds = [0.0] + cuts + [round(duration, 2)]
                stamps = [[bounds[k], bounds[k + 1]] for k in range(n)]
                sentences = make_paragraph_sentences(attrs[i], rng, n)
                out[ids[i]] = {"duration": round(duration, 2), "timestamps": stamps,
                               "sentences": [(" " if k else "") + s for k, s in enumerate(sentences)]}
            return out

        save_bytes(_json_bytes(block(by_split["train"])), anno / "train.json")
        save_bytes(_json_bytes(block(by_split["test"])), anno / "val_1.json")
        save_bytes(_json_bytes(block(by_split["val"])), anno / "val_2.json")
        save_bytes(_json_bytes([ids[i] for i in by_split["train"]]), anno / "train_ids.json")
        save_bytes(_json_bytes([ids[i] for i in by_split["test"]]), anno / "val_ids.json")

    elif fmt == "didemo":
        exts = (".avi", ".mov", ".mp4", ".m4v", ".3gp")
        files = {"train": "train", "val": "val", "test": "test"}
        ann_id = 0
        for split, stem in files.items():
            records, listed = [], []
            for i in by_split[split]:
                field = ids[i] + rng.choice(exts)  # original upload extension; files are {id}.mp4
                listed.append(field)
                for cap in make_captions(attrs[i], rng, rng.randint(2, 4)):
                    seg = rng.randint(0, 5)
                    times = [[seg, min(5, seg + rng.randint(0, 1))] for _ in range(4)]
                    records.append({"num_segments": 6, "annotation_id": ann_id, "description": cap,
                                    "dl_link": f"https://www.flickr.com/video_download/{ann_id}",
                                    "video": field, "times": times})
                    ann_id += 1
            save_bytes(_json_bytes(records), anno / f"{stem}_data.json")
            save_bytes(_lines_bytes(listed), anno / f"{stem}_list.txt")
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


# --- question answering (MSRVTT-QA layout) -------------------------------------------------------
QA_COUNT_ANSWERS = {1: "one", 2: "two", 3: "three"}
QA_MOTION_ANSWERS = {"left": "left", "right": "right", "up": "up", "down": "down", "still": "nowhere"}
# rare paraphrased answers (single words, as MSRVTT-QA's answers): these end up out of vocabulary
QA_ANSWER_PARAPHRASES = {"purple": ["violet"], "cyan": ["turquoise"], "square": ["box", "block"],
                         "circle": ["ball", "disc"]}
QA_PARAPHRASE_PROB = 0.2


def _qa_nouns(attrs: ClipAttributes, rng: random.Random) -> tuple[str, str, str]:
    sg, pl = rng.choice([w for w in SHAPE_WORDS[attrs.shape] if " " not in w[0]] or SHAPE_WORDS[attrs.shape])
    return (sg, "is", "does") if attrs.count == 1 else (pl, "are", "do")


def _qa_answer(canonical: str, rng: random.Random) -> str:
    alternatives = QA_ANSWER_PARAPHRASES.get(canonical)
    if alternatives and rng.random() < QA_PARAPHRASE_PROB:
        return rng.choice(alternatives)
    return canonical


def make_questions(attrs: ClipAttributes, rng: random.Random) -> list[dict[str, str]]:
    """One question each about colour, shape, motion, count and background, in random order.

    Returns ``{"answer", "question", "answer_type"}`` dicts; questions never contain their answer.
    """
    noun, be, do = _qa_nouns(attrs, rng)
    color = rng.choice(COLOR_WORDS[attrs.color])
    plural = SHAPE_WORDS[attrs.shape][0][1]
    out = [
        {"answer": _qa_answer(attrs.color, rng), "answer_type": "what",
         "question": rng.choice([f"what color {be} the {noun}?", f"what is the color of the {noun}?"])},
        {"answer": _qa_answer(attrs.shape, rng), "answer_type": "what",
         "question": rng.choice([f"what shape {be} the {color} object{'s' if be == 'are' else ''}?",
                                 f"what {be} the {color} thing{'s' if be == 'are' else ''}?"])},
        {"answer": QA_MOTION_ANSWERS[attrs.motion], "answer_type": "where",
         "question": rng.choice([f"where {do} the {color} {noun} move?", f"where {be} the {noun} going?"])},
        {"answer": QA_COUNT_ANSWERS[attrs.count], "answer_type": "how",
         "question": rng.choice([f"how many {color} {plural} are there?", f"how many {plural} are shown?"])},
        {"answer": attrs.background, "answer_type": "what",
         "question": rng.choice(["what color is the background?", f"what is behind the {noun}?"])},
    ]
    rng.shuffle(out)
    return out


def _qa_line(vid: str, q: dict[str, str]) -> str:
    # the key order and separators of the real files
    return json.dumps({"answer": q["answer"], "question": q["question"], "video_id": vid,
                       "answer_type": q["answer_type"]}, ensure_ascii=False)


def _write_qa_annotations(anno: Path, ids: list[str], attrs: list[ClipAttributes], split_of: list[str],
                          rng: random.Random, vocab_size: int | None) -> None:
    """train/val/test.jsonl and train_ans2label.json: the ``vocab_size`` most frequent training answers
    (default: as many as there are canonical answers), ids in alphabetical order as the real file."""
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    train_answers: Counter = Counter()
    for vid, a, split in zip(ids, attrs, split_of):
        for q in make_questions(a, rng):
            lines[split].append(_qa_line(vid, q))
            if split == "train":
                train_answers[q["answer"]] += 1
    for split, rows in lines.items():
        save_bytes(_lines_bytes(rows), anno / f"{split}.jsonl")
    if vocab_size is None:
        vocab_size = len(COLORS) + len(SHAPES) + len(QA_MOTION_ANSWERS) + len(QA_COUNT_ANSWERS)
        vocab_size += len(BACKGROUNDS)
    ranked = sorted(train_answers.items(), key=lambda kv: (-kv[1], kv[0]))[:vocab_size]
    vocab = sorted(answer for answer, _ in ranked)
    body = ",\n".join(f"{json.dumps(a, ensure_ascii=False)}: {i}" for i, a in enumerate(vocab))
    save_bytes(("{\n" + body + "\n}").encode("utf-8"), anno / "train_ans2label.json")


def attribute_stats(attrs: Sequence[ClipAttributes], split_of: Sequence[str]) -> str:
    """Human-readable per-attribute counts per split, distinct combinations and test duplicates."""
    lines = []
    for split in ("train", "val", "test"):
        sub = [a for a, s in zip(attrs, split_of) if s == split]
        if not sub:
            continue
        lines.append(f"[{split}] {len(sub)} videos, {len({a.key() for a in sub})} distinct combinations")
        for field in ("count", "color", "shape", "motion", "background"):
            c = Counter(getattr(a, field) for a in sub)
            lines.append(f"  {field:10s} " + ", ".join(f"{k}={v}" for k, v in sorted(c.items(), key=str)))
        dup = sum(v - 1 for v in Counter(a.key() for a in sub).values() if v > 1)
        lines.append(f"  videos repeating an earlier combination in this split: {dup}")
    lines.append(f"possible combinations: {num_attribute_combinations()}")
    return "\n".join(lines)


def make_synthetic(out: str | os.PathLike, num_videos: int, seed: int, format: str = "msvd",
                   split_sizes: Sequence[int] | None = None, frames: int = 16, fps: int = 4,
                   size: int = 64, captions_per_video: int = 5, verbose: bool = False,
                   vocab_size: int | None = None) -> Path:
    """Write a synthetic dataset in ``format``'s real layout and return the annotation folder.

    Videos go to ``out/videos`` and annotation files to ``out/annotations``; per-video attributes to
    ``out/synthetic_attributes.json``. If ``out`` already holds a completed set made with the same
    arguments, nothing is regenerated. ``vocab_size`` (``msrvtt_qa`` only): answers kept in
    ``train_ans2label.json`` (default: the number of canonical answers).
    """
    fmt = format
    if fmt not in ALL_FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {ALL_FORMATS}")
    if vocab_size is not None and (fmt not in QA_FORMATS or vocab_size < 1):
        raise ValueError(f"vocab_size={vocab_size} needs a QA format {QA_FORMATS} and a value >= 1")
    if num_videos < 1 or frames < 2 or fps < 1 or size < 16 or captions_per_video < 1:
        raise ValueError(f"invalid sizes: num_videos={num_videos} frames={frames} fps={fps} size={size} "
                         f"captions_per_video={captions_per_video} (need >=1, >=2, >=1, >=16, >=1)")
    sizes = tuple(int(x) for x in split_sizes) if split_sizes is not None else default_split_sizes(num_videos)
    if len(sizes) != 3 or min(sizes) < 0 or sum(sizes) != num_videos or sizes[0] < 1 or sizes[2] < 1:
        raise ValueError(f"split sizes {sizes} must be three counts TRAIN,VAL,TEST (train and test >= 1) "
                         f"summing to num_videos={num_videos}")
    out = Path(out)
    anno, vids = out / "annotations", out / "videos"
    marker = out / MARKER_NAME
    args = {"version": GENERATOR_VERSION, "format": fmt, "num_videos": num_videos, "seed": seed,
            "split_sizes": list(sizes), "frames": frames, "fps": fps, "size": size,
            "captions_per_video": captions_per_video}
    if fmt in QA_FORMATS:  # only QA sets carry the key: markers of existing sets stay valid
        args["vocab_size"] = vocab_size
    if marker.exists():
        try:
            done = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            done = None
        if done == args:
            if verbose:
                print(f"{out}: already complete, not regenerated")
                print(_stats_from_file(out))
            return anno
        # a different set made by us: remove it so no stale files remain
        marker.unlink()
        for d in (anno, vids):
            if d.exists():
                shutil.rmtree(d)
    anno.mkdir(parents=True, exist_ok=True)
    vids.mkdir(parents=True, exist_ok=True)

    rng = random.Random(seed)
    ids, names = make_video_ids(fmt, num_videos, rng)
    attrs = [sample_attributes(rng) for _ in range(num_videos)]
    split_of = ["train"] * sizes[0] + ["val"] * sizes[1] + ["test"] * sizes[2]
    if fmt in QA_FORMATS:
        _write_qa_annotations(anno, ids, attrs, split_of, rng, vocab_size)
    else:
        _write_annotations(fmt, anno, ids, names, attrs, split_of, rng, captions_per_video, frames / fps)

    codec = _pick_codec()
    for i, name in enumerate(names):
        video = render_clip(attrs[i], frames, size, np.random.default_rng([seed & 0xFFFFFFFF, i]))
        write_video(vids / name, video, fps, codec)

    meta = {"format": fmt, "videos": [{"video_id": v, "file": n, "split": s, **asdict(a)}
                                      for v, n, s, a in zip(ids, names, split_of, attrs)]}
    save_bytes(json.dumps(meta, indent=1).encode("utf-8"), out / ATTRIBUTES_NAME)
    save_bytes(json.dumps(args).encode("utf-8"), marker)
    if verbose:
        print(attribute_stats(attrs, split_of))
    return anno


def _stats_from_file(out: Path) -> str:
    meta = json.loads((out / ATTRIBUTES_NAME).read_text())["videos"]
    fields = ClipAttributes.__dataclass_fields__
    attrs = [ClipAttributes(**{k: m[k] for k in fields}) for m in meta]
    return attribute_stats(attrs, [m["split"] for m in meta])


def load_attributes(out: str | os.PathLike) -> dict[str, ClipAttributes]:
    """Per-video attributes of a generated set, keyed by video id."""
    meta = json.loads((Path(out) / ATTRIBUTES_NAME).read_text())
    fields = ClipAttributes.__dataclass_fields__
    return {m["video_id"]: ClipAttributes(**{k: m[k] for k in fields}) for m in meta["videos"]}


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (videos/ and annotations/ inside)")
    p.add_argument("--num_videos", "--num-videos", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=ALL_FORMATS, default="msvd")
    p.add_argument("--split-sizes", "--split_sizes", default=None,
                   help="TRAIN,VAL,TEST video counts (default 70/10/20%%)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--fps", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--captions-per-video", "--captions_per_video", type=int, default=5)
    p.add_argument("--vocab-size", "--vocab_size", type=int, default=None,
                   help="msrvtt_qa: answers kept in train_ans2label.json (default: the canonical ones)")
    a = p.parse_args(argv)
    sizes = None
    if a.split_sizes:
        try:
            sizes = [int(x) for x in a.split_sizes.split(",")]
        except ValueError:
            p.error(f"--split-sizes must be three integers TRAIN,VAL,TEST, got {a.split_sizes!r}")
    anno = make_synthetic(a.out, a.num_videos, a.seed, format=a.format, split_sizes=sizes, frames=a.frames,
                          fps=a.fps, size=a.size, captions_per_video=a.captions_per_video, verbose=True,
                          vocab_size=a.vocab_size)
    print(f"annotations: {anno}\nvideos: {Path(a.out) / 'videos'}")


if __name__ == "__main__":
    main()
