"""Clips read from folders of pre-extracted JPEG frames, the layout of the CLIP2Video reference.

``scripts/extract_frames.py`` (ffmpeg at 5 fps) writes ``{root}/{video_id}/00000001.jpg, 00000002.jpg ...``.
The reference reads such a folder as follows (docs/reference.md, 'EMCL as an inference module'), and so
does :class:`FrameFolderSource`:

1. list the folder and sort the names;
2. keep ``n // sample_fp`` evenly spaced files, ``np.linspace(0, n - 1, n // sample_fp)`` truncated to
   integers (``sample_fp`` is the reference's ``feature_framerate``: 2 keeps every second frame, so 5-fps
   folders are read at 2.5 fps);
3. if more than ``max_frames`` remain, keep ``max_frames`` of them, again ``np.linspace`` truncated;
4. resize the short side to ``size`` (bicubic, antialiased: the numbers of the reference's PIL resize)
   and center crop, then pad with zero frames and mask 0.

Frames are returned as uint8, like :class:`emcl.data.sources.VideoSource`: both offer the
:class:`~emcl.data.sources.ClipSource` interface (``load``), so the evaluation datasets take either. A
missing or empty folder, too few frames or an unreadable JPEG raises :class:`~emcl.data.video.VideoError`
naming the folder, the video id and the reason (the reference prints a warning and evaluates zeros
instead).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from emcl.data.video import VideoError, resize_center_crop

JPEG_SUFFIXES = (".jpg", ".jpeg")


def frame_folder_indices(num_files: int, sample_fp: int, max_frames: int) -> np.ndarray:
    """Which of ``num_files`` sorted frame files the reference reads (positions into the sorted list).

    Empty when ``num_files < sample_fp`` (the reference then has no frame at all).
    """
    if sample_fp < 1 or max_frames < 1:
        raise ValueError(f"sample_fp and max_frames must be >= 1, got {sample_fp}, {max_frames}")
    pre = np.linspace(0, num_files - 1, num=num_files // sample_fp, dtype=int)
    if len(pre) > max_frames:
        pick = np.linspace(0, len(pre) - 1, num=max_frames, dtype=int)
        pre = pre[pick]
    return pre.astype(np.int64)


def read_jpeg(path: str) -> np.ndarray:
    """One JPEG as an HxWx3 uint8 RGB array."""
    from PIL import Image

    with Image.open(path) as img:
        return np.array(img.convert("RGB"))


class FrameFolderSource:
    """Clips from ``{root}/{video_id}/*.jpg`` folders: ``load(video_id, start=None, end=None)``.

    Args:
        root: folder holding one sub-folder of frames per video.
        sample_fp: keep every ``sample_fp``-th file before the final even spacing (the reference's
            ``feature_framerate``; 2 for its 5-fps folders).
        max_frames: frames per clip (12 in the reference).
        size: output side after resize and center crop.
        extract_fps: the rate the folders were extracted at; only used to map a ``[start, end]`` window in
            seconds onto files (file ``k``, counting from 0, shows time ``k / extract_fps``).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        sample_fp: int = 2,
        max_frames: int = 12,
        size: int = 224,
        extract_fps: float = 5.0,
    ) -> None:
        if sample_fp < 1 or max_frames < 1 or size < 1 or not extract_fps > 0:
            raise ValueError(
                f"sample_fp, max_frames, size and extract_fps must be positive, got {sample_fp}, "
                f"{max_frames}, {size}, {extract_fps}"
            )
        self.root = os.fspath(root)
        self.sample_fp = int(sample_fp)
        self.max_frames = int(max_frames)
        self.size = int(size)
        self.extract_fps = float(extract_fps)

    def folder_for(self, video_id: str) -> str:
        return os.path.join(self.root, video_id)

    def frame_files(self, video_id: str) -> list[str]:
        """Sorted JPEG file names of one video's folder."""
        folder = self.folder_for(video_id)
        if not os.path.isdir(folder):
            raise VideoError(
                "frame folder not found (make it with scripts/extract_frames.py)",
                path=folder,
                video_id=video_id,
            )
        names = sorted(
            n for n in os.listdir(folder) if n.lower().endswith(JPEG_SUFFIXES) and not n.startswith(".")
        )
        if not names:
            raise VideoError("frame folder holds no .jpg file", path=folder, video_id=video_id)
        return names

    def load(
        self, video_id: str, start: float | None = None, end: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames uint8 (max_frames, 3, size, size) and mask LongTensor (max_frames,) of one clip."""
        folder = self.folder_for(video_id)
        names = self.frame_files(video_id)
        if start is not None or end is not None:
            first = 0 if start is None else max(0, math.ceil(start * self.extract_fps - 1e-6))
            last = (
                len(names) - 1
                if end is None
                else min(len(names) - 1, math.floor(end * self.extract_fps + 1e-6))
            )
            if first > last:
                raise VideoError(
                    f"window [{start}, {end}] s holds no frame ({len(names)} frames at "
                    f"{self.extract_fps:g} fps)",
                    path=folder,
                    video_id=video_id,
                )
            names = names[first : last + 1]
        picked = frame_folder_indices(len(names), self.sample_fp, self.max_frames)
        if len(picked) == 0:
            raise VideoError(
                f"{len(names)} frame(s): fewer than sample_fp={self.sample_fp}, nothing to read",
                path=folder,
                video_id=video_id,
            )
        frames = np.zeros((self.max_frames, 3, self.size, self.size), dtype=np.uint8)
        for slot, k in enumerate(picked):
            path = os.path.join(folder, names[int(k)])
            try:
                rgb = read_jpeg(path)
            except Exception as error:  # PIL raises several types for broken files
                raise VideoError(
                    f"cannot read {names[int(k)]}: {error}", path=folder, video_id=video_id
                ) from error
            frames[slot] = resize_center_crop(rgb, self.size)
        mask = torch.zeros(self.max_frames, dtype=torch.long)
        mask[: len(picked)] = 1
        return torch.from_numpy(frames), mask

    def __repr__(self) -> str:
        return (
            f"FrameFolderSource({self.root!r}, sample_fp={self.sample_fp}, max_frames={self.max_frames}, "
            f"size={self.size})"
        )
