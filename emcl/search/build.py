"""Building a search index: every video of a folder sampled as the run did, encoded once (through
:func:`emcl.evaluation.encode_split`), and written as ``features.pt`` + ``index.json``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from emcl.data.workers import loader_context
from emcl.errors import UserError
from emcl.evaluation import encode_split
from emcl.fileio import save_json, save_torch

log = logging.getLogger(__name__)

FORMAT = "emcl-search-index"
VERSION = 1


def list_videos(root: str | os.PathLike) -> list[tuple[str, str]]:
    """(id, path) of every video file under ``root``, sorted; id = path under root without the ending
    (with the ending when two files would share an id). Paths are as seen under ``root``: a video linked
    into it keeps its link's path (links are not resolved)."""
    from emcl.data.video import find_videos

    root = Path(root)
    if not root.is_dir():
        raise UserError(f"video folder {root} does not exist")
    files = sorted({p for paths in find_videos(root).values() for p in paths})
    rel = [Path(os.path.relpath(p, root)).as_posix() for p in files]
    stems = [os.path.splitext(r)[0] for r in rel]
    clash = {s for s in stems if stems.count(s) > 1}
    return [(r if s in clash else s, p) for r, s, p in zip(rel, stems, files)]


class _Clips(Dataset):
    """Clips of the listed videos: from the frame cache when it is current for the file, else decoded."""

    def __init__(self, videos: list[tuple[str, str]], cfg: argparse.Namespace,
                 cache_path: str | None) -> None:
        self.videos, self.cfg, self.cache_path = videos, cfg, cache_path
        self._cache = None

    def __len__(self) -> int:
        return len(self.videos)

    def _from_cache(self, vid: str, path: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.cache_path is None:
            return None
        if self._cache is None:
            from emcl.data.cache import FrameCache

            self._cache = FrameCache(self.cache_path)
        if not self._cache.is_current(vid, path):
            return None
        return self._cache.get(vid)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from emcl.data.video import VideoError, read_frames

        vid, path = self.videos[i]
        cfg = self.cfg
        try:
            clip = self._from_cache(vid, path)
            cached = clip is not None
            if clip is None:
                clip = read_frames(path, framerate=cfg.video_framerate, max_frames=cfg.max_frames,
                                   size=cfg.image_size, backend=getattr(cfg, "decode_backend", "pyav"),
                                   video_id=vid)
        except (VideoError, OSError, ValueError) as e:
            return {"index": i, "error": str(e)}
        return {"index": i, "frames": clip[0], "mask": clip[1], "cached": cached}


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch's readable clips stacked (``index``, ``frames``, ``mask``), the others' errors by index."""
    good = [b for b in items if "error" not in b]
    batch: dict[str, Any] = {"size": len(items), "cached": sum(bool(b["cached"]) for b in good),
                             "failed": {b["index"]: b["error"] for b in items if "error" in b}}
    if good:
        batch.update({k: torch.stack([torch.as_tensor(b[k]) for b in good])
                      for k in ("index", "frames", "mask")})
    return batch


def _usable_cache(cfg: argparse.Namespace, choice: str) -> str | None:
    """The frame cache to read clips from: ``auto`` = the run's, when it exists and fits the settings."""
    if choice == "none":
        return None
    path = getattr(cfg, "frame_cache", None) if choice == "auto" else choice
    if not path:
        return None
    if not os.path.isfile(path):
        if choice != "auto":
            raise UserError(f"--frame_cache {path}: file not found")
        log.info("the run's frame cache %s is not here: decoding every video", path)
        return None
    from emcl.data.cache import FrameCache

    try:
        FrameCache(path).check_settings(max_frames=cfg.max_frames, framerate=cfg.video_framerate,
                                        size=cfg.image_size)
    except ValueError as e:
        if choice != "auto":
            raise UserError(str(e)) from None
        log.info("not using the run's frame cache: %s", e)
        return None
    return path


def stamp(path: str | os.PathLike) -> list[int]:
    st = os.stat(path)
    return [int(st.st_size), int(st.st_mtime_ns)]


def _plain(obj: Any) -> Any:
    """A JSON-able copy of a config value (paths and tuples as strings and lists)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return str(obj)


#: What an index folder holds: ``--overwrite`` replaces these, and only these.
INDEX_FILES = ("index.json", "features.pt", ".*.tmp")


@torch.no_grad()
def _encode_videos(run: Any, videos: list[tuple[str, str]], cache: str | None, batch_size: int, workers: int,
                   progress: bool) -> tuple[torch.Tensor, torch.Tensor, list[int], dict[str, str], int]:
    """Per-frame features and masks of every video (rows in ``videos`` order), the rows that were read,
    the unreadable videos' errors by id, and how many clips came from the frame cache."""
    cfg, model = run.cfg, run.model
    loader = DataLoader(_Clips(videos, cfg, cache), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate, multiprocessing_context=loader_context(workers))
    keep: list[int] = []
    failed: dict[str, str] = {}
    n_cached = 0

    def readable(bar: tqdm) -> Iterator[dict[str, Any]]:
        """The loader's batches that hold a readable clip; the others' videos named and recorded."""
        nonlocal n_cached
        for batch in loader:
            for i, error in batch["failed"].items():
                failed[videos[i][0]] = error
                log.warning("cannot index %s: %s", videos[i][1], error)
            bar.update(batch["size"])
            if "index" in batch:
                keep.extend(batch["index"].tolist())
                n_cached += batch["cached"]
                yield batch

    feats = masks = torch.empty(0)
    with tqdm(total=len(videos), desc="index", unit="video", disable=not progress, file=sys.stderr) as bar:
        try:
            feats, masks = encode_split(readable(bar), lambda b: (model.encode_video(b["frames"], b["mask"]),
                                                                  b["mask"].to(torch.uint8)),
                                        len(videos), run.device, getattr(cfg, "precision", "auto"))
        except ValueError:  # no batch held a readable clip
            if keep:
                raise
    return feats, masks, keep, failed, n_cached


def build_index(videos_dir: str | os.PathLike, checkpoint: str | os.PathLike, out: str | os.PathLike,
                config: str | None = None, device: str = "cpu", batch_size: int = 32, workers: int = 0,
                frame_cache: str = "auto", progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Embed every video under ``videos_dir`` with the checkpoint's model and write the index to ``out``
    (holding its lock; an existing index is replaced only with ``overwrite``). Returns the index metadata
    (also ``out/index.json``)."""
    from emcl.train.outdir import ToolOutput
    from emcl.train.runs import load_run

    videos = list_videos(videos_dir)
    if not videos:
        raise UserError(f"no video files under {videos_dir}")
    with ToolOutput(out, overwrite=overwrite, own=INDEX_FILES, flag="--out", tool="emcl.search index",
                    markers=("index.json", "features.pt")) as claim:
        run = load_run(checkpoint=checkpoint, config=config, device=device)
        run.need("score_fn")  # queries score with it: refuse another task's checkpoint now, not then
        cache = _usable_cache(run.cfg, frame_cache)
        start = time.perf_counter()
        encoded = _encode_videos(run, videos, cache, batch_size, workers, progress)
        feats, masks, keep, failed, n_cached = encoded
        if not keep:
            raise UserError(f"none of the {len(videos)} video(s) under {videos_dir} could be read "
                            f"(first: {next(iter(failed.items()))})")
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "checkpoint": str(Path(checkpoint).resolve()),
            "checkpoint_stamp": stamp(checkpoint),
            "videos_dir": os.path.abspath(videos_dir),  # as the user sees it: links are not resolved
            "video_ids": [videos[i][0] for i in keep],
            "paths": [Path(os.path.relpath(videos[i][1], videos_dir)).as_posix() for i in keep],
            "failed": failed,
            "num_from_frame_cache": n_cached,
            "frame_cache": cache,
            "seconds": round(time.perf_counter() - start, 2),
            "config": _plain({k: v for k, v in vars(run.cfg).items() if not k.startswith("_")}),
        }
        claim.clear()  # the earlier index (--overwrite), index.json first: no mix of old and new
        rows = torch.tensor(keep, device=feats.device)
        save_torch({"frames": feats[rows].cpu(), "mask": masks[rows].cpu()}, Path(out) / "features.pt")
        save_json(meta, Path(out) / "index.json")  # written last: its presence marks a finished index
    return meta
