#!/usr/bin/env python
"""Clips per second of each decoding backend and of the HDF5 frame cache, on the same videos.

    python scripts/benchmark_data.py --json OUT.json [--video_path DIR] [--workers N] [--num N] \\
        [--max_frames 12 --framerate 1 --size 224]

Without --video_path it first writes a few synthetic test videos (10 s, 30 fps, 320x240, moving content)
to a temporary folder, so it runs anywhere. Clips are loaded as training does (DataLoader, ``--workers``
processes, one clip per item). The cache is built from the same videos in a temporary folder, read
uncompressed (the default store) and with lzf compression. Note: the files sit in the OS page cache after
the first pass, so these numbers exclude disk reads. Writes the JSON atomically and prints a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from emcl.data.cache import FrameCache
from emcl.data.video import BACKENDS, find_videos, read_frames
from emcl.data.workers import loader_context
from emcl.fileio import save_json


def _load_sibling(name: str) -> Any:
    key = f"_emcl_script_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).resolve().parent / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def make_test_videos(folder: Path, num: int, seconds: float = 10.0, fps: int = 30, width: int = 320,
                     height: int = 240) -> list[Path]:
    """Synthetic H.264 mp4s with moving gradients, blocks and noise (so the codec has real work)."""
    import av

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    paths = []
    for k in range(num):
        path = folder / f"synthetic{k:03d}.mp4"
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for i in range(int(seconds * fps)):
                img = np.empty((height, width, 3), np.uint8)
                img[..., 0] = (xx * 2 + 3 * i + 40 * k) % 256
                img[..., 1] = (yy * 2 + 2 * i) % 256
                img[..., 2] = (((xx + 4 * i) // 32 + (yy // 32)) % 2) * 180
                img = np.clip(img + rng.integers(-12, 12, img.shape), 0, 255).astype(np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        paths.append(path)
    return paths


class _Decode(Dataset):
    def __init__(self, paths: list[str], backend: str, kw: dict[str, Any]) -> None:
        self.paths, self.backend, self.kw = paths, backend, kw

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return read_frames(self.paths[i], backend=self.backend, **self.kw)[0]


class _Cached(Dataset):
    def __init__(self, cache: FrameCache, ids: list[str]) -> None:
        self.cache, self.ids = cache, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.cache.get(self.ids[i])[0]


def _cpu_seconds() -> float:
    """CPU time of this process plus its finished (joined) children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _process_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a live process, from /proc (0 where /proc is not there)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def clips_per_second(dataset: Dataset, workers: int, warmup: bool = False) -> tuple[float, float]:
    """(clips per wall second, clips per CPU second) of one DataLoader pass (worker start included).

    CPU seconds include the workers, so they do not depend on other load on a shared machine. Workers
    may come from the fork server (:mod:`emcl.data.workers`) rather than from this process, so their CPU
    time is read from /proc while they are alive. ``warmup`` first runs one untimed pass with its own
    workers (file handles, page cache).
    """
    def make() -> DataLoader:  # persistent: the workers are still there to be measured after the pass
        return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                          multiprocessing_context=loader_context(workers), persistent_workers=workers > 0)

    if warmup:
        warm = make()
        for _ in warm:
            pass
        del warm
    loader = make()
    n, start, cpu = 0, time.perf_counter(), _cpu_seconds()
    for clip in loader:
        n += 1
        assert clip.dtype == torch.uint8
    wall = time.perf_counter() - start
    workers_alive = getattr(loader._iterator, "_workers", [])
    cpu = _cpu_seconds() - cpu + sum(_process_cpu_seconds(w.pid) for w in workers_alive)
    del loader
    return n / wall, n / max(cpu, 1e-9)


def copy_compressed(src: str, dst: str, compression: str) -> None:
    """Same store with compressed frame datasets (to compare read speeds without decoding again)."""
    with h5py.File(src, "r") as fin, h5py.File(dst, "w") as fout:
        fout.attrs.update(dict(fin.attrs))
        fout.attrs["compression"] = compression
        fout.create_group("failed")
        videos = fout.create_group("videos")
        for key, group in fin["videos"].items():
            g = videos.create_group(key)
            g.attrs.update(dict(group.attrs))
            frames = group["frames"][()]
            g.create_dataset("frames", data=frames, chunks=frames.shape, compression=compression)
            g.create_dataset("mask", data=group["mask"][()])


