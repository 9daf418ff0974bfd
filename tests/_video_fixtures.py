"""Tiny videos written at test time for the video/cache tests (no data files in the repo).

Every frame of an "index video" is one flat colour that encodes its frame index, so a test can read back
which native frames were sampled: red = 16 * (i % 16), green = 16 * (i // 16), blue = 128 (up to 256
frames; codec + colour conversion error is at most 3 levels).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import av
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def index_colour(i: int) -> tuple[int, int, int]:
    return 16 * (i % 16), 16 * (i // 16), 128


def index_frame(i: int, width: int, height: int) -> np.ndarray:
    img = np.empty((height, width, 3), np.uint8)
    img[:] = index_colour(i)
    return img


def write_video(path: str | os.PathLike[str], frames: list[np.ndarray] | int, *, fps: int = 10,
                width: int = 64, height: int = 48, codec: str = "libx264", gop: int | None = None) -> Path:
    """Write RGB frames (or ``n`` index frames) with PyAV; near-lossless so colours survive."""
    path = Path(path)
    if isinstance(frames, int):
        frames = [index_frame(i, width, height) for i in range(frames)]
    height, width = frames[0].shape[:2]
    options = {"crf": "1"} if codec == "libx264" else {}
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if gop is not None:
            stream.codec_context.gop_size = gop
        if codec != "libx264":
            stream.bit_rate = 20_000_000
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_audio_only(path: str | os.PathLike[str]) -> Path:
    """An .mp4 with one AAC audio stream and no video stream."""
    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for k in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 16000
            frame.pts = k * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def frame_indices(frames: torch.Tensor, mask: torch.Tensor) -> list[int]:
    """Decode the frame index of each real frame of an index-video clip."""
    out = []
    for k in range(int(mask.sum())):
        rgb = frames[k].float().mean(dim=(1, 2))
        out.append(int(round(rgb[0].item() / 16)) + 16 * int(round(rgb[1].item() / 16)))
    return out


def load_script(name: str) -> ModuleType:
    """Import ``scripts/{name}.py`` as a module (scripts/ is not a package)."""
    key = f"_emcl_script_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
    return module
