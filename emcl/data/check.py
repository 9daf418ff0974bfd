"""Check a dataset folder before training: ``python -m emcl.data.check``.

Finds in minutes what would otherwise stop a run hours in, or quietly change its numbers:

- annotations: every split parsed with the trainers' own parsers; videos and captions (questions for
  MSRVTT-QA) counted and compared with a complete copy of the dataset (:data:`EXPECTED`); every duplicate
  video id of a split named;
- videos: every video of every split found and its container probed (duration, fps, frame count, frame
  size; :func:`emcl.data.video.probe_video`, no decoding) on threads; missing, unreadable, zero-length and
  zero-fps files named by id;
- captions: how many are longer than ``--max_words`` tokens of the CLIP tokenizer (they are cut);
- ``--frame_cache``: whether the cache holds every video of each split, with the run's settings.

Each split gets a verdict: ``ready``; ``ready with N skips under --skip_bad_videos`` (N unusable videos,
within ``--max_skip_fraction`` of the split, so a run with ``--skip_bad_videos`` goes through); or
``not ready: ...`` (a training run would stop). Exit status 0 when every split is ready, 1 when one is
not, 2 for bad flags or paths. ``--json FILE`` writes the whole report. docs/data.md describes each
dataset's files and the counts of a complete copy.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emcl.data.annotations import SPLITS, has_split, load_ans2label, load_qa_split, load_split
from emcl.data.videofiles import VIDEO_EXTENSIONS
from emcl.errors import UserError, cli_main

log = logging.getLogger("emcl.data.check")

DATATYPES = ("msrvtt", "msvd", "lsmdc", "activitynet", "didemo", "msrvtt_qa")
APPROX_TOLERANCE = 0.02  # an "about N" count within 2% of N is as expected


# ----------------------------------------------------------------------------- counts of a complete copy


@dataclass(frozen=True)
class Count:
    """A count a complete copy has: exact, or ``approx`` where published copies of the dataset differ."""

    n: int
    approx: bool = False

    def compare(self, got: int) -> str:
        """``"matches"``, ``"close"`` (an approximate count within :data:`APPROX_TOLERANCE`) or
        ``"differs"``."""
        if got == self.n:
            return "matches"
        if self.approx and abs(got - self.n) <= APPROX_TOLERANCE * self.n:
            return "close"
        return "differs"

    def text(self) -> str:
        return f"about {self.n:,}" if self.approx else f"{self.n:,}"


def _about(n: int) -> Count:
    return Count(n, approx=True)


#: (dataset, split) -> {"videos": Count, "captions": Count} of a complete copy. MSR-VTT's keys name the
#: list the split comes from (``--msrvtt_train`` / ``--msrvtt_test``); MSRVTT-QA's captions are questions.
#: Sources: the datasets' papers and the annotation files the reference links to (docs/data.md).
EXPECTED: dict[tuple[str, str], dict[str, Count]] = {
    ("msrvtt", "train.9k"): {"videos": Count(9000), "captions": Count(180_000)},
    ("msrvtt", "train.7k"): {"videos": Count(7010), "captions": Count(140_200)},
    ("msrvtt", "train.full"): {"videos": Count(6513), "captions": Count(130_260)},
    ("msrvtt", "val.full"): {"videos": Count(497), "captions": Count(9940)},
    ("msrvtt", "test.1k"): {"videos": Count(1000), "captions": Count(1000)},
    ("msrvtt", "test.full"): {"videos": Count(2990), "captions": Count(59_800)},
    ("msvd", "train"): {"videos": Count(1200), "captions": _about(48_774)},
    ("msvd", "val"): {"videos": Count(100), "captions": _about(4291)},
    ("msvd", "test"): {"videos": Count(670), "captions": _about(27_763)},
    ("lsmdc", "train"): {"captions": _about(101_079)},
    ("lsmdc", "val"): {"captions": _about(7408)},
    ("lsmdc", "test"): {"videos": Count(1000), "captions": Count(1000)},
    ("activitynet", "train"): {"videos": _about(10_009), "captions": _about(10_009)},
    ("activitynet", "test"): {"videos": _about(4917), "captions": _about(4917)},
    ("didemo", "train"): {"videos": _about(8395), "captions": _about(8395)},
    ("didemo", "val"): {"videos": _about(1065), "captions": _about(1065)},
    ("didemo", "test"): {"videos": _about(1004), "captions": _about(1004)},
    ("msrvtt_qa", "train"): {"videos": Count(6513), "captions": Count(158_581)},
    ("msrvtt_qa", "val"): {"videos": Count(497), "captions": Count(12_278)},
    ("msrvtt_qa", "test"): {"videos": Count(2990), "captions": Count(72_821)},
}


def expected_counts(datatype: str, split: str, msrvtt_train: str = "9k",
                    msrvtt_test: str = "1k") -> dict[str, Count]:
    """The counts a complete copy has for one split (empty when none are known)."""
    key = split
    if datatype == "msrvtt":
        key = {"train": f"train.{msrvtt_train}", "val": "val.full", "test": f"test.{msrvtt_test}"}[split]
    return EXPECTED.get((datatype, key), {})


# ----------------------------------------------------------------------------------------- one split


@dataclass
class SplitReport:
    """Everything found about one split; :meth:`to_json` is its part of the ``--json`` report."""

    datatype: str
    name: str
    files: dict[str, str] = field(default_factory=dict)
    video_ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # captions, or questions for QA
    text_video: list[int] = field(default_factory=list)  # index into video_ids of each text
    answers: list[str] = field(default_factory=list)  # QA: the answer of each question
    windows: dict[str, tuple[float, float]] | None = None
    errors: list[str] = field(default_factory=list)  # what stops a run
    notes: list[str] = field(default_factory=list)  # worth knowing, stops nothing
    duplicates: dict[str, int] = field(default_factory=dict)
    expected: dict[str, dict[str, Any]] = field(default_factory=dict)
    video_problems: dict[str, str] = field(default_factory=dict)  # from --video_path
    cache_problems: dict[str, str] | None = None  # from --frame_cache (None: no cache given)
    video_stats: dict[str, Any] = field(default_factory=dict)
    over_max_words: int = 0
    longest: list[dict[str, Any]] = field(default_factory=list)
    out_of_vocabulary: int | None = None
    status: str = ""
    verdict: str = ""

    @property
    def what(self) -> str:
        return f"{self.datatype}/{self.name}"

    @property
    def text_name(self) -> str:
        return "questions" if self.datatype == "msrvtt_qa" else "captions"

    def bad_videos(self) -> dict[str, str]:
        """The videos a run would fail on: the frame cache's problems when it reads one, else the files'."""
        return self.video_problems if self.cache_problems is None else self.cache_problems

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict, "status": self.status, "files": self.files,
            "videos": len(self.video_ids), self.text_name: len(self.texts), "expected": self.expected,
            "duplicates": self.duplicates, "errors": self.errors, "notes": self.notes,
            "video_problems": _by_kind(self.video_problems),
            "cache_problems": None if self.cache_problems is None else _by_kind(self.cache_problems),
            "video_stats": self.video_stats, "over_max_words": self.over_max_words,
            "longest": self.longest, "out_of_vocabulary": self.out_of_vocabulary,
        }  # fmt: skip


def problem_kind(reason: str) -> str:
    """The kind of a video problem: missing, empty, zero_length, zero_fps, ambiguous, not_cached,
    wrong_window, failed_in_cache or unreadable."""
    r = reason.lower()
    if r == "missing" or "not found" in r:
        return "missing"
    for prefix, kind in (("empty", "empty"), ("zero-length", "zero_length"), ("zero fps", "zero_fps"),
                         ("ambiguous", "ambiguous"), ("not in the frame cache", "not_cached"),
                         ("cached for another time window", "wrong_window"),
                         ("recorded as undecodable", "failed_in_cache")):
        if r.startswith(prefix):
            return kind
    return "unreadable"


def _by_kind(problems: dict[str, str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for vid, reason in problems.items():
        out.setdefault(problem_kind(reason), {})[vid] = reason
    return out


# ------------------------------------------------------------------------------------------ annotations


def splits_to_check(datatype: str, anno_path: str, options: dict[str, str],
                    wanted: Sequence[str] | None = None) -> list[str]:
    """The splits a run on ``datatype`` can use (those of ``wanted`` when given)."""
    if datatype == "msrvtt_qa":
        have = [s for s in SPLITS if s != "val" or (Path(anno_path) / "val.jsonl").is_file()]
    else:
        have = [s for s in SPLITS if has_split(datatype, s, anno_path, **options)]
    if wanted:
        missing = [s for s in wanted if s not in have]
        if missing:
            raise UserError(f"--splits: {datatype} has no {', '.join(missing)} split here "
                            f"(it has {', '.join(have)})")
        return [s for s in have if s in wanted]
    return have


def load_annotations(rep: SplitReport, anno_path: str, options: dict[str, str]) -> None:
    """Parse one split into ``rep``; a parser error becomes the split's error, its duplicates named."""
    try:
        if rep.datatype == "msrvtt_qa":
            qa = load_qa_split(anno_path, rep.name)
            rep.files = {"file": qa.file}
            rep.video_ids, rep.text_video = list(qa.video_ids), list(qa.record_video)
            rep.texts = [r.question for r in qa.records]
            rep.answers = [r.answer for r in qa.records]
        else:
            split = load_split(rep.datatype, anno_path, rep.name, **options)
            rep.files = dict(split.files)
            rep.video_ids, rep.texts = list(split.video_ids), list(split.captions)
            rep.text_video, rep.windows = list(split.caption_video), split.windows
    except (UserError, ValueError, FileNotFoundError, OSError) as e:
        rep.errors.append(f"annotations: {e}")
        rep.duplicates = find_duplicates(rep.datatype, anno_path, rep.name, options)
        return
    counts = {"videos": len(rep.video_ids), "captions": len(rep.texts)}
    for key, count in expected_counts(rep.datatype, rep.name, options.get("msrvtt_train", "9k"),
                                      options.get("msrvtt_test", "1k")).items():
        got = counts[key]
        status = count.compare(got)
        rep.expected[key] = {"expected": count.n, "approx": count.approx, "found": got, "status": status}