def machine_info() -> dict[str, Any]:
    import av
    import cv2

    return {"cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "av": av.__version__,
            "opencv": cv2.__version__, "h5py": h5py.__version__, "load_average": list(os.getloadavg())}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--video_path", default=None, help="folder of videos (default: make synthetic ones)")
    p.add_argument("--json", required=True, help="where to write the results")
    p.add_argument("--workers", type=int, default=min(4, len(os.sched_getaffinity(0))))
    p.add_argument("--num", type=int, default=8, help="number of videos (made or taken from the folder)")
    p.add_argument("--max_frames", type=int, default=12)
    p.add_argument("--framerate", type=float, default=1.0)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--cache_clips", type=int, default=1000, help="clips per timed pass over the cache")
    p.add_argument("--repeats", type=int, default=2, help="decode passes per backend (best is reported)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    kw = {"framerate": args.framerate, "max_frames": args.max_frames, "size": args.size}
    backends = [b for b in args.backends.split(",") if b]
    with tempfile.TemporaryDirectory(prefix="emcl-bench-") as tmp:
        tmp_path = Path(tmp)
        if args.video_path is None:
            video_dir = tmp_path / "videos"
            video_dir.mkdir()
            print(f"making {args.num} synthetic videos (10 s, 30 fps, 320x240) ...", flush=True)
            make_test_videos(video_dir, args.num)
        else:
            video_dir = Path(args.video_path)
        index = find_videos(video_dir)
        files = sorted({p for paths in index.values() for p in paths})[: args.num]
        if not files:
            raise SystemExit(f"no videos under {video_dir}")
        ids = [os.path.splitext(os.path.basename(p))[0] for p in files]

        # backends alternate, best of --repeats passes each: the machine may be shared and noisy
        samples: dict[str, list[float]] = {b: [] for b in backends}
        cpu_samples: dict[str, list[float]] = {b: [] for b in backends}
        for _ in range(args.repeats):
            for backend in backends:
                wall, cpu = clips_per_second(_Decode(files, backend, kw), args.workers)
                samples[backend].append(wall)
                cpu_samples[backend].append(cpu)
                print(f"  decode {backend}: {wall:.1f} clips/s ({cpu:.2f} clips per CPU second)", flush=True)
        decode = {b: max(rates) for b, rates in samples.items()}
        decode_cpu = {b: max(rates) for b, rates in cpu_samples.items()}

        store = str(tmp_path / "frames.h5")
        build_start = time.perf_counter()
        _load_sibling("cache_frames").main(
            ["--video_path", str(video_dir), "--out", store, "--ids", ",".join(ids), "--max_frames",
             str(args.max_frames), "--framerate", str(args.framerate), "--size", str(args.size),
             "--workers", str(args.workers), "--no_progress"])
        build = len(files) / (time.perf_counter() - build_start)
        cache = FrameCache(store)
        # cache passes are long (ids repeated) so that worker start-up does not dominate
        many = ids * max(1, -(-args.cache_clips // len(ids)))
        cached, cached_cpu = clips_per_second(_Cached(cache, many), args.workers, warmup=True)
        cached_inproc, _ = clips_per_second(_Cached(cache, many), 0, warmup=True)
        lzf_store = str(tmp_path / "frames_lzf.h5")
        copy_compressed(store, lzf_store, "lzf")
        cached_lzf, _ = clips_per_second(_Cached(FrameCache(lzf_store), many), args.workers, warmup=True)
        sizes = {"none": os.path.getsize(store), "lzf": os.path.getsize(lzf_store)}

    best = max(decode, key=decode.get)
    result = {
        "decode_clips_per_s": decode,
        "decode_samples": samples,
        "decode_clips_per_cpu_s": decode_cpu,
        "cache_clips_per_cpu_s": cached_cpu,
        "cache_clips_per_s": cached,
        "cache_clips_per_s_in_process": cached_inproc,
        "cache_lzf_clips_per_s": cached_lzf,
        "cache_bytes": sizes,
        "cache_build_clips_per_s": build,
        "cache_speedup_over_best_decoder": cached / decode[best],
        "best_decoder": best,
        "best_decoder_per_cpu_s": max(decode_cpu, key=decode_cpu.get),
        "num_videos": len(files),
        "synthetic_videos": args.video_path is None,
        "workers": args.workers,
        "max_frames": args.max_frames,
        "framerate": args.framerate,
        "size": args.size,
        "machine": machine_info(),
    }
    save_json(result, args.json)
    print(f"\n{len(files)} videos, {args.workers} workers, {args.max_frames} frames at "
          f"{args.framerate:g} fps, size {args.size}")
    print(f"{'source':<28}{'clips/s':>12}{'clips/CPU-s':>14}")
    for backend, rate in decode.items():
        print(f"{'decode ' + backend:<28}{rate:>12.1f}{decode_cpu[backend]:>14.2f}")
    print(f"{'frame cache':<28}{cached:>12.1f}{cached_cpu:>14.1f}")
    print(f"{'frame cache (in process)':<28}{cached_inproc:>12.1f}")
    print(f"{'frame cache, lzf':<28}{cached_lzf:>12.1f}")
    print(f"{'cache build':<28}{build:>12.1f}")
    print(f"cache / best decoder ({best}): {result['cache_speedup_over_best_decoder']:.1f}x; "
          f"store {sizes['none'] / 1e6:.1f} MB (lzf {sizes['lzf'] / 1e6:.1f} MB); wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
