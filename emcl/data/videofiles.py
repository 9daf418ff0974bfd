"""Video files on disk, without torch: which files are videos, walking a tree of them, and one ffmpeg job
per video on threads (``scripts/compress_videos.py``, ``scripts/extract_frames.py``).

A job writes its output under a hidden temporary name and renames it once ffmpeg succeeded, so an output
that exists is complete and a rerun skips it; two inputs that would write the same output are failures,
not a silent overwrite.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

#: File name endings treated as videos when folders are scanned (lower case, with the dot).
VIDEO_EXTENSIONS = frozenset(
    {
        ".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".mpe", ".wmv", ".flv",
        ".3gp", ".3g2", ".ogv", ".ogg", ".ts", ".mts", ".m2ts", ".vob", ".divx", ".asf", ".f4v",
    }
)  # fmt: skip

Job = tuple[Path, Path]


def video_files(root: str | os.PathLike[str]) -> Iterator[str]:
    """Every video file under ``root`` (links followed), folder by folder in sorted order; hidden files and
    folders, and files without a video ending (:data:`VIDEO_EXTENSIONS`), are passed over."""
    for folder, dirs, files in os.walk(os.fspath(root), followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS:
                yield os.path.join(folder, name)


def plan_jobs(
    root: Path, output_of: Callable[[Path], Path], clash: Callable[[Path, list[Path]], str]
) -> tuple[list[Job], dict[str, str]]:
    """(video, output) pairs for the videos under ``root``, sorted by output; videos that would write the
    same output are failures instead (``{video: clash(output, videos)}``)."""
    by_output: dict[Path, list[Path]] = {}
    for path in video_files(root):
        src = Path(path)
        by_output.setdefault(output_of(src), []).append(src)
    jobs, failures = [], {}
    for dst, srcs in sorted(by_output.items()):
        if len(srcs) == 1:
            jobs.append((srcs[0], dst))
        else:
            failures.update({str(src): clash(dst, srcs) for src in srcs})
    return jobs, failures


def check_folders(input_dir: str, output_dir: str, input_flag: str, output_flag: str) -> tuple[Path, Path]:
    """Both folders resolved; ``SystemExit`` when the input is no folder or the output is inside it."""
    src, dst = Path(input_dir).resolve(), Path(output_dir).resolve()
    if not src.is_dir():
        raise SystemExit(f"{input_flag} {src} is not a folder")
    if dst == src or src in dst.parents:
        raise SystemExit(f"{output_flag} must not be {input_flag} or inside it")
    return src, dst


def share_cores(workers: int, jobs: int) -> tuple[int, int]:
    """(worker threads, ffmpeg threads each): at most one worker per job, the cores shared among them."""
    workers = max(1, min(workers, jobs or 1))
    return workers, max(1, len(os.sched_getaffinity(0)) // workers)


def ffmpeg_exe() -> str:
    """imageio-ffmpeg's bundled binary, else ``ffmpeg`` on PATH."""
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:
        found = shutil.which("ffmpeg")
        if found is None:
            raise SystemExit("no ffmpeg: pip install imageio-ffmpeg, or put ffmpeg on PATH") from None
        return found


def stderr_tail(proc: subprocess.CompletedProcess, lines: int = 3) -> str:
    """The last lines of a finished ffmpeg's stderr, joined by ``|`` (``no output`` when it wrote none)."""
    return " | ".join((proc.stderr or "").strip().splitlines()[-lines:]) or "no output"


def run_jobs(work: Callable[[Path, Path], str | None], todo: list[Job], workers: int,
             failures: dict[str, str], verb: str, skipped: int, no_progress: bool = False) -> int:
    """Run ``work(src, dst)`` (None or an error message) over ``todo`` on ``workers`` threads with a
    progress bar, then report counts and every failure (also those already in ``failures``); exit status
    1 if any failed."""
    from emcl.progress import bar
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(work, s, d): s for s, d in todo}
        for future in bar(as_completed(futures), show=not no_progress, total=len(futures), unit="video"):
            error = future.result()
            if error is not None:
                failures[str(futures[future])] = error
    done = len(todo) - sum(1 for s, _ in todo if str(s) in failures)
    print(f"{verb} {done}, skipped {skipped}, failed {len(failures)}")
    if failures:
        print(f"{len(failures)} videos failed:", file=sys.stderr)
        for src, error in sorted(failures.items()):
            print(f"  {src}: {error}", file=sys.stderr)
        return 1
    return 0