def _list_ids(datatype: str, anno: Path, split: str, options: dict[str, str]) -> list[tuple[str, list[str]]]:
    """(file, ids as listed) for the split's id lists, read plainly, to name every duplicate."""
    import csv
    import json

    def column(name: str) -> tuple[str, list[str]]:
        with open(anno / name, encoding="utf-8", newline="") as fh:
            return name, [row.get("video_id", "").strip() for row in csv.DictReader(fh)]

    def lines(name: str, strip_ext: bool = False) -> tuple[str, list[str]]:
        ids = [x.strip() for x in (anno / name).read_text(encoding="utf-8").splitlines() if x.strip()]
        if strip_ext:
            ids = [os.path.splitext(v)[0] if os.path.splitext(v)[1].lower() in VIDEO_EXTENSIONS else v
                   for v in ids]
        return name, ids

    if datatype == "msrvtt":
        train, test = options.get("msrvtt_train", "9k"), options.get("msrvtt_test", "1k")
        if split == "train" and train in ("9k", "7k"):
            return [column(f"MSRVTT_train.{train}.csv")]
        if split == "test" and test == "1k":
            return [column("MSRVTT_JSFUSION_test.csv")]
        data = json.loads((anno / "MSRVTT_data.json").read_text(encoding="utf-8"))
        wanted = {"train": "train", "val": "validate", "test": "test"}[split]
        return [("MSRVTT_data.json", [v["video_id"] for v in data["videos"] if v.get("split") == wanted])]
    if datatype == "msvd":
        return [lines(f"{split}_list.txt")]
    if datatype == "activitynet":
        name = "train_ids.json" if split == "train" else "val_ids.json"
        return [(name, [str(v) for v in json.loads((anno / name).read_text(encoding="utf-8"))])]
    if datatype == "didemo" and (anno / f"{split}_list.txt").is_file():
        return [lines(f"{split}_list.txt", strip_ext=True)]
    return []  # LSMDC repeats clip ids by design (more captions); QA repeats videos (more questions)


