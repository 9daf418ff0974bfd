"""HDF5 frame cache: every video decoded once (:func:`build_cache`, CLI ``scripts/cache_frames.py``), clips
then read in microseconds.

Layout (format ``emcl-frame-cache``, version 1)::

    /                       attrs: format, version, max_frames, framerate, size, backend, compression,
                                   index_rounding ("round" when absent: stores from before it existed),
                                   complete (True only in a finished store), num_videos, num_failed
    /videos/<key>           group per video; attrs: video_id, num_frames, start, end (NaN: whole video),
                                   complete (written last: the entry is usable only when it is set)
    /videos/<key>/frames    uint8 (num_frames, 3, size, size): the real frames only, no padding
    /videos/<key>/mask      uint8 (max_frames,): 1 on the real frames
    /failed/<key>           attrs: video_id, reason (videos that could not be decoded, --skip_bad_videos)

``<key>`` is the video id with ``%`` and ``/`` percent-encoded. ``FrameCache.get(id)`` returns exactly what
``read_frames`` gives with the same settings (the cache stores its output).

Crash safety (writer side, :class:`CacheWriter`): the store is built in ``FILE.h5.partial``; each video's
datasets are written, then its ``complete`` attribute, then the file is flushed (HDF5 metadata) and fsynced.
A process killed at any point leaves at most one entry without ``complete``; reopening drops such entries
and continues. A partial file HDF5 itself can no longer open is set aside (``.corrupt-<time>``) and the
build restarts. At the end every entry is checked, the root gets ``complete=True`` and the file is moved
onto ``FILE.h5`` with ``os.replace``: a reader never sees an unfinished store.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from emcl.data.video import (
    BACKENDS,
    DEFAULT_INDEX_ROUNDING,
    INDEX_ROUNDINGS,
    VideoError,
    find_videos,
    read_frames,
)
from emcl.data.workers import worker_context
from emcl.errors import UserValueError
from emcl.progress import bar as progress_bar

log = logging.getLogger(__name__)

FORMAT = "emcl-frame-cache"
VERSION = 1
PARTIAL_SUFFIX = ".partial"


def encode_key(video_id: str) -> str:
    """HDF5 link name for a video id ('/' is not allowed in names; '.' alone is reserved)."""
    key = video_id.replace("%", "%25").replace("/", "%2F")
    if key in ("", ".", ".."):
        key = key.replace(".", "%2E") or "%00"
    return key


def decode_key(key: str) -> str:
    if key == "%00":
        return ""
    return key.replace("%2E", ".").replace("%2F", "/").replace("%25", "%")


def _window_attr(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _same_window(stored: Any, wanted: float | None) -> bool:
    stored = float(stored)
    if wanted is None:
        return math.isnan(stored)
    return not math.isnan(stored) and abs(stored - float(wanted)) < 1e-6


def source_stamp(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(size in bytes, modification time in ns) of a source video: a changed file is re-decoded."""
    st = os.stat(path)
    return int(st.st_size), int(st.st_mtime_ns)


def _entry_current(attrs: Any, start: float | None, end: float | None, stamp: tuple[int, int] | None) -> bool:
    """Whether a stored entry has the requested window and, when the source is known (``stamp``), was
    decoded from that same file (size and modification time). An entry without a stamp cannot prove it,
    so it counts as stale and is decoded again."""
    if not (_same_window(attrs.get("start", np.nan), start) and _same_window(attrs.get("end", np.nan), end)):
        return False
    if stamp is None:
        return True
    if "src_size" not in attrs:
        return False
    return (int(attrs["src_size"]), int(attrs["src_mtime_ns"])) == stamp


def _fmt_window(start: float | None, end: float | None) -> str:
    if start is None and end is None:
        return "the whole video"
    return f"window [{start}, {end}] s"


def _stored_window(attrs: Any) -> tuple[float | None, float | None]:
    def one(name: str) -> float | None:
        v = float(attrs.get(name, float("nan")))
        return None if math.isnan(v) else v

    return one("start"), one("end")


def _same_setting(a: Any, b: Any) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return math.isclose(float(a), float(b), rel_tol=1e-9)


