#!/usr/bin/env python
"""Re-encode a video tree to a low frame rate and short side (docs/reference.md, 'Datasets and formats':
3 fps, short side 224, no audio).

    python scripts/compress_videos.py --input_root IN --output_root OUT [--fps 3 --size 224 --workers N]

Mirrors the sub-folders of IN into OUT, one ``<stem>.mp4`` per input video (H.264 with libx264 when this
ffmpeg has it, else MPEG-4 part 2). The short side becomes ``--size`` and the other side keeps the aspect
ratio (rounded to an even number): portrait videos stay portrait, unlike the reference script, which
squashes them. ffmpeg applies the rotation stored in phone videos before scaling. Idempotent: each output is
written to a hidden temporary name and renamed when ffmpeg succeeded, so an existing output is complete and
is skipped on a rerun. Failures are listed at the end and make the exit status 1.

ffmpeg comes from ``imageio_ffmpeg.get_ffmpeg_exe()`` (a pip dependency), or ``ffmpeg`` on PATH.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

from emcl.data.videofiles import (  # torch-free: this tool needs no torch
    check_folders,
    ffmpeg_exe,
    plan_jobs,
    run_jobs,
    share_cores,
    stderr_tail,
)


def pick_codec(ffmpeg: str) -> str:
    """libx264 when the binary has it, else mpeg4."""
    listing = subprocess.run([ffmpeg, "-hide_banner", "-encoders"], capture_output=True, text=True,
                             check=False).stdout
    return "libx264" if " libx264 " in listing else "mpeg4"


def scale_filter(size: int) -> str:
    """Short side -> size, long side by aspect ratio and even (-2); landscape and portrait alike."""
    return f"scale='if(gt(iw,ih),-2,{size})':'if(gt(iw,ih),{size},-2)':flags=bicubic"


def ffmpeg_command(ffmpeg: str, src: Path, dst: Path, *, fps: float, size: int, codec: str,
                   threads: int) -> list[str]:
    cmd = [ffmpeg, "-hide_banner", "-loglevel", "error", "-nostdin", "-y", "-i", str(src),
           "-vf", f"fps={fps:g},{scale_filter(size)}", "-an", "-sn", "-dn", "-c:v", codec,
           "-pix_fmt", "yuv420p", "-threads", str(threads)]
    if codec == "libx264":
        cmd += ["-preset", "fast", "-crf", "23"]
    else:
        cmd += ["-q:v", "3"]
    return cmd + ["-movflags", "+faststart", "-f", "mp4", str(dst)]


def list_jobs(input_root: Path, output_root: Path) -> tuple[list[tuple[Path, Path]], dict[str, str]]:
    """(input, output) pairs mirroring sub-folders; inputs mapping onto the same output are failures."""
    return plan_jobs(input_root, lambda src: (output_root / src.relative_to(input_root)).with_suffix(".mp4"),
                     lambda dst, srcs: f"several inputs would write {dst}: {[str(s) for s in srcs]}")


def compress_one(ffmpeg: str, src: Path, dst: Path, *, fps: float, size: int, codec: str,
                 threads: int) -> str | None:
    """Encode src to dst via a temporary file; returns an error message or None."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.partial")
    cmd = ffmpeg_command(ffmpeg, src, tmp, fps=fps, size=size, codec=codec, threads=threads)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
        tmp.unlink(missing_ok=True)
        return f"ffmpeg exit {proc.returncode}: {stderr_tail(proc)}"
    os.replace(tmp, dst)
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input_root", required=True)
    p.add_argument("--output_root", required=True)
    p.add_argument("--fps", type=float, default=3.0)
    p.add_argument("--size", type=int, default=224, help="short side in pixels (even)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--codec", choices=["auto", "libx264", "mpeg4"], default="auto")
    p.add_argument("--no_progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.size <= 0 or args.size % 2:
        raise SystemExit(f"--size must be a positive even number (H.264 in yuv420p), got {args.size}")
    if args.fps <= 0:
        raise SystemExit(f"--fps must be positive, got {args.fps}")
    input_root, output_root = check_folders(args.input_root, args.output_root,
                                          "--input_root", "--output_root")
    ffmpeg = ffmpeg_exe()
    codec = pick_codec(ffmpeg) if args.codec == "auto" else args.codec
    jobs, failures = list_jobs(input_root, output_root)
    todo = [(s, d) for s, d in jobs if not d.is_file()]
    workers, threads = share_cores(args.workers, len(todo))
    print(f"{len(jobs)} videos under {input_root}: {len(jobs) - len(todo)} already done, encoding "
          f"{len(todo)} with {codec} ({args.fps:g} fps, short side {args.size}) on {workers} workers",
          flush=True)
    work = partial(compress_one, ffmpeg, fps=args.fps, size=args.size, codec=codec, threads=threads)
    return run_jobs(work, todo, workers, failures, "encoded", len(jobs) - len(todo), args.no_progress)


if __name__ == "__main__":
    sys.exit(main())