def find_duplicates(datatype: str, anno_path: str, split: str, options: dict[str, str]) -> dict[str, int]:
    """Every video id a split's id list holds more than once, with how often (``{}`` when the lists
    cannot be read: the parser's error says why)."""
    try:
        listed = _list_ids(datatype, Path(anno_path), split, options)
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    out: dict[str, int] = {}
    for _, ids in listed:
        out.update({vid: n for vid, n in Counter(ids).items() if n > 1})
    return out


def check_vocabulary(reports: list[SplitReport], anno_path: str) -> None:
    """MSRVTT-QA: the answer vocabulary must load; count each split's out-of-vocabulary answers."""
    try:
        vocab = load_ans2label(anno_path)
    except (UserError, ValueError, FileNotFoundError, OSError) as e:
        for rep in reports:
            rep.errors.append(f"answer vocabulary: {e}")
        return
    for rep in reports:
        rep.out_of_vocabulary = sum(a not in vocab for a in rep.answers)
        if rep.out_of_vocabulary:
            share = rep.out_of_vocabulary / max(len(rep.answers), 1)
            use = "left out of training" if rep.name == "train" else "counted as wrong"
            rep.notes.append(f"{rep.out_of_vocabulary:,} questions ({share:.1%}) have an answer outside "
                             f"the {len(vocab):,}-answer vocabulary ({use})")


