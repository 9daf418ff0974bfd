"""Video decoding, frame sampling and preprocessing for retrieval models.

One clip = ``max_frames`` RGB frames of ``size``x``size`` (uint8) plus a mask, sampled as
docs/reference.md, 'Datasets and formats' describes:

1. decode at ``framerate`` fps: keep every ``stride``-th native frame, ``stride = round(native_fps /
   framerate)`` (round half up, at least 1), optionally only inside a ``[start, end]`` window in seconds;
2. if more than ``max_frames`` positions remain, keep ``max_frames`` evenly spaced ones (``np.linspace``
   over the positions, rounded to the nearest; ``index_rounding="floor"`` truncates as the reference);
3. resize the short side to ``size`` (bicubic with antialiasing, the same numbers as CLIP's PIL
   preprocessing), center crop ``size``x``size``;
4. pad with zero frames and mask 0 up to ``max_frames``.

Two decoding backends share the index computation (:func:`sample_indices`) and the resize/crop:
PyAV (default, see :func:`read_frames`) and OpenCV. Frames stay uint8; normalisation happens on the
device in the model.

A video that cannot be used raises :class:`VideoError` naming the file, the dataset record (video id)
and the reason. Nothing is silently replaced by zeros.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from emcl.data.videofiles import video_files
from emcl.errors import UserError

log = logging.getLogger(__name__)

BACKENDS = ("pyav", "opencv")
DEFAULT_BACKEND = "pyav"

#: How evenly spaced positions become indices: "round" (nearest, ours) or "floor" (the reference's
#: ``np.linspace(..., dtype=int)``, which truncates; ``--faithful``).
INDEX_ROUNDINGS = ("round", "floor")
DEFAULT_INDEX_ROUNDING = "round"

_EPS = 1e-6


class VideoError(UserError, RuntimeError):
    """A video that cannot be used: missing, unreadable, empty, without fps, ...

    The message names the path, the dataset record (video id) and the reason; the three are also kept as
    attributes ``path``, ``video_id`` and ``reason``. ``VideoError(message)`` alone is accepted so that
    PyTorch's DataLoader can re-raise the error from a worker; the worker's traceback is then kept in
    ``worker_traceback`` and the message is the original one line. A ``UserError``: the command line prints
    it as one line (fix the file, or ``--skip_bad_videos``).
    """

    def __init__(self, reason: str, *, path: str | os.PathLike[str] | None = None,
                 video_id: str | None = None) -> None:
        self.worker_traceback: str | None = None
        if path is None and video_id is None and reason.startswith("Caught VideoError"):
            self.worker_traceback = reason
            last = [line for line in reason.splitlines() if "VideoError: " in line]
            if last:
                reason = last[-1].split("VideoError: ", 1)[1] + " (in a DataLoader worker)"
        self.reason = reason
        self.path = None if path is None else os.fspath(path)
        self.video_id = video_id
        if path is None and video_id is None:
            message = reason
        else:
            message = f"video {video_id!r} ({self.path}): {reason}"
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_make_video_error, (self.reason, self.path, self.video_id))


def _make_video_error(reason: str, path: str | None, video_id: str | None) -> VideoError:
    return VideoError(reason, path=path, video_id=video_id)


# ----------------------------------------------------------------------------------------- sampling


def frame_stride(native_fps: float, framerate: float) -> int:
    """Native frames between two sampled frames: ``round(native_fps / framerate)`` (half up), at least 1."""
    if not (native_fps > 0 and framerate > 0):
        raise ValueError(f"fps must be positive, got native_fps={native_fps}, framerate={framerate}")
    return max(1, int(math.floor(native_fps / framerate + 0.5)))


def window_bounds(num_frames: int, native_fps: float, start: float | None = None,
                  end: float | None = None) -> tuple[int, int]:
    """First and last native frame index (inclusive) whose timestamp ``i / fps`` lies in [start, end]."""
    first = 0 if start is None else max(0, math.ceil(start * native_fps - _EPS))
    last = num_frames - 1
    if end is not None:
        last = min(last, math.floor(end * native_fps + _EPS))
    return first, last


def check_backend(backend: str) -> None:
    """Raise ``ValueError`` for a decoding backend that is not one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; choose one of {BACKENDS}")


