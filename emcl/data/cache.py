"""HDF5 frame cache: every video decoded once (``scripts/cache_frames.py``), clips then read in microseconds.

Layout (format ``emcl-frame-cache``, version 1)::

    /                       attrs: format, version, max_frames, framerate, size, backend, compression,
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

import logging
import math
import os
import shutil
import time
from collections.abc import Iterable
from typing import Any

import h5py
import numpy as np
import torch

from emcl.data.video import VideoError

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


def _fmt_window(start: float | None, end: float | None) -> str:
    if start is None and end is None:
        return "the whole video"
    return f"window [{start}, {end}] s"


def _stored_window(attrs: Any) -> tuple[float | None, float | None]:
    def one(name: str) -> float | None:
        v = float(attrs.get(name, float("nan")))
        return None if math.isnan(v) else v

    return one("start"), one("end")


class FrameCache:
    """Read side of the frame store. Picklable; the HDF5 file is opened lazily once per process."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            hint = " (an unfinished build is in .partial: rerun scripts/cache_frames.py)" if os.path.isfile(
                self.path + PARTIAL_SUFFIX) else ""
            raise FileNotFoundError(f"frame cache {self.path} not found{hint}")
        try:
            with h5py.File(self.path, "r") as f:
                attrs = dict(f.attrs)
        except OSError as e:
            raise ValueError(f"frame cache {self.path} cannot be opened as HDF5: {e}") from None
        if attrs.get("format") != FORMAT:
            raise ValueError(f"{self.path} is not an EMCL frame cache "
                             f"(format attribute {attrs.get('format')!r})")
        if int(attrs.get("version", -1)) != VERSION:
            raise ValueError(f"frame cache {self.path} has version {attrs.get('version')}, this code reads "
                             f"version {VERSION}; rebuild it")
        if not bool(attrs.get("complete", False)):
            raise ValueError(f"frame cache {self.path} is not a finished store; "
                             "rerun scripts/cache_frames.py")
        self.max_frames = int(attrs["max_frames"])
        self.framerate = float(attrs["framerate"])
        self.size = int(attrs["size"])
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
        return {"max_frames": self.max_frames, "framerate": self.framerate, "size": self.size}

    def check_settings(self, *, max_frames: int, framerate: float, size: int) -> None:
        """Raise ValueError naming both when the requested settings differ from the cache's."""
        wanted = {"max_frames": int(max_frames), "framerate": float(framerate), "size": int(size)}
        have = self.settings()
        diff = [k for k in wanted if not math.isclose(float(wanted[k]), float(have[k]), rel_tol=1e-9)]
        if diff:
            raise ValueError(
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

    def get(self, video_id: str, start: float | None = None,
            end: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames uint8 (max_frames, 3, size, size), zero padded, and mask LongTensor (max_frames,).

        Raises :class:`VideoError` naming the cache and the id when the id is missing, was recorded as a
        failed video, or was cached for a different [start, end] window.
        """
        group = self._group(video_id)
        if group is None:
            failed = self._h5().get("failed")
            key = encode_key(video_id)
            if failed is not None and key in failed:
                reason = str(failed[key].attrs.get("reason", "unknown"))
                raise VideoError(f"recorded as failed when the frame cache was built: {reason}",
                                 path=self.path, video_id=video_id)
            raise VideoError("not in the frame cache", path=self.path, video_id=video_id)
        if not (_same_window(group.attrs.get("start", np.nan), start)
                and _same_window(group.attrs.get("end", np.nan), end)):
            raise VideoError(
                f"the frame cache holds {_fmt_window(*_stored_window(group.attrs))}, "
                f"but {_fmt_window(start, end)} was requested (build the cache with --windows)",
                path=self.path, video_id=video_id)
        real = group["frames"][()]
        mask_u8 = group["mask"][()]
        frames = np.zeros((self.max_frames, 3, self.size, self.size), dtype=np.uint8)
        frames[: real.shape[0]] = real
        return torch.from_numpy(frames), torch.from_numpy(mask_u8.astype(np.int64))

    def __repr__(self) -> str:
        return (f"FrameCache({self.path!r}, max_frames={self.max_frames}, framerate={self.framerate}, "
                f"size={self.size})")


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

    def __init__(self, out: str | os.PathLike[str], *, max_frames: int, framerate: float, size: int,
                 backend: str, compression: str | None = None, fsync: bool = True) -> None:
        if compression not in (None, "lzf", "gzip"):
            raise ValueError(f"compression must be None, 'lzf' or 'gzip', got {compression!r}")
        self.out = os.fspath(out)
        self.partial = self.out + PARTIAL_SUFFIX
        self.max_frames, self.framerate, self.size = int(max_frames), float(framerate), int(size)
        self.backend = backend
        self.compression = compression
        self.fsync = fsync
        self.f: h5py.File | None = None
        self.dropped: list[str] = []  # incomplete entries removed on resume

    # -- open / resume
    def _settings(self) -> dict[str, Any]:
        return {"max_frames": self.max_frames, "framerate": self.framerate, "size": self.size}

    def _check_attrs(self, path: str, attrs: Any) -> None:
        if attrs.get("format") != FORMAT or int(attrs.get("version", -1)) != VERSION:
            raise ValueError(f"{path} exists but is not a version-{VERSION} EMCL frame cache; move it away")
        have = {"max_frames": int(attrs["max_frames"]), "framerate": float(attrs["framerate"]),
                "size": int(attrs["size"])}
        if have != self._settings():
            raise ValueError(f"{path} was built with {have}, but {self._settings()} was requested; delete it "
                             "or rerun with the same settings")

    def open(self) -> None:
        """Open (or create) the partial store, dropping entries a crash left incomplete."""
        if os.path.exists(self.partial):
            try:
                f = h5py.File(self.partial, "a")
            except OSError as e:
                aside = f"{self.partial}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
                os.replace(self.partial, aside)
                log.warning("cannot reopen %s (%s); moved it to %s and starting again",
                            self.partial, e, aside)
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
            f.attrs.update({"format": FORMAT, "version": VERSION, "max_frames": self.max_frames,
                            "framerate": self.framerate, "size": self.size, "backend": self.backend,
                            "compression": self.compression or "none", "complete": False})
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
            log.warning("%s: dropped %d incomplete entries left by an interrupted run: %s", self.partial,
                        len(self.dropped), self.dropped[:10])

    def _commit(self) -> None:
        self.f.flush()
        if self.fsync:
            _fsync(self.f)

    # -- state
    def done(self, windows: dict[str, tuple[float | None, float | None]] | None = None) -> set[str]:
        """Ids stored completely (with the same window as requested in ``windows``, when given)."""
        out = set()
        for key, group in self.f["videos"].items():
            vid = decode_key(key)
            start, end = (windows or {}).get(vid, (None, None))
            if _same_window(group.attrs.get("start", np.nan), start) and _same_window(
                    group.attrs.get("end", np.nan), end):
                out.add(vid)
        return out

    # -- writes
    def add(self, video_id: str, frames: np.ndarray, start: float | None = None, end: float | None = None,
            *, _complete: bool = True) -> None:
        """Store the real frames (T, 3, size, size) of one video, then mark it complete and flush."""
        frames = np.ascontiguousarray(frames)
        t = frames.shape[0]
        shape_ok = frames.ndim == 4 and frames.shape[1:] == (3, self.size, self.size)
        if frames.dtype != np.uint8 or not shape_ok or not 1 <= t <= self.max_frames:
            raise ValueError(f"{video_id}: frames must be uint8 (1..{self.max_frames}, 3, {self.size}, "
                             f"{self.size}), got {frames.dtype} {frames.shape}")
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
        group.attrs.update({"video_id": video_id, "num_frames": t, "start": _window_attr(start),
                            "end": _window_attr(end)})
        self.f.flush()  # data and metadata reach the file before the mark
        if not _complete:  # test hook: leave the entry a crash at this point would leave
            return
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
                ok = (bool(group.attrs.get("complete", False)) and dtype == np.uint8 and len(shape) == 4
                      and shape[1:] == (3, self.size, self.size) and 1 <= shape[0] <= self.max_frames
                      and mask.shape == (self.max_frames,) and int(mask.sum()) == shape[0])
            except Exception as e:
                ok, shape = False, repr(e)
            if not ok:
                problems.append(f"{decode_key(key)} ({shape})")
        missing = [v for v in expected if encode_key(v) not in videos and encode_key(v) not in failed]
        if problems or missing:
            raise RuntimeError(f"{self.partial}: not finalised, {len(problems)} bad entries {problems[:5]} "
                               f"and {len(missing)} missing ids {missing[:5]}; rerun to complete it")
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
