#!/usr/bin/env python
"""Extract JPEG frames with ffmpeg at 5 fps into the CLIP2Video reference's folder layout
(docs/reference.md, 'EMCL as an inference module').

    python scripts/extract_frames.py --input_path VIDEOS --output_path FRAMES [--fps 5 --workers N]

Every video under VIDEOS (sub-folders included) becomes ``FRAMES/{stem}/00000001.jpg, 00000002.jpg, ...``
(ffmpeg ``-r 5``, as the reference's ``sample_frame.py``), which
``main_task_inference --frame_path FRAMES`` reads at 2.5 fps (every second file) and 12 evenly spaced.
Frames are written to a hidden temporary folder that is renamed once ffmpeg succeeded, so an existing
folder is complete and is skipped on a rerun (the reference deletes and re-extracts everything). Two
videos with the same stem are an error, not a silent overwrite. Failures are listed at the end and make
the exit status 1.

ffmpeg comes from ``imageio_ffmpeg.get_ffmpeg_exe()`` (a pip dependency), or ``ffmpeg`` on PATH.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

from emcl.data.videofiles import check_folders, ffmpeg_exe, plan_jobs, run_jobs, share_cores, stderr_tail


def list_jobs(input_path: Path, output_path: Path) -> tuple[list[tuple[Path, Path]], dict[str, str]]:
    """(video, frame folder) pairs, one folder per stem; stems found twice are failures."""
    return plan_jobs(input_path, lambda src: output_path / src.stem,
                     lambda dst, srcs: f"several videos have the stem {dst.name!r}: {[str(s) for s in srcs]}")


def ffmpeg_command(
    ffmpeg: str, src: Path, out_dir: Path, *, fps: float, quality: int, threads: int
) -> list[str]:
    return [
        ffmpeg,
        "-hide_banner",
        "-loglevel",
        "error",
        "-nostdin",
        "-y",
        "-i",
        str(src),
        "-an",
        "-sn",
        "-dn",
        "-r",
        f"{fps:g}",
        "-q:v",
        str(quality),
        "-threads",
        str(threads),
        str(out_dir / "%08d.jpg"),
    ]


def extract_one(ffmpeg: str, src: Path, dst: Path, *, fps: float, quality: int, threads: int) -> str | None:
    """Frames of ``src`` into the folder ``dst`` via a temporary folder; an error message or None."""
    tmp = dst.with_name(f".{dst.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    proc = subprocess.run(
        ffmpeg_command(ffmpeg, src, tmp, fps=fps, quality=quality, threads=threads),
        capture_output=True,
        text=True,
        check=False,
    )
    n = sum(1 for p in tmp.iterdir() if p.suffix == ".jpg")
    if proc.returncode != 0 or n == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        return f"ffmpeg exit {proc.returncode}, {n} frames: {stderr_tail(proc)}"
    os.replace(tmp, dst)
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input_path", required=True, help="folder of videos (searched recursively)")
    p.add_argument("--output_path", required=True, help="folder that receives one frame folder per video")
    p.add_argument("--fps", type=float, default=5.0, help="extraction rate (the reference: 5)")
    p.add_argument("--quality", type=int, default=2, help="JPEG qscale, 2 (best) .. 31")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--no_progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.fps <= 0:
        raise SystemExit(f"--fps must be positive, got {args.fps}")
    if not 2 <= args.quality <= 31:
        raise SystemExit(f"--quality must be in 2..31, got {args.quality}")
    input_path, output_path = check_folders(args.input_path, args.output_path,
                                          "--input_path", "--output_path")
    output_path.mkdir(parents=True, exist_ok=True)
    ffmpeg = ffmpeg_exe()
    jobs, failures = list_jobs(input_path, output_path)
    todo = [(s, d) for s, d in jobs if not d.is_dir()]
    workers, threads = share_cores(args.workers, len(todo))
    print(
        f"{len(jobs)} videos under {input_path}: {len(jobs) - len(todo)} already extracted, extracting "
        f"{len(todo)} at {args.fps:g} fps on {workers} workers",
        flush=True,
    )
    work = partial(extract_one, ffmpeg, fps=args.fps, quality=args.quality, threads=threads)
    return run_jobs(work, todo, workers, failures, "extracted", len(jobs) - len(todo), args.no_progress)

if __name__ == "__main__":
    sys.exit(main())