def check_index_rounding(rounding: str) -> None:
    """Raise ``ValueError`` for an index rounding that is not one of :data:`INDEX_ROUNDINGS`."""
    if rounding not in INDEX_ROUNDINGS:
        raise ValueError(f"index rounding must be one of {INDEX_ROUNDINGS}, got {rounding!r}")


def sample_indices(num_frames: int, native_fps: float, framerate: float, max_frames: int,
                   start: float | None = None, end: float | None = None,
                   rounding: str = DEFAULT_INDEX_ROUNDING) -> np.ndarray:
    """Native frame indices to keep for one clip (both backends use this; docs/reference.md, 'Datasets and
    formats').

    Positions ``first, first + stride, ...`` up to ``last`` (the ``[start, end]`` window in seconds, or
    the whole video); if more than ``max_frames`` remain, ``max_frames`` evenly spaced ones
    (``np.linspace`` over the positions). ``rounding``: ``"round"`` (default) takes the nearest
    position, ``"floor"`` truncates as the reference does (its ``np.linspace(..., dtype=int)``); e.g. 12
    of 20 positions: round picks 0,2,3,5,7,9,10,12,14,16,17,19, floor 0,1,3,5,6,8,10,12,13,15,17,19.
    Returns int64 indices, strictly increasing, at most ``max_frames`` of them. Raises ``ValueError``
    for bad arguments or a window holding no frame.
    """
    check_index_rounding(rounding)
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if max_frames <= 0:
        raise ValueError(f"max_frames must be positive, got {max_frames}")
    if start is not None and end is not None and end < start:
        raise ValueError(f"window end {end} s is before its start {start} s")
    stride = frame_stride(native_fps, framerate)
    first, last = window_bounds(num_frames, native_fps, start, end)
    if first > last:
        raise ValueError(
            f"window [{start}, {end}] s holds no frame of a video with {num_frames} frames at "
            f"{native_fps:.3f} fps ({num_frames / native_fps:.2f} s)"
        )
    positions = np.arange(first, last + 1, stride, dtype=np.int64)
    if len(positions) > max_frames:
        spaced = np.linspace(0, len(positions) - 1, max_frames)
        pick = (np.round(spaced) if rounding == "round" else np.floor(spaced)).astype(np.int64)
        positions = positions[pick]
    return positions


def resolve_fps(rate: float | None, num_frames: int | None, duration: float | None) -> float:
    """Native fps: the container's rate, or frames / duration when the rate reads 0 or None.

    Raises ``ValueError`` when neither is usable (the caller turns it into a :class:`VideoError`).
    """
    if rate is not None and math.isfinite(rate) and rate > 0:
        return float(rate)
    if num_frames and num_frames > 0 and duration is not None and math.isfinite(duration) and duration > 0:
        return num_frames / duration
    raise ValueError(f"fps reads {rate!r} and the duration ({duration!r}) and frame count ({num_frames!r}) "
                     "cannot replace it")


# ------------------------------------------------------------------------------------ preprocessing


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after resizing the short side to ``size`` (torchvision/CLIP convention: int())."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def resize_center_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    """HxWx3 uint8 RGB -> 3 x size x size uint8: short side to ``size`` (bicubic, antialiased), center crop.

    torchvision's antialiased bicubic on uint8 gives the same numbers as PIL's bicubic, i.e. CLIP's own
    preprocessing (measured: mean abs difference 0.00 on 720p and 240p frames). Copies are done in numpy:
    torch's multi-threaded copies of small tensors were 3x slower on a busy machine.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 frame, got shape {rgb.shape}")
    h, w = rgb.shape[:2]
    nh, nw = resized_size(h, w, size)
    if (nh, nw) != (h, w):
        t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
        chw = TF.resize(t, [nh, nw], interpolation=TF.InterpolationMode.BICUBIC, antialias=True).numpy()
    else:
        chw = rgb.transpose(2, 0, 1)
    top = int(round((nh - size) / 2.0))
    left = int(round((nw - size) / 2.0))
    return np.ascontiguousarray(chw[:, top:top + size, left:left + size])


