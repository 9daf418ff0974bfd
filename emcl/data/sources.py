"""Where clips come from: the one interface every frame source offers, and the checks made on a split's
videos before a run starts.

A frame source is anything with ``load(video_id, start=None, end=None) -> (frames, mask)`` (frames uint8
``(max_frames, 3, size, size)``, mask LongTensor ``(max_frames,)``) and ``max_frames`` / ``size``
attributes: :class:`ClipSource`. Datasets read clips through it and nothing else. Two classes offer it:

- :class:`VideoSource`: videos decoded on demand (:func:`emcl.data.video.read_frames`), or the HDF5
  frame cache (:class:`emcl.data.cache.FrameCache`) when it is given one;
- :class:`emcl.data.frames.FrameFolderSource`: JPEG frame folders (the CLIP2Video reference's layout).

This module sits above :mod:`emcl.data.video` (decoding) and :mod:`emcl.data.cache` (the store, which
imports ``video`` to build itself); neither of them imports it. The cache is imported only when a
:class:`VideoSource` is given one, so that h5py loads only then.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import Protocol

import torch

from emcl.data.video import (
    DEFAULT_BACKEND,
    DEFAULT_INDEX_ROUNDING,
    VideoError,
    check_backend,
    check_index_rounding,
    find_videos,
    read_frames,
)
from emcl.errors import UserError


class ClipSource(Protocol):
    """What datasets read clips from: :class:`VideoSource` or :class:`~emcl.data.frames.FrameFolderSource`."""

    max_frames: int
    size: int

    def load(self, video_id: str, start: float | None = None,
             end: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames uint8 (max_frames, 3, size, size) and mask LongTensor (max_frames,) of one clip; raises
        :class:`~emcl.data.video.VideoError` naming the video when it cannot be read."""
        ...