# --------------------------------------------------------------------------------------------- captions


def token_lengths(texts: Iterable[str]) -> dict[str, int]:
    """Tokens each distinct text takes with the CLIP tokenizer, start and end tokens included."""
    from emcl.clip.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    out: dict[str, int] = {}
    for text in texts:
        if text not in out:
            out[text] = len(tokenizer.encode(text)) + 2
    return out


def check_captions(rep: SplitReport, lengths: dict[str, int], max_words: int, show: int) -> None:
    """How many texts are cut at ``max_words`` tokens, and the longest ``show`` of them."""
    sized = [(lengths[t], i) for i, t in enumerate(rep.texts)]
    rep.over_max_words = sum(n > max_words for n, _ in sized)
    for n, i in sorted(sized, key=lambda x: (-x[0], x[1]))[:show]:
        if n <= max_words:
            break
        text = rep.texts[i]
        rep.longest.append({"video_id": rep.video_ids[rep.text_video[i]], "index": i, "tokens": n,
                            "text": text if len(text) <= 160 else text[:157] + "..."})
    if rep.over_max_words:
        one = rep.over_max_words == 1
        name, verb = (rep.text_name[:-1], "is") if one else (rep.text_name, "are")
        rep.notes.append(f"{rep.over_max_words:,} {name} {verb} longer than --max_words {max_words} tokens "
                         "and will be cut")


# ----------------------------------------------------------------------------------------------- videos


def probe_videos(paths: dict[str, str], workers: int, decode_first: bool = False,
                 progress: bool = True) -> tuple[dict[str, Any], dict[str, str]]:
    """Probe every file of ``{id: path}`` on ``workers`` threads: ({id: VideoInfo}, {id: problem}).

    Threads, not processes: PyAV opens and parses containers with the GIL released, a probe takes about
    a millisecond, and threads start in no time where a process pool first spends seconds importing
    torch in each worker.
    """
    from emcl.data.video import VideoError, probe_video
    from emcl.progress import bar

    infos: dict[str, Any] = {}
    problems: dict[str, str] = {}

    def one(vid: str) -> None:
        try:
            infos[vid] = probe_video(paths[vid], video_id=vid, decode_first=decode_first)
        except VideoError as e:
            problems[vid] = e.reason

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(one, vid) for vid in paths]
        for future in bar(as_completed(futures), show=progress, total=len(futures), unit="video",
                          desc="probing videos"):
            future.result()
    return infos, problems