def _rotate(rgb: np.ndarray, clockwise_degrees: int) -> np.ndarray:
    turns = (clockwise_degrees // 90) % 4
    return np.rot90(rgb, k=-turns) if turns else rgb


# ------------------------------------------------------------------------------------------ readers

FrameGetter = Callable[[], np.ndarray]


class _Reader:
    """A backend: probes fps / frame count, iterates (native index, lazy RGB getter) from an index."""

    path: str
    video_id: str
    fps: float
    header_frames: int | None  # frame count the container claims; not trusted

    def error(self, reason: str) -> VideoError:
        return VideoError(reason, path=self.path, video_id=self.video_id)

    def count_frames(self) -> int:  # exact count, costs a pass over the file
        raise NotImplementedError

    def iter_frames(self, first: int) -> Iterator[tuple[int, FrameGetter]]:
        """Yield (index, getter) in order for frames with index >= some index <= first (seeking allowed).

        ``getter()`` returns the HxWx3 RGB frame; call it before advancing the iterator.
        """
        raise NotImplementedError


class _PyAVReader(_Reader):
    def __init__(self, path: str, video_id: str) -> None:
        import av

        self._av = av
        self.path, self.video_id = path, video_id
        container = self._open()
        try:
            stream = container.streams.video[0]
            self.time_base = stream.time_base
            self.start_pts = stream.start_time or 0
            self.header_frames = int(stream.frames) if stream.frames and stream.frames > 0 else None
            rate = float(stream.average_rate) if stream.average_rate else None
            duration = None
            if stream.duration and self.time_base:
                duration = float(stream.duration * self.time_base)
            elif container.duration:
                duration = container.duration / av.time_base
        finally:
            container.close()
        if self.time_base is None:
            raise self.error("the video stream has no time base")
        try:
            if rate is None or rate <= 0:
                n = self.header_frames or self.count_frames()
                self.fps = resolve_fps(rate, n, duration)
                log.warning("%s: fps reads %r; using frames/duration = %d/%.3f = %.3f fps",
                            self.path, rate, n, duration or 0.0, self.fps)
            else:
                self.fps = rate
        except ValueError as e:
            raise self.error(str(e)) from None

    def _open(self) -> Any:
        av = self._av
        try:
            container = _av_open(av, self.path)
        except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError) as e:
            raise self.error(f"unreadable or corrupt file ({type(e).__name__}: {e})") from None
        if not container.streams.video:
            container.close()
            raise self.error("the file has no video stream")
        return container

    def count_frames(self) -> int:
        container = self._open()
        try:
            stream = container.streams.video[0]
            return sum(1 for packet in container.demux(stream) if packet.size > 0)
        except self._av.FFmpegError as e:
            raise self.error(f"cannot read packets ({type(e).__name__}: {e})") from None
        finally:
            container.close()

    def _frame_index(self, frame: Any) -> int | None:
        if frame.pts is None:
            return None
        return int(round(float((frame.pts - self.start_pts) * self.time_base) * self.fps))

    def iter_frames(self, first: int) -> Iterator[tuple[int, FrameGetter]]:
        av = self._av
        seek = first > 0
        while True:
            container = self._open()
            stream = container.streams.video[0]
            index = None
            restart = False
            try:
                if seek:
                    # keyframe at or before half a frame ahead of the target, then decode forward
                    target = self.start_pts + int(math.floor((first - 0.5) / self.fps / self.time_base))
                    container.seek(max(target, self.start_pts), stream=stream, backward=True, any_frame=False)
                for frame in container.decode(stream):
                    if index is None:
                        index = self._frame_index(frame) if seek else 0
                        if index is None or index > first or index < 0:
                            restart = True  # seek unusable here (no pts / overshoot): decode from the start
                            break
                    else:
                        index += 1
                    yield index, _pyav_getter(frame)
            except av.FFmpegError as e:
                if seek and index is None:
                    restart = True
                else:
                    reason = f"decoding failed after frame {index} ({type(e).__name__}: {e})"
                    raise self.error(reason) from None
            finally:
                container.close()
            if not restart:
                return
            log.debug("%s: seek to frame %d unusable, decoding from the start", self.path, first)
            seek = False


def _av_open(av: Any, path: str) -> Any:
    """``av.open(path)`` for reading, tolerant of undecodable metadata on every PyAV version.

    PyAV <= 18 decodes container metadata strictly unless ``metadata_errors="ignore"`` is passed (a file
    with a Latin-1 title would otherwise be unreadable); PyAV >= 19 (the version Python >= 3.12 gets)
    removed that argument and raises ``TypeError`` for it. Try the argument first and open without it
    when this PyAV does not know it; a metadata ``UnicodeDecodeError`` there is reported as an unreadable
    file by the caller.
    """
    try:
        return av.open(path, metadata_errors="ignore")
    except TypeError as e:
        if "metadata_errors" not in str(e):
            raise
    return av.open(path)