class FrameCache:
    """Read side of the frame store. Picklable; the HDF5 file is opened lazily once per process.

    ``in_memory=True`` reads the whole store into RAM on first use in each process (one copy per
    DataLoader worker) and serves every ``get`` from there: per-clip HDF5 lookups cost ~1 ms, which
    matters for small, fast models such as the synthetic demo's.
    """

    def __init__(self, path: str | os.PathLike[str], in_memory: bool = False) -> None:
        self.path = os.fspath(path)
        self.in_memory = in_memory
        self._memory: dict[str, tuple[np.ndarray, np.ndarray, Any, Any]] | None = None
        if not os.path.isfile(self.path):
            hint = (
                " (an unfinished build is in .partial: rerun scripts/cache_frames.py)"
                if os.path.isfile(self.path + PARTIAL_SUFFIX)
                else ""
            )
            raise FileNotFoundError(f"frame cache {self.path} not found{hint}")
        try:
            with h5py.File(self.path, "r") as f:
                attrs = dict(f.attrs)
        except OSError as e:
            raise UserValueError(f"frame cache {self.path} cannot be opened as HDF5: {e}") from None
        if attrs.get("format") != FORMAT:
            raise UserValueError(
                f"{self.path} is not an EMCL frame cache (format attribute {attrs.get('format')!r})"
            )
        if int(attrs.get("version", -1)) != VERSION:
            raise UserValueError(
                f"frame cache {self.path} has version {attrs.get('version')}, this code reads "
                f"version {VERSION}; rebuild it"
            )
        if not bool(attrs.get("complete", False)):
            raise UserValueError(
                f"frame cache {self.path} is not a finished store; rerun scripts/cache_frames.py"
            )
        self.max_frames = int(attrs["max_frames"])
        self.framerate = float(attrs["framerate"])
        self.size = int(attrs["size"])
        self.index_rounding = str(attrs.get("index_rounding", DEFAULT_INDEX_ROUNDING))
        self.backend = str(attrs.get("backend", ""))
        self.version = int(attrs["version"])
        self._file: h5py.File | None = None
        self._pid: int | None = None

    # -- process-local handle
    def _h5(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"] = None
        state["_pid"] = None
        state["_memory"] = None
        return state

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None
        self._pid = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- settings
    def settings(self) -> dict[str, Any]:
        return {"max_frames": self.max_frames, "framerate": self.framerate, "size": self.size,
                "index_rounding": self.index_rounding}

    def check_settings(self, *, max_frames: int, framerate: float, size: int,
                       index_rounding: str = DEFAULT_INDEX_ROUNDING) -> None:
        """Raise ValueError naming both when the requested settings differ from the cache's."""
        wanted = {"max_frames": int(max_frames), "framerate": float(framerate), "size": int(size),
                  "index_rounding": str(index_rounding)}
        have = self.settings()
        diff = [k for k in wanted if not _same_setting(wanted[k], have[k])]
        if diff:
            raise UserValueError(
                f"frame cache {self.path} was built with {have}, but {wanted} was requested "
                f"(differs in {', '.join(diff)}); rebuild the cache with scripts/cache_frames.py or change "
                "the settings"
            )

    # -- lookups
    def _group(self, video_id: str) -> h5py.Group | None:
        videos = self._h5().get("videos")
        if videos is None:
            return None
        return videos.get(encode_key(video_id))

    def __contains__(self, video_id: object) -> bool:
        return isinstance(video_id, str) and self._group(video_id) is not None

    def is_current(self, video_id: str, source: str | os.PathLike[str] | None = None,
                   start: float | None = None, end: float | None = None) -> bool:
        """Whether the cache holds ``video_id`` for this window and, given the ``source`` file, was decoded
        from that same file (size and modification time); an entry without a stamp does not count."""
        group = self._group(video_id)
        if group is None or not bool(group.attrs.get("complete", True)):
            return False
        stamp = source_stamp(source) if source is not None else None
        return _entry_current(group.attrs, start, end, stamp)

    def ids(self) -> list[str]:
        videos = self._h5().get("videos")
        return sorted(decode_key(k) for k in videos.keys()) if videos is not None else []

    def __len__(self) -> int:
        videos = self._h5().get("videos")
        return len(videos) if videos is not None else 0

    def failed(self) -> dict[str, str]:
        """Videos that could not be decoded when the cache was built: id -> reason."""
        failed = self._h5().get("failed")
        if failed is None:
            return {}
        return {decode_key(k): str(g.attrs.get("reason", "")) for k, g in failed.items()}

    def get(
        self, video_id: str, start: float | None = None, end: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames uint8 (max_frames, 3, size, size), zero padded, and mask LongTensor (max_frames,).

        Raises :class:`VideoError` naming the cache and the id when the id is missing, was recorded as a
        failed video, or was cached for a different [start, end] window.
        """
        if self.in_memory:
            if self._memory is None or self._pid != os.getpid():
                videos = self._h5().get("videos") or {}
                self._memory = {
                    decode_key(k): (
                        g["frames"][()],
                        g["mask"][()],
                        g.attrs.get("start", np.nan),
                        g.attrs.get("end", np.nan),
                    )
                    for k, g in videos.items()
                }
            entry = self._memory.get(video_id)
        else:
            group = self._group(video_id)
            entry = (
                None
                if group is None
                else (
                    group["frames"],
                    group["mask"],
                    group.attrs.get("start", np.nan),
                    group.attrs.get("end", np.nan),
                )
            )
        if entry is None:
            failed = self._h5().get("failed")
            key = encode_key(video_id)
            if failed is not None and key in failed:
                reason = str(failed[key].attrs.get("reason", "unknown"))
                raise VideoError(
                    f"recorded as failed when the frame cache was built: {reason}",
                    path=self.path,
                    video_id=video_id,
                )
            raise VideoError("not in the frame cache", path=self.path, video_id=video_id)
        real, mask_u8, stored_start, stored_end = entry
        if not (_same_window(stored_start, start) and _same_window(stored_end, end)):
            stored = _stored_window({"start": stored_start, "end": stored_end})
            raise VideoError(
                f"the frame cache holds {_fmt_window(*stored)}, "
                f"but {_fmt_window(start, end)} was requested (build the cache with scripts/cache_frames.py "
                "--windows)",
                path=self.path,
                video_id=video_id,
            )
        real, mask_u8 = real[()], mask_u8[()]
        frames = np.zeros((self.max_frames, 3, self.size, self.size), dtype=np.uint8)
        frames[: real.shape[0]] = real
        return torch.from_numpy(frames), torch.from_numpy(mask_u8.astype(np.int64))

    def __repr__(self) -> str:
        return (
            f"FrameCache({self.path!r}, max_frames={self.max_frames}, framerate={self.framerate}, "
            f"size={self.size})"
        )


# ------------------------------------------------------------------------------------------ writer


def _fsync(f: h5py.File) -> None:
    try:
        handle = f.id.get_vfd_handle()
        os.fsync(int(handle))
    except Exception:  # not a POSIX-file driver: the flush alone must do
        pass


class CacheWriter:
    """Builds a frame store crash-safely in ``out + '.partial'``; :meth:`finalize` moves it onto ``out``.

    Usage: ``w = CacheWriter(out, ...); w.open(); w.add(...)/w.add_failed(...); w.finalize(ids)``.
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        *,
        max_frames: int,
        framerate: float,
        size: int,
        backend: str,
        compression: str | None = None,
        fsync: bool = True,
        index_rounding: str = DEFAULT_INDEX_ROUNDING,
    ) -> None:
        if compression not in (None, "lzf", "gzip"):
            raise ValueError(f"compression must be None, 'lzf' or 'gzip', got {compression!r}")
        self.out = os.fspath(out)
        self.partial = self.out + PARTIAL_SUFFIX
        self.max_frames, self.framerate, self.size = int(max_frames), float(framerate), int(size)
        self.index_rounding = str(index_rounding)
        self.backend = backend
        self.compression = compression
        self.fsync = fsync
        self.f: h5py.File | None = None
        self.dropped: list[str] = []  # incomplete entries removed on resume

    # -- open / resume
    def _settings(self) -> dict[str, Any]:
        return {"max_frames": self.max_frames, "framerate": self.framerate, "size": self.size,
                "index_rounding": self.index_rounding}

    def _check_attrs(self, path: str, attrs: Any) -> None:
        if attrs.get("format") != FORMAT or int(attrs.get("version", -1)) != VERSION:
            raise ValueError(f"{path} exists but is not a version-{VERSION} EMCL frame cache; move it away")
        have = {
            "max_frames": int(attrs["max_frames"]),
            "framerate": float(attrs["framerate"]),
            "size": int(attrs["size"]),
            "index_rounding": str(attrs.get("index_rounding", DEFAULT_INDEX_ROUNDING)),
        }
        if have != self._settings():
            raise ValueError(
                f"{path} was built with {have}, but {self._settings()} was requested; delete it "
                "or rerun with the same settings"
            )

    def open(self) -> None:
        """Open (or create) the partial store, dropping entries a crash left incomplete."""
        if os.path.exists(self.partial):
            try:
                f = h5py.File(self.partial, "a")
            except OSError as e:
                aside = f"{self.partial}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
                os.replace(self.partial, aside)
                log.warning(
                    "cannot reopen %s (%s); moved it to %s and starting again", self.partial, e, aside
                )
                f = None
            if f is not None:
                try:
                    self._check_attrs(self.partial, f.attrs)
                except Exception:
                    f.close()
                    raise
                self.f = f
                self._drop_incomplete()
                return
        elif os.path.exists(self.out):
            with h5py.File(self.out, "r") as f:
                self._check_attrs(self.out, f.attrs)
            tmp = self.partial + ".copy"
            shutil.copyfile(self.out, tmp)  # extend a finished store: work on a copy
            os.replace(tmp, self.partial)
            self.f = h5py.File(self.partial, "a")
            self.f.attrs["complete"] = False
            self._commit()
            return
        tmp = self.partial + ".new"
        with h5py.File(tmp, "w") as f:
            f.attrs.update(
                {
                    "format": FORMAT,
                    "version": VERSION,
                    "max_frames": self.max_frames,
                    "framerate": self.framerate,
                    "size": self.size,
                    "index_rounding": self.index_rounding,
                    "backend": self.backend,
                    "compression": self.compression or "none",
                    "complete": False,
                }
            )
            f.create_group("videos")
            f.create_group("failed")
        os.replace(tmp, self.partial)
        self.f = h5py.File(self.partial, "a")

    def reopen(self) -> None:
        """Reopen the partial store after :meth:`close` (no resume scan: it was closed cleanly)."""
        if self.f is None:
            self.f = h5py.File(self.partial, "a")

    def _drop_incomplete(self) -> None:
        videos = self.f.require_group("videos")
        for key in list(videos.keys()):
            try:
                ok = bool(videos[key].attrs.get("complete", False))
            except Exception:  # an entry whose metadata did not make it to disk
                ok = False
            if not ok:
                del videos[key]
                self.dropped.append(decode_key(key))
        failed = self.f.require_group("failed")
        for key in list(failed.keys()):  # failures are retried on every run
            del failed[key]
        self.f.attrs["complete"] = False
        self._commit()
        if self.dropped:
            log.warning(
                "%s: dropped %d incomplete entries left by an interrupted run: %s",
                self.partial,
                len(self.dropped),
                self.dropped[:10],
            )

    def _commit(self) -> None:
        self.f.flush()
        if self.fsync:
            _fsync(self.f)

    # -- state
    def done(
        self,
        windows: dict[str, tuple[float | None, float | None]] | None = None,
        stamps: dict[str, tuple[int, int]] | None = None,
    ) -> set[str]:
        """Ids stored completely, with the window requested in ``windows`` and, when ``stamps`` gives the
        source file's (size, mtime), from that same file (a replaced video is decoded again)."""
        out = set()
        for key, group in self.f["videos"].items():
            vid = decode_key(key)
            start, end = (windows or {}).get(vid, (None, None))
            if _entry_current(group.attrs, start, end, (stamps or {}).get(vid)):
                out.add(vid)
        return out

    # -- writes
    def add(
        self,
        video_id: str,
        frames: np.ndarray,
        start: float | None = None,
        end: float | None = None,
        *,
        source: tuple[int, int] | None = None,
    ) -> None:
        """Store the real frames (T, 3, size, size) of one video, then mark it complete and flush.

        ``source``: the (size, mtime_ns) stamp of the file decoded, so a later build can tell it changed."""
        frames = np.ascontiguousarray(frames)
        t = frames.shape[0]
        shape_ok = frames.ndim == 4 and frames.shape[1:] == (3, self.size, self.size)
        if frames.dtype != np.uint8 or not shape_ok or not 1 <= t <= self.max_frames:
            raise ValueError(
                f"{video_id}: frames must be uint8 (1..{self.max_frames}, 3, {self.size}, "
                f"{self.size}), got {frames.dtype} {frames.shape}"
            )
        videos = self.f["videos"]
        key = encode_key(video_id)
        if key in videos:
            del videos[key]
        group = videos.create_group(key)
        if self.compression is None:
            group.create_dataset("frames", data=frames)
        else:
            group.create_dataset("frames", data=frames, chunks=frames.shape, compression=self.compression)
        mask = np.zeros(self.max_frames, np.uint8)
        mask[:t] = 1
        group.create_dataset("mask", data=mask)
        group.attrs.update(
            {"video_id": video_id, "num_frames": t, "start": _window_attr(start), "end": _window_attr(end)}
        )
        if source is not None:
            group.attrs.update({"src_size": source[0], "src_mtime_ns": source[1]})
        self.f.flush()  # data and metadata reach the file before the mark
        group.attrs["complete"] = True
        self._commit()

    def add_failed(self, video_id: str, reason: str) -> None:
        failed = self.f.require_group("failed")
        key = encode_key(video_id)
        if key in failed:
            del failed[key]
        group = failed.create_group(key)
        group.attrs.update({"video_id": video_id, "reason": reason})
        self._commit()

    # -- finish
    def finalize(self, expected: Iterable[str] = ()) -> dict[str, int]:
        """Check every entry (and that each expected id is stored or recorded failed), mark the store
        complete and move it onto the output path. Returns counts."""
        expected = list(expected)
        videos, failed = self.f["videos"], self.f["failed"]
        problems = []
        for key, group in videos.items():
            try:
                shape, dtype = group["frames"].shape, group["frames"].dtype
                mask = group["mask"][()]
                ok = (
                    bool(group.attrs.get("complete", False))
                    and dtype == np.uint8
                    and len(shape) == 4
                    and shape[1:] == (3, self.size, self.size)
                    and 1 <= shape[0] <= self.max_frames
                    and mask.shape == (self.max_frames,)
                    and int(mask.sum()) == shape[0]
                )
            except Exception as e:
                ok, shape = False, repr(e)
            if not ok:
                problems.append(f"{decode_key(key)} ({shape})")
        missing = [v for v in expected if encode_key(v) not in videos and encode_key(v) not in failed]
        if problems or missing:
            raise RuntimeError(
                f"{self.partial}: not finalised, {len(problems)} bad entries {problems[:5]} "
                f"and {len(missing)} missing ids {missing[:5]}; rerun to complete it"
            )
        counts = {"num_videos": len(videos), "num_failed": len(failed)}
        self.f.attrs.update({**counts, "complete": True})
        self._commit()
        self.f.close()
        self.f = None
        with h5py.File(self.partial, "r") as f:  # the file reopens cleanly before it replaces the output
            if not bool(f.attrs["complete"]) or len(f["videos"]) != counts["num_videos"]:
                raise RuntimeError(f"{self.partial}: reopened store does not match what was written")
        os.replace(self.partial, self.out)
        try:
            fd = os.open(os.path.dirname(os.path.abspath(self.out)), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass
        return counts

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


# ------------------------------------------------------------------------------------------ build

Window = tuple[float | None, float | None]

_SKIP_HINT = "(use skip_bad_videos=True / --skip_bad_videos to record it as failed and go on)"


class CacheBuildError(UserValueError):
    """The inputs of a cache build are unusable (no videos to cache, a malformed id list or windows)."""


def read_id_list(spec: str) -> list[str]:
    """Ids from a text file (one per line, ``#`` comments) or a comma separated list; in order, no
    duplicates."""
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


def normalize_windows(raw: Any, source: str = "windows") -> dict[str, Window]:
    """``{video_id: (start, end)}`` with float seconds or None (open end); ``source`` names the origin in
    errors. Raises :class:`CacheBuildError` for anything that is not a mapping of ``[start, end]`` pairs."""
    if not isinstance(raw, dict):
        raise CacheBuildError(
            f"{source}: expected a mapping {{video_id: [start, end]}}, got {type(raw).__name__}"
        )
    out: dict[str, Window] = {}
    for vid, win in raw.items():
        if not (isinstance(win, (list, tuple)) and len(win) == 2):
            raise CacheBuildError(f"{source}: window of {vid!r} must be [start, end], got {win!r}")
        try:
            start, end = (None if w is None else float(w) for w in win)
        except (TypeError, ValueError):
            raise CacheBuildError(
                f"{source}: window of {vid!r} must hold numbers or null, got {win!r}"
            ) from None
        out[str(vid)] = (start, end)
    return out


def read_windows(path: str | os.PathLike[str] | None) -> dict[str, Window]:
    """Windows from a JSON file ``{"video_id": [start_s, end_s], ...}`` (``{}`` for None)."""
    if path is None:
        return {}
    path = os.fspath(path)
    with open(path, encoding="utf-8") as fh:
        try:
            raw = json.load(fh)
        except json.JSONDecodeError as e:
            raise CacheBuildError(f"{path}: not valid JSON: {e}") from None
    return normalize_windows(raw, source=path)


def resolve_videos(
    video_path: str | os.PathLike[str], ids: list[str] | None
) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """(ids, id -> file, id -> problem) for the requested ids, or for every video file in the folder.

    A video is found by file stem (or full file name) anywhere under ``video_path``; an id with no file or
    with several files is a problem, reported per id rather than raised, so callers can skip it.
    """
    video_path = os.fspath(video_path)
    if not os.path.isdir(video_path):
        raise NotADirectoryError(f"video_path {video_path} is not a folder")
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
    """One item per video: decodes it in a DataLoader worker and returns the real frames or the error
    (``error``: the full message stored in the cache, ``reason``: the same without the path and id)."""

    def __init__(
        self,
        jobs: list[tuple[str, str, Window]],
        framerate: float,
        max_frames: int,
        size: int,
        backend: str,
        index_rounding: str = DEFAULT_INDEX_ROUNDING,
    ) -> None:
        self.jobs = jobs
        self.kw = {"framerate": framerate, "max_frames": max_frames, "size": size, "backend": backend,
                   "index_rounding": index_rounding}

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        vid, path, (start, end) = self.jobs[i]
        try:
            frames, mask = read_frames(path, start=start, end=end, video_id=vid, **self.kw)
        except Exception as e:  # every failure is reported per video (VideoError or a decoder surprise)
            if isinstance(e, VideoError):
                error, reason = str(e), e.reason
            else:
                reason = f"{type(e).__name__}: {e}"
                error = f"{reason} ({path})"
            return {"id": vid, "path": path, "frames": None, "error": error, "reason": reason}
        n = int(mask.sum())
        return {"id": vid, "path": path, "frames": frames[:n].numpy(), "error": None, "reason": None}


def _identity(item: Any) -> Any:
    return item


def _results(jobs: _DecodeJobs, workers: int) -> Iterator[dict[str, Any]]:
    """Decoded videos in completion order. With workers, the worker processes start here, at once."""
    if workers <= 0 or len(jobs) == 0:
        return (jobs[i] for i in range(len(jobs)))
    loader = DataLoader(
        jobs,
        batch_size=None,
        shuffle=False,
        num_workers=min(workers, len(jobs)),
        multiprocessing_context=worker_context(),
        collate_fn=_identity,
        in_order=False,
        prefetch_factor=2,
    )
    return iter(loader)


def _finished_store_covers(
    out: str,
    ids: list[str],
    windows: dict[str, Window],
    settings: dict[str, Any],
    stamps: dict[str, tuple[int, int]],
) -> dict[str, int] | None:
    """Counts of a finished store at ``out`` that already holds every id (with its requested window, or
    recorded as failed), else None. Raises ValueError when the store was built with other settings."""
    cache = FrameCache(out)
    try:
        cache.check_settings(**settings)
        failed = cache.failed()
        for vid in ids:
            if vid in failed:
                continue
            group = cache._group(vid)
            start, end = windows.get(vid, (None, None))
            if group is None or not _entry_current(group.attrs, start, end, stamps.get(vid)):
                return None
        return {"num_videos": len(cache), "num_failed": len(failed)}
    finally:
        cache.close()


@dataclass
class _Build:
    """One build's inputs, checked and resolved (what the steps of :func:`build_cache` share), and the
    failures it records."""

    video_path: str  # as given: errors name it so
    out: str  # absolute
    settings: dict[str, Any]  # max_frames, framerate, size, index_rounding
    backend: str
    ids: list[str]  # every requested id, in order
    paths: dict[str, str]  # id -> its video file
    problems: dict[str, str]  # id -> why it has no (single) file
    windows: dict[str, Window]
    stamps: dict[str, tuple[int, int]]  # id -> (size, mtime_ns) of its file
    failures: dict[str, str] = field(default_factory=dict)  # id -> reason, this run


def _checked_settings(
    backend: str, max_frames: int, framerate: float, size: int, ids: Any, index_rounding: str
) -> dict[str, Any]:
    """The store's settings from build_cache's arguments; raises for an unusable one."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; choose one of {BACKENDS}")
    if int(max_frames) < 1 or int(size) < 1 or not float(framerate) > 0:
        raise ValueError(
            f"max_frames and size must be >= 1 and framerate > 0, got max_frames={max_frames}, "
            f"size={size}, framerate={framerate}"
        )
    if isinstance(ids, str):
        raise TypeError(
            "ids must be a list of video ids, not a string (read_id_list parses files and "
            "comma separated lists)"
        )
    if index_rounding not in INDEX_ROUNDINGS:
        raise ValueError(f"index_rounding must be one of {INDEX_ROUNDINGS}, got {index_rounding!r}")
    return {"max_frames": int(max_frames), "framerate": float(framerate), "size": int(size),
            "index_rounding": index_rounding}


def _resolve_inputs(
    video_path: str | os.PathLike[str], ids: Iterable[str] | None, windows: dict[str, Window] | None
) -> tuple[dict[str, Window], list[str], dict[str, str], dict[str, str]]:
    """(windows, ids, id -> file, id -> problem) of a build; raises CacheBuildError when there is nothing
    to cache or the windows are malformed."""
    windows = normalize_windows(dict(windows or {}))
    requested = None if ids is None else list(dict.fromkeys(ids))
    all_ids, paths, problems = resolve_videos(video_path, requested)
    if not all_ids:
        what = "the id list is empty" if requested is not None else "no video files found"
        raise CacheBuildError(f"no videos to cache under {os.fspath(video_path)}: {what}")
    return windows, all_ids, paths, problems


def _already_cached(build: _Build) -> dict[str, int] | None:
    """The up-to-date short cut: the counts of a finished store at ``out`` (with no unfinished build next
    to it) that already holds every id as requested, else None."""
    if not os.path.isfile(build.out) or os.path.exists(build.out + PARTIAL_SUFFIX):
        return None
    counts = _finished_store_covers(build.out, build.ids, build.windows, build.settings, build.stamps)
    if counts is not None:
        log.info("%s: all %d videos already cached; nothing to do", build.out, len(build.ids))
    return counts


def _record_problems(build: _Build, writer: CacheWriter, todo: list[str], skip_bad_videos: bool) -> None:
    """Ids of ``todo`` without a (single) file: a VideoError, or with ``skip_bad_videos`` a failure."""
    for vid in todo:
        if vid in build.problems:
            if not skip_bad_videos:
                raise VideoError(f"{build.problems[vid]} {_SKIP_HINT}", path=build.video_path, video_id=vid)
            build.failures[vid] = build.problems[vid]
            writer.add_failed(vid, build.problems[vid])


def _store_results(
    build: _Build,
    writer: CacheWriter,
    results: Iterator[dict[str, Any]],
    total: int,
    *,
    skip_bad_videos: bool,
    progress: bool,
) -> int:
    """Write each decoded video (each with its completion mark) or its failure as it arrives; returns
    how many were decoded. An undecodable video raises VideoError unless ``skip_bad_videos``."""
    decoded = 0
    bar = progress_bar(total=total, unit="video", show=progress, dynamic_ncols=True)
    try:
        for item in results:
            vid = item["id"]
            if item["error"] is not None:
                if not skip_bad_videos:
                    raise VideoError(
                        f"cannot be cached: {item['reason']} {_SKIP_HINT}",
                        path=item["path"],
                        video_id=vid,
                    )
                build.failures[vid] = item["error"]
                writer.add_failed(vid, item["error"])
            else:
                frames = np.asarray(item["frames"])
                start, end = build.windows.get(vid, (None, None))
                writer.add(vid, frames, start, end, source=build.stamps[vid])
                decoded += 1
            bar.update(1)
            bar.set_postfix(failed=len(build.failures), refresh=False)
    finally:
        bar.close()
    return decoded


def _decode_into_store(
    build: _Build,
    writer: CacheWriter,
    *,
    workers: int,
    skip_bad_videos: bool,
    progress: bool,
) -> tuple[dict[str, int], int]:
    """Open (or resume) the partial store, decode every id it lacks into it, then finish it and move it
    onto ``out`` (:meth:`CacheWriter.finalize`). Returns the store's counts and how many were decoded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # decoding parallelism comes from the workers
    try:
        writer.open()  # inside: a store that cannot be opened still gives the threads back
        done = writer.done(build.windows, build.stamps)
        todo = [v for v in build.ids if v not in done]
        _record_problems(build, writer, todo, skip_bad_videos)
        jobs = [(v, build.paths[v], build.windows.get(v, (None, None))) for v in todo if v in build.paths]
        log.info(
            "%s: %d videos, %d already cached%s, decoding %d with %d workers (%s)",
            build.out,
            len(build.ids),
            len(build.ids) - len(todo),
            f", {len(writer.dropped)} incomplete entries dropped" if writer.dropped else "",
            len(jobs),
            workers,
            build.backend,
        )
        s = build.settings
        dataset = _DecodeJobs(
            jobs, s["framerate"], s["max_frames"], s["size"], build.backend, s["index_rounding"]
        )
        # workers start while the HDF5 file is closed, so no child ever holds an open writer
        writer.close()
        results = _results(dataset, workers)
        writer.reopen()
        decoded = _store_results(
            build, writer, results, len(jobs), skip_bad_videos=skip_bad_videos, progress=progress
        )
        counts = writer.finalize(build.ids)
    finally:
        writer.close()
        torch.set_num_threads(threads)
    return counts, decoded


def _log_summary(
    out: str, counts: dict[str, int], decoded: int, took: float, failures: dict[str, str]
) -> None:
    """What a finished build wrote, and the first 20 videos recorded as failed."""
    log.info(
        "wrote %s: %d videos, %d failed, %.2f GB, %d decoded in %.1f s",
        out,
        counts["num_videos"],
        counts["num_failed"],
        os.path.getsize(out) / 1e9,
        decoded,
        took,
    )
    if failures:
        lines = [f"  {vid}: {reason}" for vid, reason in list(failures.items())[:20]]
        if len(failures) > 20:
            lines.append(f"  ... and {len(failures) - 20} more (FrameCache(path).failed() lists them)")
        log.warning(
            "%d videos could not be decoded and are recorded as failed in the store:\n%s",
            len(failures),
            "\n".join(lines),
        )


def build_cache(
    video_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    max_frames: int,
    framerate: float,
    size: int = 224,
    ids: Iterable[str] | None = None,
    windows: dict[str, Window] | None = None,
    workers: int = 0,
    backend: str = "pyav",
    skip_bad_videos: bool = False,
    compression: str | None = None,
    progress: bool = True,
    index_rounding: str = DEFAULT_INDEX_ROUNDING,
) -> dict[str, Any]:
    """Decode the videos under ``video_path`` (all, or ``ids``) once into the frame store ``out``.

    Resumable and crash-safe (:class:`CacheWriter`): ids already stored with the same window are skipped,
    a finished store is extended, and ``out`` only ever holds a finished store. ``windows`` maps ids to
    ``(start, end)`` seconds to cache only that part. Videos are decoded by ``workers`` DataLoader
    processes (0: in this process). A missing, ambiguous or undecodable video raises :class:`VideoError`
    (naming the id and file) unless ``skip_bad_videos``, which records it as failed in the store.
    ``compression``: None, ``"lzf"`` or ``"gzip"``. ``index_rounding``: how evenly spaced frames are
    picked (``"round"``, or ``"floor"`` as the reference; see ``sample_indices``), recorded in the store
    and checked by readers.

    Returns a summary: ``out``, ``num_requested``, ``num_videos`` / ``num_failed`` (in the finished
    store), ``decoded`` (this run), ``seconds``, ``failures`` ({id: reason}, this run) and ``up_to_date``
    (True when there was nothing to do). Raises NotADirectoryError for a ``video_path`` that is not a
    folder, :class:`CacheBuildError` when there is nothing to cache or the windows are malformed, and
    ValueError when an existing store at ``out`` was built with other settings.
    """
    settings = _checked_settings(backend, max_frames, framerate, size, ids, index_rounding)
    out = os.path.abspath(os.fspath(out))
    writer = CacheWriter(out, backend=backend, compression=compression, **settings)  # checks compression
    windows, all_ids, paths, problems = _resolve_inputs(video_path, ids, windows)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    started = time.time()
    build = _Build(
        os.fspath(video_path), out, settings, backend, all_ids, paths, problems, windows,
        stamps={vid: source_stamp(path) for vid, path in paths.items()},
    )
    summary: dict[str, Any] = {
        "out": out,
        "num_requested": len(all_ids),
        "decoded": 0,
        "failures": build.failures,
        "up_to_date": False,
    }
    counts = _already_cached(build)
    if counts is not None:
        return {**summary, **counts, "seconds": time.time() - started, "up_to_date": True}
    counts, decoded = _decode_into_store(
        build, writer, workers=workers, skip_bad_videos=skip_bad_videos, progress=progress
    )
    took = time.time() - started
    _log_summary(out, counts, decoded, took, build.failures)
    return {**summary, **counts, "decoded": decoded, "seconds": took}