def locate_videos(video_path: str, ids: Sequence[str], any_extension: bool) -> tuple[dict[str, str],
                                                                                      dict[str, str]]:
    """({id: file}, {id: problem}) as the trainer finds files: ``{id}.mp4``, or any extension (MSVD)."""
    from emcl.data.sources import VideoSource
    from emcl.data.video import VideoError

    source = VideoSource(video_path, framerate=1.0, max_frames=1, size=1, any_extension=any_extension)
    paths, problems = {}, {}
    for vid in ids:
        try:
            paths[vid] = source.path_for(vid)
        except VideoError as e:
            problems[vid] = e.reason
    return paths, problems


def stat_videos(video_path: str, ids: Sequence[str], any_extension: bool) -> dict[str, str]:
    """{id: problem} from a stat per file, as the trainer checks before its first step (``--no_probe``)."""
    from emcl.data.sources import VideoSource, missing_videos

    source = VideoSource(video_path, framerate=1.0, max_frames=1, size=1, any_extension=any_extension)
    return missing_videos(source, ids)


def found_elsewhere(video_path: str, ids: Sequence[str]) -> dict[str, str]:
    """{id: file} for the ``ids`` that are under ``video_path`` by name, but not as ``{id}.mp4`` in it."""
    from emcl.data.video import find_videos

    index = find_videos(video_path)
    return {vid: index[vid][0] for vid in ids if vid in index}


def _spread(values: list[float], digits: int = 2) -> dict[str, float]:
    return {"min": round(min(values), digits), "median": round(statistics.median(values), digits),
            "max": round(max(values), digits)}


def video_stats(infos: Iterable[Any]) -> dict[str, Any]:
    """Duration, fps, frame sizes and bytes of probed videos, summarised for the report."""
    infos = list(infos)
    if not infos:
        return {}
    durations = [i.duration for i in infos if i.duration is not None]
    sizes = Counter(f"{i.width}x{i.height}" for i in infos)
    return {
        "probed": len(infos),
        "duration_s": {**_spread(durations), "total": round(sum(durations), 1)} if durations else None,
        "fps": _spread([i.fps for i in infos]),
        "frame_sizes": dict(sizes.most_common(5)),
        "gigabytes": round(sum(i.bytes for i in infos) / 1e9, 4),
    }


def check_cache(reports: list[SplitReport], path: str, settings: dict[str, Any]) -> None:
    """Whether the frame cache serves every video of every split with the run's ``settings``."""
    from emcl.data.cache import FrameCache

    try:
        cache = FrameCache(path)
    except (UserError, FileNotFoundError, OSError) as e:
        raise UserError(f"--frame_cache: {e}") from None
    try:
        cache.check_settings(**settings)
    except (UserError, ValueError) as e:
        for rep in reports:
            rep.cache_problems = {}
            rep.errors.append(f"frame cache: {e}")
        cache.close()
        return
    failed = cache.failed()
    for rep in reports:
        rep.cache_problems = {}
        for vid in rep.video_ids:
            start, end = (rep.windows or {}).get(vid, (None, None))
            if vid in failed:
                rep.cache_problems[vid] = f"recorded as undecodable when the cache was built ({failed[vid]})"
            elif not cache.is_current(vid, None, start, end):
                rep.cache_problems[vid] = ("cached for another time window" if vid in cache
                                           else "not in the frame cache")
    cache.close()


# ---------------------------------------------------------------------------------------------- verdict


