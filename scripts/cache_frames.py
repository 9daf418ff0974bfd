#!/usr/bin/env python
"""Decode every video once into an HDF5 frame cache (see emcl/data/cache.py for the layout).

    python scripts/cache_frames.py --video_path DIR --out FILE.h5 --max_frames 12 --framerate 1 \\
        [--size 224] [--ids LIST] [--windows W.json] [--workers W] [--backend pyav|opencv] \\
        [--skip_bad_videos] [--compression none|lzf|gzip]
    # or every video of a dataset's splits, with the time windows its loader asks for (DiDeMo: 0-31 s):
    python scripts/cache_frames.py --datatype didemo --anno_path ANNO --video_path DIR --out FILE.h5 ...

Resumable and crash-safe: the store is built in FILE.h5.partial, each video marked complete only after its
data is flushed; rerunning skips finished ids (also to extend a finished FILE.h5 with new ids) and the
finished store is moved onto FILE.h5 atomically. Train with ``VideoSource(..., frame_cache=FILE.h5)`` and
the same max_frames / framerate / size. The work is done by ``emcl.data.cache.build_cache``; this is its CLI.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from emcl.data.cache import CacheBuildError, build_cache, read_id_list, read_windows
from emcl.data.video import BACKENDS, VideoError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--video_path", required=True,
                   help="folder of videos (searched recursively; id = file stem)")
    p.add_argument("--out", required=True, help="output HDF5 file")
    p.add_argument("--max_frames", type=int, required=True)
    p.add_argument("--framerate", type=float, required=True, help="sampling rate in frames per second")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--index_rounding", choices=["round", "floor"], default="round",
                   help="evenly spaced frame indices: round to the nearest (default) or floor, as the "
                   "reference does (what training with --faithful reads)")
    p.add_argument("--ids", default=None,
                   help="text file with one video id per line, or a comma separated list "
                   "(default: all videos)")
    p.add_argument("--windows", default=None,
                   help='JSON file {"video_id": [start_s, end_s], ...}: cache only that window of '
                   'those videos')
    p.add_argument("--datatype", default=None, choices=["msrvtt", "msvd", "lsmdc", "activitynet", "didemo"],
                   help="with --anno_path: cache the videos of every split of this dataset, with its windows")
    p.add_argument("--anno_path", default=None, help="the dataset's annotation folder (with --datatype)")
    p.add_argument("--workers", type=int, default=min(8, len(os.sched_getaffinity(0))))
    p.add_argument("--backend", choices=BACKENDS, default="pyav")
    p.add_argument("--skip_bad_videos", action="store_true",
                   help="record undecodable videos as failed in the store instead of stopping")
    p.add_argument("--compression", choices=["none", "lzf", "gzip"], default="none",
                   help="HDF5 compression of frames (default none: fastest to read)")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    if (args.datatype is None) != (args.anno_path is None):
        p.error("--datatype and --anno_path go together")
    if args.datatype and (args.ids or args.windows):
        p.error("--datatype/--anno_path choose the ids and windows; do not combine with --ids or --windows")
    return args


def dataset_ids_and_windows(datatype: str, anno_path: str) -> tuple[list[str], dict]:
    """Every video id of the dataset's splits (in split order) and the windows its loader reads."""
    from emcl.data.datasets import has_split, load_split

    ids: list[str] = []
    windows: dict = {}
    for split in ("train", "val", "test"):
        if not has_split(datatype, split, anno_path):
            continue
        data = load_split(datatype, anno_path, split)
        ids.extend(data.video_ids)
        windows.update(data.windows or {})
    return list(dict.fromkeys(ids)), windows


class _ConsoleHandler(logging.Handler):
    """Library log lines on the console: info to stdout, warnings to stderr (streams looked up per line,
    so redirected or captured streams are honoured)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            print(self.format(record), file=stream, flush=True)
        except Exception:
            self.handleError(record)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logger = logging.getLogger("emcl.data")
    handler, level = _ConsoleHandler(), logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        if args.datatype:
            ids, windows = dataset_ids_and_windows(args.datatype, args.anno_path)
        else:
            ids, windows = (read_id_list(args.ids) if args.ids else None), read_windows(args.windows)
        build_cache(
            args.video_path, args.out, max_frames=args.max_frames, framerate=args.framerate, size=args.size,
            ids=ids, windows=windows, index_rounding=args.index_rounding,
            workers=args.workers, backend=args.backend, skip_bad_videos=args.skip_bad_videos,
            compression=None if args.compression == "none" else args.compression,
            progress=not args.no_progress)
    except (VideoError, CacheBuildError, NotADirectoryError) as e:  # bad input: a message, not a traceback
        raise SystemExit(str(e)) from None
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as e:  # e.g. an existing store built with other settings
        sys.exit(f"cache_frames.py: {e}")