class VideoSource:
    """Where clips come from: a folder of videos (decoded on demand) or an HDF5 frame cache.

    ``load(video_id, start=None, end=None) -> (frames, mask)``. Without a cache the file is
    ``{video_path}/{video_id}.mp4``, or with ``any_extension=True`` any video whose stem (or file name) is
    the id, found by walking the folder once (MSVD). ``index_rounding``: ``"round"`` (default) or
    ``"floor"`` (the reference's truncation, set under ``--faithful``), see
    :func:`~emcl.data.video.sample_indices`; a frame cache must have been built with the same. Picklable
    for DataLoader workers: the cache's HDF5 file is opened lazily in each process.
    """

    def __init__(self, video_path: str | None, *, framerate: float, max_frames: int, size: int,
                 backend: str = DEFAULT_BACKEND, frame_cache: str | None = None,
                 any_extension: bool = False, cache_in_memory: bool = False,
                 index_rounding: str = DEFAULT_INDEX_ROUNDING) -> None:
        check_backend(backend)
        check_index_rounding(index_rounding)
        if video_path is None and frame_cache is None:
            raise ValueError("VideoSource needs a video_path or a frame_cache")
        self.video_path = None if video_path is None else os.fspath(video_path)
        self.framerate = framerate
        self.max_frames = max_frames
        self.size = size
        self.backend = backend
        self.index_rounding = index_rounding
        self.any_extension = any_extension
        self._index: dict[str, list[str]] | None = None
        self.cache = None
        if frame_cache is not None:
            from emcl.data.cache import FrameCache  # here: h5py loads only when a cache is used

            self.cache = FrameCache(frame_cache, in_memory=cache_in_memory)
            self.cache.check_settings(max_frames=max_frames, framerate=framerate, size=size,
                                      index_rounding=index_rounding)

    def path_for(self, video_id: str) -> str:
        """The file that holds ``video_id`` (raises :class:`VideoError` if there is none or several)."""
        if self.video_path is None:
            raise VideoError("no video_path given and the frame cache cannot serve it", video_id=video_id,
                             path=self.cache.path if self.cache is not None else None)
        if not self.any_extension:
            return os.path.join(self.video_path, f"{video_id}.mp4")
        if self._index is None:
            if not os.path.isdir(self.video_path):
                raise VideoError(f"video folder {self.video_path} does not exist", path=self.video_path,
                                 video_id=video_id)
            self._index = find_videos(self.video_path)
        paths = self._index.get(video_id, [])
        if not paths:
            raise VideoError("file not found (no video with this stem under the folder)",
                             path=os.path.join(self.video_path, f"{video_id}.*"), video_id=video_id)
        if len(set(paths)) > 1:
            raise VideoError(f"ambiguous: several files have this stem: {sorted(set(paths))}",
                             path=paths[0], video_id=video_id)
        return paths[0]

    def load(self, video_id: str, start: float | None = None,
             end: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames uint8 (max_frames, 3, size, size) and mask LongTensor (max_frames,) of one clip."""
        if self.cache is not None:
            return self.cache.get(video_id, start=start, end=end)
        return read_frames(self.path_for(video_id), framerate=self.framerate, max_frames=self.max_frames,
                           size=self.size, backend=self.backend, start=start, end=end, video_id=video_id,
                           index_rounding=self.index_rounding)

    def __repr__(self) -> str:
        where = f"frame_cache={self.cache.path!r}" if self.cache is not None else f"{self.video_path!r}"
        return (f"VideoSource({where}, framerate={self.framerate}, max_frames={self.max_frames}, "
                f"size={self.size}, backend={self.backend!r}, index_rounding={self.index_rounding!r})")


# ------------------------------------------------------------------------------------ up-front checks


def missing_videos(source: VideoSource | str | os.PathLike[str], video_ids: Iterable[str]) -> dict[str, str]:
    """Videos of ``video_ids`` that cannot be there: id -> reason ("missing", "empty (0 bytes)", ...).

    A stat per video, no decoding. ``source`` is a :class:`VideoSource` (its frame cache when it has one,
    else its folder, honouring ``any_extension``) or a folder of ``{id}.mp4`` files.
    """
    if not isinstance(source, VideoSource):
        source = VideoSource(os.fspath(source), framerate=1.0, max_frames=1, size=1)
    bad: dict[str, str] = {}
    if source.cache is not None:
        cached = set(source.cache.ids())
        failed = source.cache.failed()
        for vid in video_ids:
            if vid in failed:
                bad[vid] = f"recorded as undecodable when the cache was built ({failed[vid]})"
            elif vid not in cached:
                bad[vid] = "not in the frame cache"
        return bad
    for vid in video_ids:
        try:
            path = source.path_for(vid)
        except VideoError as e:
            bad[vid] = e.reason
            continue
        try:
            st = os.stat(path)
        except FileNotFoundError:
            bad[vid] = "missing"
            continue
        except OSError as e:
            bad[vid] = f"cannot be read ({e.strerror or e})"
            continue
        if not os.path.isfile(path):
            bad[vid] = "not a regular file"
        elif st.st_size == 0:
            bad[vid] = "empty (0 bytes)"
    return bad


def check_videos_exist(source: VideoSource | str | os.PathLike[str], video_ids: Iterable[str],
                       what: str, show: int = 5) -> None:
    """Raise :class:`~emcl.errors.UserError` unless every video of ``video_ids`` exists and is non-empty
    (or is in the frame cache when ``source`` reads one). A stat per video, no decoding.

    The message names ``what`` (e.g. ``"msvd/test"``), the count, the first ``show`` ids with their reason
    and the folder (or cache) looked in.
    """
    ids = list(video_ids)
    bad = missing_videos(source, ids)
    if not bad:
        return
    cache = source.cache if isinstance(source, VideoSource) else None
    folder = source.video_path if isinstance(source, VideoSource) else os.fspath(source)
    if cache is not None:
        where = f"frame cache {cache.path}"
    elif folder is not None and not os.path.isdir(folder):
        raise UserError(f"{what}: video folder {folder} does not exist ({len(ids)} videos expected in it)")
    else:
        where = f"folder {folder}"
    first = "; ".join(f"{vid} ({reason})" for vid, reason in list(bad.items())[:show])
    more = f"; and {len(bad) - show} more" if len(bad) > show else ""
    raise UserError(f"{what}: {len(bad)} of {len(ids)} videos cannot be used (looked in {where}): "
                    f"{first}{more}")


class SkipBudget:
    """How many of a split's videos may be unreadable before the run stops (``--max_skip_fraction``).

    ``add(ids)`` records unreadable video ids (each counted once); once more than ``fraction`` of
    ``total_videos`` are recorded it raises :class:`~emcl.errors.UserError` naming the count, the share and
    the first ids. ``fraction=0`` stops at the first unreadable video.
    """

    def __init__(self, total_videos: int, fraction: float, what: str = "the split", show: int = 10) -> None:
        if total_videos < 0 or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"SkipBudget needs total_videos >= 0 and 0 <= fraction <= 1, got "
                             f"{total_videos}, {fraction}")
        self.total = total_videos
        self.fraction = fraction
        self.what = what
        self.show = show
        self.ids: dict[str, None] = {}  # insertion-ordered set

    @property
    def count(self) -> int:
        return len(self.ids)

    @property
    def limit(self) -> int:
        """The most unreadable videos allowed."""
        return math.floor(self.fraction * self.total + 1e-9)

    def add(self, video_ids: Iterable[str]) -> None:
        """Record unreadable videos; raise once more than the allowed share are unreadable."""
        for vid in video_ids:
            self.ids.setdefault(str(vid), None)
        self.check()

    def check(self) -> None:
        """Raise :class:`UserError` if more than the allowed share of videos is unreadable."""
        if self.count <= self.limit:
            return
        first = ", ".join(list(self.ids)[: self.show]) + (", ..." if self.count > self.show else "")
        share = self.count / max(self.total, 1)
        raise UserError(
            f"{self.what}: {self.count} of {self.total} videos ({share:.1%}) are unreadable, more than "
            f"--max_skip_fraction {self.fraction:g} allows ({self.limit}): {first}. Fix or replace these "
            "files (scripts/cache_frames.py lists every failure), or raise --max_skip_fraction"
        )