def _pyav_getter(frame: Any) -> FrameGetter:
    def get() -> np.ndarray:
        rgb = frame.to_ndarray(format="rgb24")
        rotation = getattr(frame, "rotation", 0) or 0  # counterclockwise degrees of the display matrix
        return _rotate(rgb, -int(round(rotation)))

    return get


class _OpenCVReader(_Reader):
    def __init__(self, path: str, video_id: str) -> None:
        import cv2

        self._cv2 = cv2
        self.path, self.video_id = path, video_id
        cap = self._open()
        try:
            rate = cap.get(cv2.CAP_PROP_FPS)
            count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        finally:
            cap.release()
        self.header_frames = count if count > 0 else None
        if not (rate and math.isfinite(rate) and rate > 0):
            raise self.error(f"fps reads {rate!r} and OpenCV gives no duration to replace it; "
                             "the 'pyav' backend can fall back to frames/duration")
        self.fps = float(rate)

    def _open(self) -> Any:
        cap = self._cv2.VideoCapture(self.path, self._cv2.CAP_FFMPEG)
        if not cap.isOpened():
            cap.release()
            raise self.error("unreadable or corrupt file, or no video stream (OpenCV cannot open it)")
        return cap

    def count_frames(self) -> int:
        cap = self._open()
        try:
            n = 0
            while cap.grab():
                n += 1
            return n
        finally:
            cap.release()

    def iter_frames(self, first: int) -> Iterator[tuple[int, FrameGetter]]:
        cv2 = self._cv2
        cap = self._open()
        try:
            index = 0
            if first > 0:
                cap.set(cv2.CAP_PROP_POS_FRAMES, first)
                if abs(cap.get(cv2.CAP_PROP_POS_FRAMES) - first) < 0.5:
                    index = first
                else:  # seek refused: start again and decode forward
                    cap.release()
                    cap = self._open()
            while cap.grab():
                yield index, _opencv_getter(cap, cv2)
                index += 1
        finally:
            cap.release()


def _opencv_getter(cap: Any, cv2: Any) -> FrameGetter:
    def get() -> np.ndarray:
        ok, bgr = cap.retrieve()
        if not ok or bgr is None:
            raise RuntimeError("OpenCV could not retrieve a grabbed frame")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    return get


_READERS: dict[str, type[_Reader]] = {"pyav": _PyAVReader, "opencv": _OpenCVReader}


def _collect(reader: _Reader, wanted: Iterable[int], size: int, stop_at_last: bool,
             have: dict[int, np.ndarray]) -> int | None:
    """Decode ``wanted`` frames into ``have`` (resized). Returns the true frame count if the stream was
    read to its end, None if it stopped after the last wanted frame."""
    wanted = sorted(set(wanted) - set(have))
    if not wanted:
        return None
    want = set(wanted)
    last_wanted = wanted[-1]
    last_index = -1
    frames = reader.iter_frames(wanted[0])
    try:
        for index, get in frames:
            last_index = index
            if index in want and index not in have:
                try:
                    have[index] = resize_center_crop(get(), size)
                except Exception as e:  # a decoded frame that cannot be converted: unusable video
                    reason = f"frame {index} could not be converted ({type(e).__name__}: {e})"
                    raise reader.error(reason) from None
            if stop_at_last and index >= last_wanted:
                return None
    finally:
        frames.close()  # releases the container now, not at garbage collection
    return last_index + 1


