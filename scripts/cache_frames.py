#!/usr/bin/env python
"""Decode every video once into an HDF5 frame cache (see emcl/data/cache.py for the layout).

    python scripts/cache_frames.py --video_path DIR --out FILE.h5 --max_frames 12 --framerate 1 \\
        [--size 224] [--ids LIST] [--windows W.json] [--workers W] [--backend pyav|opencv] \\
        [--skip_bad_videos] [--compression none|lzf|gzip]

Resumable and crash-safe: the store is built in FILE.h5.partial, each video marked complete only after its
data is flushed; rerunning skips finished ids (also to extend a finished FILE.h5 with new ids) and the
finished store is moved onto FILE.h5 atomically. Train with ``VideoSource(..., frame_cache=FILE.h5)`` and
the same max_frames / framerate / size.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from emcl.data.cache import PARTIAL_SUFFIX, CacheWriter, FrameCache
from emcl.data.video import BACKENDS, VideoError, find_videos, read_frames

Window = tuple[float | None, float | None]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--video_path", required=True,
                   help="folder of videos (searched recursively; id = file stem)")
    p.add_argument("--out", required=True, help="output HDF5 file")
    p.add_argument("--max_frames", type=int, required=True)
    p.add_argument("--framerate", type=float, required=True, help="sampling rate in frames per second")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--ids", default=None,
                   help="text file with one video id per line, or a comma separated list "
                   "(default: all videos)")
    p.add_argument("--windows", default=None,
                   help='JSON file {"video_id": [start_s, end_s], ...}: cache only that window of '
                   'those videos')
    p.add_argument("--workers", type=int, default=min(8, len(os.sched_getaffinity(0))))
    p.add_argument("--backend", choices=BACKENDS, default="pyav")
    p.add_argument("--skip_bad_videos", action="store_true",
                   help="record undecodable videos as failed in the store instead of stopping")
    p.add_argument("--compression", choices=["none", "lzf", "gzip"], default="none",
                   help="HDF5 compression of frames (default none: fastest to read)")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--_die_after", type=int, default=None, help=argparse.SUPPRESS)  # tests: crash on purpose
    return p.parse_args(argv)


def read_id_list(spec: str) -> list[str]:
    """Ids from a text file (one per line) or a comma separated list, in order, without duplicates."""
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as fh:
            items = [line.strip() for line in fh]
    else:
        items = [s.strip() for s in spec.split(",")]
    seen: dict[str, None] = {}
    for item in items:
        if item and not item.startswith("#"):
            seen.setdefault(item, None)
    return list(seen)


def read_windows(path: str | None) -> dict[str, Window]:
    if path is None:
        return {}
    with open(path, encoding="utf-8") as fh:
        raw = json.load(fh)
    out: dict[str, Window] = {}
    for vid, win in raw.items():
        if not (isinstance(win, (list, tuple)) and len(win) == 2):
            raise SystemExit(f"{path}: window of {vid!r} must be [start, end], got {win!r}")
        out[vid] = (None if win[0] is None else float(win[0]), None if win[1] is None else float(win[1]))
    return out


def resolve_videos(video_path: str,
                   ids: list[str] | None) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """(ids, id -> file, id -> problem) for the requested ids, or for every video file in the folder."""
    if not os.path.isdir(video_path):
        raise SystemExit(f"--video_path {video_path} is not a folder")
    index = find_videos(video_path)
    if ids is None:
        files = sorted({p for paths in index.values() for p in paths})
        by_stem: dict[str, list[str]] = {}
        for path in files:
            by_stem.setdefault(os.path.splitext(os.path.basename(path))[0], []).append(path)
        ids = sorted(by_stem)
        lookup = by_stem
    else:
        lookup = index
    paths, problems = {}, {}
    for vid in ids:
        found = sorted(set(lookup.get(vid, [])))
        if len(found) == 1:
            paths[vid] = found[0]
        elif not found:
            problems[vid] = f"file not found under {video_path} (no video with stem {vid!r})"
        else:
            problems[vid] = f"ambiguous: several files have stem {vid!r}: {found}"
    return ids, paths, problems


class _DecodeJobs(Dataset):
    """One item per video: decodes it in a DataLoader worker and returns the real frames or the error."""

    def __init__(self, jobs: list[tuple[str, str, Window]], framerate: float, max_frames: int, size: int,
                 backend: str) -> None:
        self.jobs = jobs
        self.kw = {"framerate": framerate, "max_frames": max_frames, "size": size, "backend": backend}

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        vid, path, (start, end) = self.jobs[i]
        try:
            frames, mask = read_frames(path, start=start, end=end, video_id=vid, **self.kw)
        except Exception as e:  # every failure is reported per video (VideoError or a decoder surprise)
            reason = str(e) if isinstance(e, VideoError) else f"{type(e).__name__}: {e} ({path})"
            return {"id": vid, "path": path, "frames": None, "error": reason}
        n = int(mask.sum())
        return {"id": vid, "path": path, "frames": frames[:n].numpy(), "error": None}


def _identity(item: Any) -> Any:
    return item


def _results(jobs: _DecodeJobs, workers: int) -> Iterator[dict[str, Any]]:
    """Decoded videos in completion order. With workers, the worker processes start here, at once."""
    if workers <= 0 or len(jobs) == 0:
        return (jobs[i] for i in range(len(jobs)))
    loader = DataLoader(jobs, batch_size=None, shuffle=False, num_workers=min(workers, len(jobs)),
                        collate_fn=_identity, in_order=False, prefetch_factor=2)
    return iter(loader)


def _die(writer: CacheWriter, results: Any, vid: str, frames: np.ndarray, start: float | None,
         end: float | None) -> None:
    """Test hook (--_die_after): crash like a kill in the middle of a write, deterministically.

    Writes the next entry without its completion mark, kills the DataLoader workers (so no orphan keeps
    the caller's pipes open) and then SIGKILLs this process.
    """
    writer.add(vid, frames, start, end, _complete=False)
    for worker in getattr(results, "_workers", []):
        os.kill(worker.pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # decoding parallelism comes from the workers
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    requested = read_id_list(args.ids) if args.ids else None
    windows = read_windows(args.windows)
    ids, paths, problems = resolve_videos(args.video_path, requested)
    if not ids:
        raise SystemExit(f"no videos to cache (folder {args.video_path}, ids {args.ids})")
    settings = {"max_frames": args.max_frames, "framerate": args.framerate, "size": args.size}

    if os.path.isfile(out) and not os.path.exists(out + PARTIAL_SUFFIX):
        cache = FrameCache(out)
        cache.check_settings(**settings)
        have = set(cache.ids()) | set(cache.failed())
        cache.close()
        if all(v in have for v in ids):
            print(f"{out}: all {len(ids)} videos already cached; nothing to do")
            return 0

    writer = CacheWriter(out, backend=args.backend,
                         compression=None if args.compression == "none" else args.compression, **settings)
    started = time.time()
    writer.open()
    try:
        done = writer.done(windows)
        todo = [v for v in ids if v not in done]
        failures: dict[str, str] = {}
        for vid in todo:
            if vid in problems:
                if not args.skip_bad_videos:
                    raise SystemExit(f"video {vid!r}: {problems[vid]} "
                                     "(use --skip_bad_videos to record it as failed and go on)")
                failures[vid] = problems[vid]
                writer.add_failed(vid, problems[vid])
        jobs = [(v, paths[v], windows.get(v, (None, None))) for v in todo if v in paths]
        print(f"{out}: {len(ids)} videos, {len(ids) - len(todo)} already cached"
              + (f", {len(writer.dropped)} incomplete entries dropped" if writer.dropped else "")
              + f", decoding {len(jobs)} with {args.workers} workers ({args.backend})", flush=True)
        decoded = 0
        dataset = _DecodeJobs(jobs, args.framerate, args.max_frames, args.size, args.backend)
        # workers are forked while the HDF5 file is closed, so no child ever holds an open writer
        writer.close()
        results = _results(dataset, args.workers)
        writer.reopen()
        bar = tqdm(total=len(jobs), unit="video", disable=args.no_progress, dynamic_ncols=True)
        for item in results:
            vid = item["id"]
            if item["error"] is not None:
                if not args.skip_bad_videos:
                    raise SystemExit(f"cannot cache {item['path']}: {item['error']} "
                                     "(use --skip_bad_videos to record it as failed and go on)")
                failures[vid] = item["error"]
                writer.add_failed(vid, item["error"])
            else:
                frames = np.asarray(item["frames"])
                start, end = windows.get(vid, (None, None))
                if args._die_after is not None and decoded >= args._die_after:
                    _die(writer, results, vid, frames, start, end)
                writer.add(vid, frames, start, end)
                decoded += 1
            bar.update(1)
            bar.set_postfix(failed=len(failures), refresh=False)
        bar.close()
        counts = writer.finalize(ids)
    finally:
        writer.close()
    took = time.time() - started
    size_gb = os.path.getsize(out) / 1e9
    print(f"wrote {out}: {counts['num_videos']} videos, {counts['num_failed']} failed, {size_gb:.2f} GB, "
          f"{decoded} decoded in {took:.1f} s")
    if failures:
        print(f"{len(failures)} videos could not be decoded and are recorded as failed in the store:",
              file=sys.stderr)
        for vid, reason in list(failures.items())[:20]:
            print(f"  {vid}: {reason}", file=sys.stderr)
        if len(failures) > 20:
            print(f"  ... and {len(failures) - 20} more (FrameCache(path).failed() lists them)",
                  file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