def decide(rep: SplitReport, max_skip_fraction: float) -> None:
    """The split's status and verdict: ready, ready with skips, or not ready (and why). With a frame cache
    the cache's problems count, and unusable files in ``--video_path`` are only noted."""
    from emcl.data.sources import SkipBudget

    if rep.cache_problems is not None and rep.video_problems:
        rep.notes.append(f"{len(rep.video_problems)} files in --video_path are unusable; a run reads the "
                         "frame cache instead")
    if rep.errors:
        rep.status, rep.verdict = "not_ready", f"not ready: {rep.errors[0]}"
        return
    bad = rep.bad_videos()
    total = len(rep.video_ids)
    limit = SkipBudget(total, max_skip_fraction).limit
    if not bad:
        rep.status, rep.verdict = "ready", "ready"
    elif len(bad) <= limit:
        rep.status = "ready_with_skips"
        rep.verdict = f"ready with {len(bad)} skip{'s' if len(bad) > 1 else ''} under --skip_bad_videos"
    else:
        rep.status = "not_ready"
        rep.verdict = (f"not ready: {len(bad)} of {total} videos unusable ({len(bad) / max(total, 1):.1%}), "
                       f"more than --max_skip_fraction {max_skip_fraction:g} allows ({limit})")


# ------------------------------------------------------------------------------------------ the command


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; the data flags mean what they mean to the trainers."""
    p = argparse.ArgumentParser(prog="python -m emcl.data.check",
                                description="Check a dataset folder before training (docs/data.md).")
    p.add_argument("--datatype", required=True, choices=DATATYPES)
    p.add_argument("--anno_path", required=True, help="folder of the dataset's annotation files")
    p.add_argument("--video_path", default=None, help="folder of the videos")
    p.add_argument("--frame_cache", default=None, help="HDF5 frame store from scripts/cache_frames.py")
    p.add_argument("--msrvtt_train", default="9k", choices=("9k", "7k", "full"))
    p.add_argument("--msrvtt_test", default="1k", choices=("1k", "full"))
    p.add_argument("--splits", default=None, help="comma-separated splits to check (default: all)")
    p.add_argument("--max_words", type=int, default=32, help="caption length in tokens, as the trainer")
    p.add_argument("--max_frames", type=int, default=12, help="frame cache setting to expect")
    p.add_argument("--video_framerate", type=float, default=1.0, help="frame cache setting to expect")
    p.add_argument("--image_size", type=int, default=224, help="frame cache setting to expect")
    p.add_argument("--faithful", action="store_true", help="expect a cache built with --index_rounding floor")
    p.add_argument("--max_skip_fraction", type=float, default=0.05,
                   help="the share of a split's videos --skip_bad_videos may skip (the trainer's default)")
    p.add_argument("--workers", type=int, default=min(8, len(os.sched_getaffinity(0))),
                   help="threads probing videos")
    p.add_argument("--no_probe", action="store_true",
                   help="only check that each video file exists and is not empty (no container probe)")
    p.add_argument("--decode_first_frame", action="store_true",
                   help="also decode each video's first frame (slower; catches damaged streams)")
    p.add_argument("--show", type=int, default=10, help="ids listed per problem in the printed report")
    p.add_argument("--json", default=None, help="write the full report to this JSON file")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    args = p.parse_args(argv)
    _check_args(args)
    return args


def _check_args(args: argparse.Namespace) -> None:
    if not Path(args.anno_path).is_dir():
        raise UserError(f"--anno_path {args.anno_path} is not a folder")
    if args.video_path is None and args.frame_cache is None:
        raise UserError("give --video_path (the videos) or --frame_cache (a frame store): a run reads one")
    if args.video_path is not None and not Path(args.video_path).is_dir():
        raise UserError(f"--video_path {args.video_path} is not a folder")
    if args.frame_cache is not None and not Path(args.frame_cache).is_file():
        raise UserError(f"--frame_cache {args.frame_cache} is not a file")
    if args.max_words < 3 or args.max_frames < 1 or args.image_size < 1 or not args.video_framerate > 0:
        raise UserError("--max_words must be at least 3, --max_frames, --image_size and --video_framerate "
                        "positive")
    if not 0.0 <= args.max_skip_fraction <= 1.0:
        raise UserError(f"--max_skip_fraction must be between 0 and 1, got {args.max_skip_fraction}")
    if args.workers < 0 or args.show < 0:
        raise UserError("--workers and --show must not be negative")


def _check_videos(reports: list[SplitReport], args: argparse.Namespace) -> dict[str, Any]:
    """Find and probe (or stat) every video of every split once; returns timing for the report."""
    started = time.perf_counter()
    ids = list(dict.fromkeys(v for rep in reports for v in rep.video_ids))
    any_extension = args.datatype == "msvd"
    if args.no_probe:
        problems, infos = stat_videos(args.video_path, ids, any_extension), {}
    else:
        paths, problems = locate_videos(args.video_path, ids, any_extension)
        infos, probed = probe_videos(paths, args.workers, args.decode_first_frame, not args.no_progress)
        problems.update(probed)
    missing = [v for v, reason in problems.items() if problem_kind(reason) == "missing"]
    elsewhere = found_elsewhere(args.video_path, missing) if missing and not any_extension else {}
    for rep in reports:
        rep.video_problems = {v: problems[v] for v in rep.video_ids if v in problems}
        rep.video_stats = video_stats(infos[v] for v in rep.video_ids if v in infos)
        moved = [v for v in rep.video_ids if v in elsewhere]
        if moved:
            rep.notes.append(
                f"{len(moved)} of the missing videos are under --video_path in a sub-folder or with another "
                f"extension (e.g. {elsewhere[moved[0]]}), but a run reads {{video_path}}/{{id}}.mp4: "
                "re-encode them with scripts/compress_videos.py, link them into that folder, or build a "
                "frame cache (scripts/cache_frames.py finds them by name)")
    return {"videos": len(ids), "mode": "stat" if args.no_probe else "probe",
            "workers": 0 if args.no_probe else max(1, args.workers),
            "seconds": round(time.perf_counter() - started, 2)}


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    """Check the dataset the flags describe; returns the report (``--json``'s content)."""
    started = time.perf_counter()
    options = {}
    if args.datatype == "msrvtt":
        options = {"msrvtt_train": args.msrvtt_train, "msrvtt_test": args.msrvtt_test}
    wanted = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else None
    names = splits_to_check(args.datatype, args.anno_path, options, wanted)
    reports = [SplitReport(args.datatype, name) for name in names]
    for rep in reports:
        load_annotations(rep, args.anno_path, options)
    if args.datatype == "msrvtt_qa":
        check_vocabulary(reports, args.anno_path)
    seconds = {"annotations": round(time.perf_counter() - started, 2)}
    t = time.perf_counter()
    lengths = token_lengths(text for rep in reports for text in rep.texts)
    for rep in reports:
        check_captions(rep, lengths, args.max_words, args.show)
    seconds["captions"] = round(time.perf_counter() - t, 2)
    videos = _check_videos(reports, args) if args.video_path is not None else None
    if args.frame_cache is not None:
        settings = {"max_frames": args.max_frames, "framerate": args.video_framerate,
                    "size": args.image_size, "index_rounding": "floor" if args.faithful else "round"}
        check_cache(reports, args.frame_cache, settings)
    for rep in reports:
        decide(rep, args.max_skip_fraction)
    seconds["total"] = round(time.perf_counter() - started, 2)
    ready = all(rep.status != "not_ready" for rep in reports)
    return {
        "datatype": args.datatype, "anno_path": args.anno_path, "video_path": args.video_path,
        "frame_cache": args.frame_cache, "options": options, "max_words": args.max_words,
        "max_skip_fraction": args.max_skip_fraction, "videos_checked": videos, "seconds": seconds,
        "ready": ready, "exit_status": 0 if ready else 1,
        "splits": {rep.name: rep.to_json() for rep in reports},
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------- output


def _ids(items: dict[str, str], show: int) -> str:
    """The first ``show`` ids with their reasons, and how many more there are."""
    shown = ", ".join(f"{vid} ({reason})" for vid, reason in list(items.items())[:show])
    if len(items) <= show:
        return shown
    return f"{shown}, and {len(items) - show} more" if shown else f"{len(items)} (ids in --json)"


def _split_lines(name: str, s: dict[str, Any], report: dict[str, Any], show: int) -> list[str]:
    text_name = "questions" if "questions" in s else "captions"
    what = f"{report['datatype']}/{name}"
    if s["errors"] and s["errors"][0].startswith("annotations:"):
        lines = [f"{what}: the annotations cannot be read"]
    else:
        lines = [f"{what}: {s['videos']:,} videos, {s[text_name]:,} {text_name}"]
    if s["expected"]:
        have = [f"{'about ' if e['approx'] else ''}{e['expected']:,} {text_name if k == 'captions' else k} "
                f"({e['status']})" for k, e in s["expected"].items()]
        lines.append(f"  a complete copy has {', '.join(have)}")
    if s["duplicates"]:
        dup = {vid: f"{n} times" for vid, n in s["duplicates"].items()}
        lines.append(f"  duplicate video ids: {_ids(dup, show)}")
    for kind, problems in (s["video_problems"] or {}).items():
        lines.append(f"  {kind.replace('_', ' ')} videos ({len(problems)}): {_ids(problems, show)}")
    for kind, problems in (s["cache_problems"] or {}).items():
        lines.append(f"  frame cache, {kind.replace('_', ' ')} ({len(problems)}): {_ids(problems, show)}")
    stats = s["video_stats"]
    if stats and stats.get("duration_s"):
        d, f = stats["duration_s"], stats["fps"]
        gb = stats["gigabytes"]
        size = f"{gb:.1f} GB" if gb >= 1 else f"{gb * 1000:.1f} MB"
        lines.append(f"  probed {stats['probed']:,} videos: {d['min']}-{d['max']} s (median {d['median']}), "
                     f"{f['min']}-{f['max']} fps, {size}")
    lines += [f"  note: {note}" for note in s["notes"]]
    for c in s["longest"][:3]:
        lines.append(f"  long: {c['tokens']} tokens, video {c['video_id']} ({text_name[:-1]} {c['index']}): "
                     f"{c['text'][:80]!r}")
    lines += [f"  error: {err}" for err in s["errors"][1:]]
    lines.append(f"  verdict: {s['verdict']}")
    return lines


def format_report(report: dict[str, Any], show: int = 10) -> str:
    """The report as the lines the command prints."""
    where = f"annotations {report['anno_path']}"
    if report["video_path"]:
        where += f", videos {report['video_path']}"
    if report["frame_cache"]:
        where += f", frame cache {report['frame_cache']}"
    lines = [f"{report['datatype']}: {where}"]
    v = report["videos_checked"]
    if v:
        how = f"probed on {v['workers']} threads" if v["mode"] == "probe" else "checked with a stat each"
        lines.append(f"{v['videos']:,} distinct videos {how} in {v['seconds']} s")
    for name, s in report["splits"].items():
        lines += _split_lines(name, s, report, show)
    not_ready = [n for n, s in report["splits"].items() if s["status"] == "not_ready"]
    if not_ready:
        lines.append(f"not ready: {', '.join(not_ready)} (a training run would stop); "
                     f"checked in {report['seconds']['total']} s")
    else:
        lines.append(f"every split is ready; checked in {report['seconds']['total']} s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m emcl.data.check``: print the report, write ``--json``; 0 ready, 1 not ready."""
    args = parse_args(argv)
    logger = logging.getLogger("emcl")  # the parsers' notes (e.g. LSMDC's repeated clip ids) on stderr
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    report = run_check(args)
    print(format_report(report, args.show), flush=True)
    if args.json:
        from emcl.fileio import save_json

        save_json(report, args.json)
    return int(report["exit_status"])


if __name__ == "__main__":
    sys.exit(cli_main(main))