def _sample_frames(reader: _Reader, framerate: float, max_frames: int, size: int,
                   start: float | None, end: float | None,
                   rounding: str = DEFAULT_INDEX_ROUNDING) -> list[np.ndarray]:
    fps = reader.fps
    estimate = reader.header_frames or reader.count_frames()
    if estimate <= 0:
        raise reader.error("no frames: the container holds no video packets")
    try:
        indices = sample_indices(estimate, fps, framerate, max_frames, start, end, rounding)
    except ValueError as e:
        raise reader.error(str(e)) from None
    # Positions depend on the true frame count only when the window reaches the end of the video; then
    # the stream is read to its end (at most stride-1 frames past the last position) to learn the count.
    inside = end is not None and math.floor(end * fps + _EPS) <= estimate - 1
    have: dict[int, np.ndarray] = {}
    count = _collect(reader, indices, size, stop_at_last=inside, have=have)
    if count is not None:
        if count == 0:
            if indices[0] > 0:
                raise reader.error(f"no frames decoded at or after {start} s (the header claims "
                                   f"{estimate} frames at {fps:.3f} fps)")
            raise reader.error("zero frames decoded")
        if count != estimate:
            log.warning("%s: decoded %d frames, the container claims %d; sampling from the decoded count",
                        reader.path, count, estimate)
            try:
                indices = sample_indices(count, fps, framerate, max_frames, start, end, rounding)
            except ValueError as e:
                raise reader.error(str(e)) from None
            missing = [i for i in indices if i not in have]
            if missing:
                _collect(reader, missing, size, stop_at_last=True, have=have)
    lost = [int(i) for i in indices if i not in have]
    if lost:
        raise reader.error(f"frames {lost} could not be decoded")
    return [have[int(i)] for i in indices]


# --------------------------------------------------------------------------------------- public API


def read_frames(path: str | os.PathLike[str], *, framerate: float, max_frames: int, size: int,
                backend: str = DEFAULT_BACKEND, start: float | None = None, end: float | None = None,
                video_id: str | None = None,
                index_rounding: str = DEFAULT_INDEX_ROUNDING) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one clip: frames uint8 (max_frames, 3, size, size) and mask LongTensor (max_frames,).

    Sampling follows :func:`sample_indices` (``framerate`` fps, optional ``[start, end]`` window in
    seconds, ``max_frames`` evenly spaced, ``index_rounding`` "round" or "floor" as the reference); frames
    are RGB, short side resized to ``size`` (bicubic,
    antialiased, as CLIP's PIL preprocessing) and center cropped. Real frames come first with mask 1,
    zero padding after them with mask 0.

    ``backend``: ``"pyav"`` (default) or ``"opencv"``. Chosen with ``scripts/benchmark_data.py`` (8 videos
    of 10 s, 30 fps, 320x240, 12 frames at 1 fps, size 224, 2 DataLoader workers, a shared 2-core machine):
    PyAV decodes 5.60 clips per CPU second, OpenCV 5.35 (wall clock 5.5 vs 5.3-7.7 clips/s, within the
    noise of the other load); PyAV also falls back to frames/duration when fps reads 0 and reports
    decoder errors precisely. Both honour the display rotation, decode sequentially and stop after the
    last needed frame; with a start time they first seek to the keyframe before it. The frame cache
    (:mod:`emcl.data.cache`) read 182 clips/s through the same loader, 558 in process.

    The frame count in the header is not trusted: the stream is decoded to its end whenever the positions
    depend on it, and re-planned if the header was wrong. Raises :class:`VideoError` (naming the path, the
    video id and the reason) for a missing, empty, unreadable or corrupt file, no video stream, zero frames
    decoded, unusable fps, or a window with no frame in it.
    """
    path = os.fspath(path)
    vid = video_id if video_id is not None else os.path.splitext(os.path.basename(path))[0]
    check_backend(backend)
    check_index_rounding(index_rounding)
    if max_frames <= 0 or size <= 0 or not framerate > 0:
        raise ValueError(f"max_frames, size and framerate must be positive (got {max_frames}, {size}, "
                         f"{framerate})")
    _check_file(path, vid)
    reader = _READERS[backend](path, vid)
    kept = _sample_frames(reader, framerate, max_frames, size, start, end, index_rounding)
    frames = np.zeros((max_frames, 3, size, size), dtype=np.uint8)
    for i, frame in enumerate(kept):
        frames[i] = frame
    mask = torch.zeros(max_frames, dtype=torch.long)
    mask[: len(kept)] = 1
    return torch.from_numpy(frames), mask


def _check_file(path: str, video_id: str) -> int:
    """The size in bytes of a video file; raises :class:`VideoError` when it is missing, not a regular
    file, or empty."""
    if not os.path.exists(path):
        raise VideoError("file not found", path=path, video_id=video_id)
    if not os.path.isfile(path):
        raise VideoError("not a regular file", path=path, video_id=video_id)
    size = os.path.getsize(path)
    if size == 0:
        raise VideoError("empty file (0 bytes)", path=path, video_id=video_id)
    return size


# ------------------------------------------------------------------------------------------ probing


@dataclass(frozen=True)
class VideoInfo:
    """What a video's container says about it, read without decoding it (:func:`probe_video`).

    ``fps``: the rate :func:`read_frames` will use (frames / duration when the container's rate reads 0).
    ``frames``: the header's frame count, else duration x fps rounded (None when neither is known).
    ``duration``: seconds (None when unknown). ``bytes``: the file size. ``width`` / ``height``: the
    coded frame size. ``decoded_first_frame``: whether the first frame was decoded to prove the stream.
    """

    path: str
    bytes: int
    duration: float | None
    fps: float
    frames: int | None
    width: int
    height: int
    decoded_first_frame: bool


def _stream_facts(av: Any, container: Any, stream: Any) -> tuple[float | None, int | None, float | None]:
    """(rate, header frame count, duration in seconds) as the container states them; None where absent."""
    rate = float(stream.average_rate) if stream.average_rate else None
    frames = int(stream.frames) if stream.frames and stream.frames > 0 else None
    duration = None
    if stream.duration and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    elif container.duration:
        duration = container.duration / av.time_base
    return rate, frames, duration


def _first_frame_decodes(av: Any, container: Any, stream: Any, error: Callable[[str], VideoError]) -> bool:
    try:
        for _ in container.decode(stream):
            return True
    except av.FFmpegError as e:
        raise error(f"the first frame does not decode ({type(e).__name__}: {e})") from None
    return False


def _count_packets(av: Any, path: str, error: Callable[[str], VideoError]) -> int:
    """Video packets in the file (a pass over the file without decoding, as the reader's fallback)."""
    container = _av_open(av, path)
    try:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size > 0)
    except av.FFmpegError as e:
        raise error(f"cannot read packets ({type(e).__name__}: {e})") from None
    finally:
        container.close()


def probe_video(path: str | os.PathLike[str], *, video_id: str | None = None,
                decode_first: bool = False) -> VideoInfo:
    """Read a video's duration, fps, frame count and frame size from its container, without decoding it.

    Used to check a dataset before training (``python -m emcl.data.check``): milliseconds per file where
    :func:`read_frames` decodes. The first frame is decoded only when the container leaves the rate, the
    frame count or the duration out (or with ``decode_first``). A rate that reads 0 falls back to
    frames / duration exactly as the decoder does. Raises :class:`VideoError` for what would stop
    :func:`read_frames` up front: a missing, empty or unreadable file, no video stream, a stream with no
    frame ("zero-length: ...") and an fps nothing can replace ("zero fps: ..."). Data damaged after the
    header is found only by decoding.
    """
    import av

    path = os.fspath(path)
    vid = video_id if video_id is not None else os.path.splitext(os.path.basename(path))[0]
    size = _check_file(path, vid)

    def error(reason: str) -> VideoError:
        return VideoError(reason, path=path, video_id=vid)

    try:
        container = _av_open(av, path)
    except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError) as e:
        raise error(f"unreadable or corrupt file ({type(e).__name__}: {e})") from None
    try:
        if not container.streams.video:
            raise error("the file has no video stream")
        stream = container.streams.video[0]
        rate, frames, duration = _stream_facts(av, container, stream)
        width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        complete = bool(rate and rate > 0 and frames and duration and duration > 0)
        decoded = (decode_first or not complete) and _first_frame_decodes(av, container, stream, error)
        if (decode_first or not complete) and not decoded:
            raise error("zero-length: no frame decodes")
    finally:
        container.close()
    fps = rate if rate is not None and math.isfinite(rate) and rate > 0 else None
    if fps is None:
        try:
            fps = resolve_fps(rate, frames or _count_packets(av, path, error), duration)
        except ValueError as e:
            raise error(f"zero fps: {e}") from None
    if frames is None and duration:
        frames = int(round(duration * fps))
    return VideoInfo(path, size, duration, float(fps), frames, width, height, bool(decoded))


def find_videos(root: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Walk ``root`` once; map each video's stem and its full file name to the matching paths.

    The files are :func:`emcl.data.videofiles.video_files`' (hidden ones and those without a video ending
    are ignored). A key with several paths is ambiguous (e.g. ``a.mp4`` and ``a.avi``); callers report it.
    """
    found: dict[str, list[str]] = {}
    for full in video_files(root):
        name = os.path.basename(full)
        found.setdefault(os.path.splitext(name)[0], []).append(full)
        found.setdefault(name, []).append(full)
    return found
