"""Video decoding, sampling, preprocessing, VideoSource, ClipRandAugment, scripts/compress_videos.py and the
checks of a split's videos before a run (check_videos_exist, SkipBudget, VideoError)."""

from __future__ import annotations

import os
import pickle
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import v2

from emcl.data import video as V
from emcl.data.augment import ClipRandAugment
from emcl.data.sources import VideoSource
from emcl.data.video import VideoError, read_frames, resize_center_crop, sample_indices
from emcl.errors import UserError

try:  # tests/ may or may not be a package
    from tests._video_fixtures import frame_indices, index_colour, load_script, write_audio_only, write_video
except ImportError:
    from _video_fixtures import frame_indices, index_colour, load_script, write_audio_only, write_video

BACKENDS = ["pyav", "opencv"]


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def vids(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Index videos (frame i has colour index_colour(i)) in several containers, plus broken files."""
    d = tmp_path_factory.mktemp("videos")
    out = {
        "mp4": write_video(d / "idx32.mp4", 32),  # 64x48, 10 fps
        "gop5": write_video(d / "idx64_gop5.mp4", 64, gop=5),  # keyframe every 5 frames: real seeks
        "webm": write_video(d / "idx32.webm", 32, codec="libvpx"),  # no frame count in the header
        "mkv": write_video(d / "idx32.mkv", 32),
        "avi": write_video(d / "idx32.avi", 32, codec="mpeg4"),
        "audio": write_audio_only(d / "audio_only.mp4"),
    }
    data = out["mp4"].read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (d / "empty.mp4").write_bytes(b"")
    (d / "garbage.mp4").write_bytes(b"this is not a video\n" * 200)
    out.update(truncated=d / "truncated.mp4", empty=d / "empty.mp4", garbage=d / "garbage.mp4")
    # portrait 48x96: red top third, green middle, blue bottom third
    img = np.zeros((96, 48, 3), np.uint8)
    img[:32, :, 0] = 255
    img[32:64, :, 1] = 255
    img[64:, :, 2] = 255
    out["portrait"] = write_video(d / "portrait.mp4", [img] * 5)
    return out


# ------------------------------------------------------------------------------------ sample_indices


def test_sample_indices_stride_and_rounding() -> None:
    assert sample_indices(100, 30, 10, 100).tolist() == list(range(0, 100, 3))
    assert sample_indices(10, 25, 10, 10).tolist() == [0, 3, 6, 9]  # 2.5 rounds half up to 3
    assert sample_indices(95, 29.97, 1, 12).tolist() == [0, 30, 60, 90]
    assert sample_indices(5, 10, 30, 12).tolist() == [0, 1, 2, 3, 4]  # framerate above fps: stride 1
    assert V.frame_stride(30, 1) == 30 and V.frame_stride(24, 10) == 2


def test_sample_indices_linspace_and_padding() -> None:
    # 7 positions 0,5,..,30; 4 kept: round(linspace(0, 6, 4)) = 0,2,4,6
    assert sample_indices(32, 10, 2, 4).tolist() == [0, 10, 20, 30]
    assert sample_indices(32, 10, 2, 12).tolist() == [0, 5, 10, 15, 20, 25, 30]  # fewer than max: all
    idx = sample_indices(3000, 30, 30, 12)
    assert len(idx) == 12 and idx[0] == 0 and idx[-1] == 2999 and np.all(np.diff(idx) > 0)
    assert idx.dtype == np.int64


def test_sample_indices_window() -> None:
    assert sample_indices(64, 10, 5, 20, start=2.2, end=4.0).tolist() == list(range(22, 41, 2))
    assert sample_indices(64, 10, 5, 20, start=2.0, end=2.0).tolist() == [20]  # frame exactly at start
    assert sample_indices(32, 10, 10, 100, start=2.5, end=99).tolist() == list(range(25, 32))  # end clamps
    assert sample_indices(32, 10, 10, 100, end=1.0).tolist() == list(range(0, 11))
    assert sample_indices(64, 10, 10, 3, start=1.0, end=5.0).tolist() == [10, 30, 50]


def test_sample_indices_floor_rounding_is_the_references() -> None:
    # 7 positions 0,5,..,30, 6 kept: linspace(0, 6, 6) = 0, 1.2, 2.4, 3.6, 4.8, 6
    assert sample_indices(32, 10, 2, 6).tolist() == [0, 5, 10, 20, 25, 30]  # round (default)
    assert sample_indices(32, 10, 2, 6, rounding="floor").tolist() == [0, 5, 10, 15, 20, 30]
    for n, m in [(20, 12), (95, 12), (301, 64), (13, 12), (1000, 7)]:
        # the reference: np.linspace(0, n - 1, num=m, dtype=int)
        want = np.linspace(0, n - 1, num=m, dtype=int).tolist()
        assert sample_indices(n, 1, 1, m, rounding="floor").tolist() == want
        assert sample_indices(n, 1, 1, m).tolist() == np.round(np.linspace(0, n - 1, m)).astype(int).tolist()
    assert sample_indices(20, 1, 1, 12, rounding="floor").tolist() != sample_indices(20, 1, 1, 12).tolist()
    assert sample_indices(5, 1, 1, 12, rounding="floor").tolist() == [0, 1, 2, 3, 4]  # fewer: all
    with pytest.raises(ValueError, match="rounding"):
        sample_indices(20, 1, 1, 12, rounding="ceil")


def test_read_frames_and_video_source_floor_rounding(vids: dict[str, Path]) -> None:
    kw = {"framerate": 2, "max_frames": 6, "size": 32}
    for backend in BACKENDS:
        frames, mask = read_frames(vids["mp4"], backend=backend, index_rounding="floor", **kw)
        assert frame_indices(frames, mask) == [0, 5, 10, 15, 20, 30], backend
    src = VideoSource(str(vids["mp4"].parent), index_rounding="floor", **kw)
    assert frame_indices(*src.load("idx32")) == [0, 5, 10, 15, 20, 30]
    assert "floor" in repr(src) and pickle.loads(pickle.dumps(src)).index_rounding == "floor"
    default = VideoSource(str(vids["mp4"].parent), **kw)
    assert default.index_rounding == "round"
    assert frame_indices(*default.load("idx32")) == [0, 5, 10, 20, 25, 30]
    with pytest.raises(ValueError, match="rounding"):
        VideoSource(str(vids["mp4"].parent), index_rounding="truncate", **kw)
    with pytest.raises(ValueError, match="rounding"):
        read_frames(vids["mp4"], index_rounding="truncate", **kw)


@pytest.mark.parametrize(
    "args, kwargs",
    [
        ((32, 10, 1, 12), {"start": 3.5}),  # window after the last frame
        ((32, 10, 1, 12), {"start": 2.0, "end": 1.0}),  # end before start
        ((0, 10, 1, 12), {}),
        ((32, 0, 1, 12), {}),
        ((32, 10, 0, 12), {}),
        ((32, 10, 1, 0), {}),
    ],
)
def test_sample_indices_rejects(args: tuple, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        sample_indices(*args, **kwargs)


def test_resolve_fps_fallback() -> None:
    assert V.resolve_fps(25.0, None, None) == 25.0
    assert V.resolve_fps(0.0, 100, 4.0) == 25.0  # fps reads 0: frames / duration
    assert V.resolve_fps(None, 100, 4.0) == 25.0
    assert V.resolve_fps(float("nan"), 30, 3.0) == 10.0
    for bad in [(0.0, None, 4.0), (0.0, 100, None), (None, 100, 0.0)]:
        with pytest.raises(ValueError, match="fps"):
            V.resolve_fps(*bad)


def test_resize_center_crop_matches_clip_pil_pipeline() -> None:
    rng = np.random.default_rng(0)
    for h, w, s in [(48, 64, 32), (96, 48, 32), (37, 53, 64), (50, 50, 32)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        clip_pre = T.Compose([T.Resize(s, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(s)])
        ref = np.asarray(clip_pre(Image.fromarray(img))).transpose(2, 0, 1).astype(int)
        out = resize_center_crop(img, s)
        assert out.shape == (3, s, s) and out.dtype == np.uint8
        diff = np.abs(out.astype(int) - ref)
        assert diff.max() <= 1 and diff.mean() < 0.05


# -------------------------------------------------------------------------------------- read_frames


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_frames_shapes_mask_and_sampled_frames(vids: dict[str, Path], backend: str) -> None:
    frames, mask = read_frames(vids["mp4"], framerate=2, max_frames=12, size=32, backend=backend)
    assert frames.shape == (12, 3, 32, 32) and frames.dtype == torch.uint8
    assert mask.dtype == torch.long and mask.tolist() == [1] * 7 + [0] * 5
    assert frame_indices(frames, mask) == [0, 5, 10, 15, 20, 25, 30]
    assert frames[7:].abs().sum() == 0  # padding is zero
    for k, i in enumerate(frame_indices(frames, mask)):  # colours survive decoding and resizing
        expect = torch.tensor(index_colour(i), dtype=torch.float)
        assert (frames[k].float().mean(dim=(1, 2)) - expect).abs().max() <= 4
    frames, mask = read_frames(vids["mp4"], framerate=2, max_frames=4, size=32, backend=backend)
    assert mask.tolist() == [1, 1, 1, 1] and frame_indices(frames, mask) == [0, 10, 20, 30]


def test_backends_agree(vids: dict[str, Path]) -> None:
    for key in ["mp4", "gop5", "webm"]:
        a, ma = read_frames(vids[key], framerate=3, max_frames=8, size=32, backend="pyav")
        b, mb = read_frames(vids[key], framerate=3, max_frames=8, size=32, backend="opencv")
        assert torch.equal(ma, mb)
        assert frame_indices(a, ma) == frame_indices(b, mb)
        assert (a.float() - b.float()).abs().mean() < 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_with_seek(vids: dict[str, Path], backend: str) -> None:
    frames, mask = read_frames(vids["gop5"], framerate=5, max_frames=20, size=32, start=2.2, end=4.0,
                               backend=backend)
    assert frame_indices(frames, mask) == list(range(22, 41, 2))
    frames, mask = read_frames(vids["gop5"], framerate=10, max_frames=64, size=32, start=3.05,
                               backend=backend)
    assert frame_indices(frames, mask) == list(range(31, 64))
    frames, mask = read_frames(vids["gop5"], framerate=10, max_frames=3, size=32, start=1.0, end=5.0,
                               backend=backend)
    assert frame_indices(frames, mask) == [10, 30, 50]
    with pytest.raises(VideoError, match="holds no frame"):
        read_frames(vids["gop5"], framerate=1, max_frames=4, size=32, start=7.0, backend=backend)


@pytest.mark.parametrize("key", ["webm", "mkv", "avi"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_other_containers(vids: dict[str, Path], key: str, backend: str) -> None:
    frames, mask = read_frames(vids[key], framerate=2, max_frames=12, size=32, backend=backend)
    assert frame_indices(frames, mask) == [0, 5, 10, 15, 20, 25, 30]


class _FakeReader(V._Reader):
    """A decoder with a header that may lie: ``header`` frames claimed, ``true`` frames in the stream."""

    def __init__(self, true: int, header: int | None, fps: float = 10.0) -> None:
        self.path, self.video_id, self.fps = "fake.mp4", "fake", fps
        self.true, self.header_frames = true, header
        self.passes = 0

    def count_frames(self) -> int:
        return self.true

    def iter_frames(self, first: int):
        self.passes += 1
        for i in range(first, self.true):
            yield i, (lambda i=i: np.full((16, 16, 3), index_colour(i), np.uint8))


@pytest.mark.parametrize("true, header, passes", [(32, 32, 1), (32, 40, 2), (32, 20, 2), (32, None, 1)])
def test_untrusted_frame_count(true: int, header: int | None, passes: int) -> None:
    reader = _FakeReader(true, header)
    kept = V._sample_frames(reader, framerate=10, max_frames=8, size=8, start=None, end=None)
    frames = torch.from_numpy(np.stack(kept))
    assert frame_indices(frames, torch.ones(len(kept))) == sample_indices(true, 10, 10, 8).tolist()
    assert reader.passes == passes  # a second pass only when the header was wrong


def test_untrusted_frame_count_with_window_stops_early() -> None:
    reader = _FakeReader(true=100, header=100)
    kept = V._sample_frames(reader, framerate=10, max_frames=4, size=8, start=1.0, end=3.0)
    assert frame_indices(torch.from_numpy(np.stack(kept)), torch.ones(4)) == [10, 17, 23, 30]
    reader = _FakeReader(true=25, header=100)  # window inside the claimed length, stream shorter
    kept = V._sample_frames(reader, framerate=10, max_frames=40, size=8, start=1.0, end=3.0)
    assert frame_indices(torch.from_numpy(np.stack(kept)), torch.ones(len(kept))) == list(range(10, 25))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "key, reason",
    [("missing", "not found"), ("empty", "empty"), ("truncated", "unreadable|corrupt"),
     ("garbage", "unreadable|corrupt"), ("audio", "no video stream")],
)
def test_errors_name_path_and_id(vids: dict[str, Path], tmp_path: Path, backend: str, key: str,
                                 reason: str) -> None:
    path = tmp_path / "nothing_here.mp4" if key == "missing" else vids[key]
    with pytest.raises(VideoError, match=reason) as info:
        read_frames(path, framerate=1, max_frames=4, size=32, backend=backend, video_id=f"rec_{key}")
    err = info.value
    assert str(path) in str(err) and f"rec_{key}" in str(err)
    assert err.path == str(path) and err.video_id == f"rec_{key}"


def test_video_id_defaults_to_stem_and_error_pickles(tmp_path: Path) -> None:
    with pytest.raises(VideoError) as info:
        read_frames(tmp_path / "video7.mp4", framerate=1, max_frames=4, size=32)
    assert info.value.video_id == "video7"
    again = pickle.loads(pickle.dumps(info.value))
    assert (again.path, again.video_id, str(again)) == (info.value.path, "video7", str(info.value))
    assert str(VideoError("just a message")) == "just a message"  # DataLoader re-raise form
    with pytest.raises(ValueError, match="backend"):
        read_frames(tmp_path / "video7.mp4", framerate=1, max_frames=4, size=32, backend="nope")


@pytest.mark.parametrize("backend", BACKENDS)
def test_portrait_is_center_cropped_not_squashed(vids: dict[str, Path], backend: str) -> None:
    frames, mask = read_frames(vids["portrait"], framerate=10, max_frames=2, size=32, backend=backend)
    rgb = frames[0].float().mean(dim=2)  # (3, 32) per-row colour
    # resize 48x96 -> 32x64, crop rows 16..48: red rows 0..5, green 5..27, blue 27..32 of the crop
    # (a squashed 32x32 would be red up to row 10 and blue from row 21)
    assert rgb[:, 1].argmax() == 0 and rgb[:, 30].argmax() == 2
    for row in (8, 16, 24):
        assert rgb[:, row].argmax() == 1 and rgb[1, row] > 200


def test_display_rotation_applied_by_both_backends(vids: dict[str, Path], tmp_path: Path) -> None:
    compress = load_script("compress_videos")
    img = np.zeros((48, 64, 3), np.uint8)
    img[:, :16, 0] = 255  # red left quarter
    img[:, 16:, 1] = 255
    src = write_video(tmp_path / "landscape.mp4", [img] * 3)
    rotated = tmp_path / "rotated.mp4"
    subprocess.run([compress.ffmpeg_exe(), "-y", "-loglevel", "error", "-display_rotation", "90",
                    "-i", str(src), "-c", "copy", str(rotated)], check=True)
    with av.open(str(rotated)) as c:
        if next(c.decode(video=0)).rotation == 0:
            pytest.skip("this ffmpeg did not store a display rotation")
    a, _ = read_frames(rotated, framerate=10, max_frames=1, size=48, backend="pyav")
    b, _ = read_frames(rotated, framerate=10, max_frames=1, size=48, backend="opencv")
    assert (a.float() - b.float()).abs().mean() < 1.0
    # 90 degrees counterclockwise: the red left quarter ends at the bottom
    assert a[0, 0, -4:].float().mean() > 200 and a[0, 0, :4].float().mean() < 50


class _Proxy:
    """Wraps a PyAV object, overriding some attributes (PyAV's own are read-only)."""

    def __init__(self, inner: object, **override: object) -> None:
        self._inner, self._override = inner, override

    def __getattr__(self, name: str) -> object:
        return self._override[name] if name in self._override else getattr(self._inner, name)


def _zero_fps_open(real_open, duration_known: bool):
    """av.open whose video stream reports fps 0 (and optionally no duration), as files without moov
    timing do in the wild."""

    def fake_open(*args, **kwargs):
        container = real_open(*args, **kwargs)
        stream = container.streams.video[0]
        fake_stream = _Proxy(stream, average_rate=None, duration=stream.duration if duration_known else None)
        unwrap = lambda s: stream if s is fake_stream else s  # noqa: E731
        streams = _Proxy(container.streams, video=[fake_stream])
        return _Proxy(
            container, streams=streams, duration=container.duration if duration_known else None,
            decode=lambda s=None, **kw: container.decode(unwrap(s), **kw),
            demux=lambda s=None, **kw: container.demux(unwrap(s), **kw),
            seek=lambda offset, stream=None, **kw: container.seek(offset, stream=unwrap(stream), **kw),
        )

    return fake_open


def test_zero_fps_falls_back_to_frames_over_duration(vids: dict[str, Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = av.open
    monkeypatch.setattr(av, "open", _zero_fps_open(real_open, duration_known=True))
    frames, mask = read_frames(vids["mp4"], framerate=2, max_frames=12, size=32)  # 32 frames / 3.2 s
    assert frame_indices(frames, mask) == [0, 5, 10, 15, 20, 25, 30]
    monkeypatch.setattr(av, "open", _zero_fps_open(real_open, duration_known=False))
    with pytest.raises(VideoError, match="fps reads") as info:
        read_frames(vids["mp4"], framerate=2, max_frames=12, size=32, video_id="nofps")
    assert info.value.video_id == "nofps" and str(vids["mp4"]) in str(info.value)


def test_pyav_19_open_without_metadata_errors(vids: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """PyAV >= 19 (Python >= 3.12) has no ``metadata_errors`` in ``av.open``: decoding must still work."""
    real_open = av.open
    calls = []

    def av19_open(file, mode=None, **kwargs):
        if "metadata_errors" in kwargs:
            raise TypeError("open() got an unexpected keyword argument 'metadata_errors'")
        calls.append(kwargs)
        return real_open(file, mode, **kwargs) if mode else real_open(file, **kwargs)

    monkeypatch.setattr(av, "open", av19_open)
    frames, mask = read_frames(vids["mp4"], framerate=2, max_frames=12, size=32)
    assert frame_indices(frames, mask) == [0, 5, 10, 15, 20, 25, 30]
    frames, mask = read_frames(vids["gop5"], framerate=10, max_frames=3, size=32, start=2.0, end=4.0)
    assert frame_indices(frames, mask) == [20, 30, 40]  # with a seek
    assert calls  # the emulated PyAV 19 really opened the files

    def broken_open(file, mode=None, **kwargs):  # a TypeError about something else is not swallowed
        raise TypeError("expected str, bytes or os.PathLike object")

    monkeypatch.setattr(av, "open", broken_open)
    with pytest.raises(TypeError, match="PathLike"):
        read_frames(vids["mp4"], framerate=2, max_frames=12, size=32)


# -------------------------------------------------------------------------------------- VideoSource


def test_video_source_mp4_and_any_extension(vids: dict[str, Path], tmp_path: Path) -> None:
    src = VideoSource(str(vids["mp4"].parent), framerate=2, max_frames=12, size=32)
    frames, mask = src.load("idx32")
    assert frame_indices(frames, mask) == [0, 5, 10, 15, 20, 25, 30]
    with pytest.raises(VideoError, match="not found") as info:
        src.load("idx64")  # only .mp4 without any_extension
    assert info.value.video_id == "idx64"

    root = tmp_path / "msvd"
    (root / "sub").mkdir(parents=True)
    os.link(vids["avi"], root / "clipA.avi")
    os.link(vids["webm"], root / "sub" / "clipB.webm")
    os.link(vids["mkv"], root / "clipC.mkv")
    (root / "clipA.txt").write_text("not a video")
    any_src = VideoSource(str(root), framerate=2, max_frames=12, size=32, any_extension=True)
    for vid in ["clipA", "clipB", "clipC"]:
        frames, mask = any_src.load(vid)
        assert frame_indices(frames, mask) == [0, 5, 10, 15, 20, 25, 30], vid
    assert any_src.path_for("clipB").endswith("sub/clipB.webm")
    with pytest.raises(VideoError, match="not found"):
        any_src.load("clipZ")
    os.link(vids["mp4"], root / "clipC.mp4")
    fresh = VideoSource(str(root), framerate=2, max_frames=12, size=32, any_extension=True)
    with pytest.raises(VideoError, match="ambiguous"):
        fresh.load("clipC")

    clone = pickle.loads(pickle.dumps(any_src))
    assert torch.equal(clone.load("clipA")[0], any_src.load("clipA")[0])


def test_video_source_arguments() -> None:
    with pytest.raises(ValueError):
        VideoSource(None, framerate=1, max_frames=4, size=32)
    with pytest.raises(ValueError, match="backend"):
        VideoSource("/tmp", framerate=1, max_frames=4, size=32, backend="ffmpeg")


# ---------------------------------------------------------------------------------- ClipRandAugment


def test_clip_rand_augment_same_ops_for_every_frame() -> None:
    torch.manual_seed(0)
    frame = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    clip = torch.cat([frame.repeat(5, 1, 1, 1), torch.zeros(3, 3, 32, 32, dtype=torch.uint8)])
    mask = torch.tensor([1] * 5 + [0] * 3)
    aug = ClipRandAugment(num_ops=4, magnitude=7)
    changed = 0
    for _ in range(25):
        for out in (aug(clip, mask), aug(clip)):
            assert out.shape == clip.shape and out.dtype == torch.uint8
            assert all(torch.equal(out[0], out[i]) for i in range(1, 5))  # identical in, identical out
            assert out[5:].abs().sum() == 0  # padding stays zero
            changed += int(not torch.equal(out[0], frame[0]))
    assert changed > 10
    assert torch.equal(clip[:5], frame.repeat(5, 1, 1, 1))  # input untouched
    with pytest.raises(ValueError):
        aug(clip.float())


def test_clip_rand_augment_matches_torchvision_without_noise() -> None:
    ours = ClipRandAugment(num_ops=4, magnitude=7, magnitude_std=0, max_magnitude=30, interpolation="nearest")
    ref = v2.RandAugment(num_ops=4, magnitude=7)
    gen = torch.Generator().manual_seed(1)
    clip = torch.randint(0, 256, (3, 3, 24, 24), dtype=torch.uint8, generator=gen)
    for seed in range(10):
        torch.manual_seed(seed)
        a = ours(clip)
        torch.manual_seed(seed)
        b = ref(clip)
        # same ops and magnitudes: equal up to float rounding of a few pixels (a different op: tens)
        assert (a.float() - b.float()).abs().mean() < 0.1


def test_clip_rand_augment_passes_interpolation_enum(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision 0.26 rejects ``interpolation="bilinear"`` (a string) with a ValueError."""

    class StrictRandAugment(v2.RandAugment):  # torchvision 0.26's behaviour
        def __init__(self, *args, interpolation=T.InterpolationMode.NEAREST, **kwargs):
            if not isinstance(interpolation, T.InterpolationMode):
                raise ValueError(f"interpolation must be an InterpolationMode, got {interpolation!r}")
            super().__init__(*args, interpolation=interpolation, **kwargs)

    monkeypatch.setattr(v2, "RandAugment", StrictRandAugment)
    gen = torch.Generator().manual_seed(0)
    clip = torch.randint(0, 256, (3, 3, 24, 24), dtype=torch.uint8, generator=gen)
    for kwargs in ({}, {"interpolation": "bilinear"}, {"interpolation": T.InterpolationMode.NEAREST}):
        aug = ClipRandAugment(**kwargs)
        assert isinstance(aug._op.interpolation, T.InterpolationMode)
        assert aug(clip).shape == clip.shape
    assert ClipRandAugment()._op.interpolation == T.InterpolationMode.BILINEAR
    with pytest.raises(ValueError, match="interpolation"):
        ClipRandAugment(interpolation="bilinearr")


# --------------------------------------------------------------------------------- compress_videos


def test_compress_videos(vids: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    compress = load_script("compress_videos")
    src, dst = tmp_path / "in", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    write_video(src / "land.mp4", 20, fps=10, width=96, height=64)
    os.link(vids["portrait"], src / "sub" / "port.mp4")
    assert compress.main(["--input_root", str(src), "--output_root", str(dst), "--size", "32",
                          "--workers", "2", "--no_progress"]) == 0
    expect = {"land.mp4": (48, 32), "sub/port.mp4": (32, 64)}  # (width, height): short side 32, aspect kept
    for rel, (w, h) in expect.items():
        with av.open(str(dst / rel)) as c:
            stream = c.streams.video[0]
            assert (stream.width, stream.height) == (w, h), rel
            assert abs(float(stream.average_rate) - 3) < 0.1
            assert len(c.streams.audio) == 0
            if rel == "land.mp4":  # 2 s at 3 fps
                assert sum(1 for _ in c.decode(stream)) in (6, 7)
    mtimes = {rel: (dst / rel).stat().st_mtime_ns for rel in expect}
    capsys.readouterr()
    assert compress.main(["--input_root", str(src), "--output_root", str(dst), "--size", "32",
                          "--no_progress"]) == 0
    assert "skipped 2" in capsys.readouterr().out
    assert {rel: (dst / rel).stat().st_mtime_ns for rel in expect} == mtimes
    assert not list(dst.rglob(".*partial*"))

    (src / "broken.mp4").write_bytes(b"junk" * 10)
    assert compress.main(["--input_root", str(src), "--output_root", str(dst), "--size", "32",
                          "--no_progress"]) == 1
    err = capsys.readouterr().err
    assert "broken.mp4" in err and "1 videos failed" in err
    assert not (dst / "broken.mp4").exists()


# ------------------------------------------------------------------------------------------ video checks
def test_check_videos_exist_is_a_stat(tmp_path):
    from emcl.data.sources import VideoSource, check_videos_exist, missing_videos

    vdir = tmp_path / "videos"
    vdir.mkdir()
    for i in range(8):
        (vdir / f"v{i}.mp4").write_bytes(b"not decoded, only stat'ed")
    check_videos_exist(vdir, [f"v{i}" for i in range(8)], "msrvtt/test")
    (vdir / "v3.mp4").unlink()
    (vdir / "v5.mp4").write_bytes(b"")
    (vdir / "v6.mp4").unlink()
    (vdir / "v6.mp4").mkdir()
    ids = [f"v{i}" for i in range(8)]
    assert missing_videos(vdir, ids) == {"v3": "missing", "v5": "empty (0 bytes)", "v6": "not a regular file"}
    with pytest.raises(UserError) as e:
        check_videos_exist(vdir, ids, "msrvtt/test", show=2)
    assert str(e.value) == (f"msrvtt/test: 3 of 8 videos cannot be used (looked in folder {vdir}): "
                            "v3 (missing); v5 (empty (0 bytes)); and 1 more")
    with pytest.raises(UserError, match=f"video folder {tmp_path / 'nope'} does not exist \\(8 videos"):
        check_videos_exist(tmp_path / "nope", ids, "msrvtt/test")
    # MSVD: any extension, found by stem
    (vdir / "clip.avi").write_bytes(b"x")
    src = VideoSource(str(vdir), framerate=1, max_frames=2, size=8, any_extension=True)
    check_videos_exist(src, ["clip", "v0"], "msvd/train")
    with pytest.raises(UserError, match="1 of 2 videos.*ghost \\(file not found"):
        check_videos_exist(src, ["clip", "ghost"], "msvd/train")


def test_check_videos_exist_in_a_frame_cache(tmp_path):
    try:  # tests/ may or may not be a package
        from tests._video_fixtures import write_video
    except ImportError:
        from _video_fixtures import write_video

    from emcl.data.cache import build_cache
    from emcl.data.sources import VideoSource, check_videos_exist

    vdir = tmp_path / "videos"
    vdir.mkdir()
    write_video(vdir / "a.mp4", 4, width=16, height=16)
    (vdir / "b.mp4").write_bytes(b"garbage")
    store = tmp_path / "f.h5"
    build_cache(vdir, store, max_frames=2, framerate=2.0, size=8, progress=False, workers=0,
                skip_bad_videos=True)
    (vdir / "a.mp4").unlink()  # with a cache the folder is not looked at
    src = VideoSource(str(vdir), framerate=2.0, max_frames=2, size=8, frame_cache=str(store))
    check_videos_exist(src, ["a"], "msvd/test")
    with pytest.raises(UserError) as e:
        check_videos_exist(src, ["a", "b", "c"], "msvd/test")
    msg = str(e.value)
    assert f"2 of 3 videos cannot be used (looked in frame cache {store})" in msg
    assert "b (recorded as undecodable" in msg and "c (not in the frame cache)" in msg


def test_skip_budget():
    from emcl.data.sources import SkipBudget

    budget = SkipBudget(40, 0.05, "msvd/train")  # 2 of 40 allowed
    budget.add(["v1"])
    budget.add(["v1", "v2"])  # a video counts once
    assert budget.count == 2 and budget.limit == 2
    with pytest.raises(UserError) as e:
        budget.add(["v3"])
    assert str(e.value).startswith("msvd/train: 3 of 40 videos (7.5%) are unreadable, more than "
                                   "--max_skip_fraction 0.05 allows (2): v1, v2, v3.")
    with pytest.raises(UserError, match="1 of 10 videos"):
        SkipBudget(10, 0.0).add(["x"])
    SkipBudget(10, 1.0).add([str(i) for i in range(10)])
    with pytest.raises(ValueError):
        SkipBudget(10, 1.5)


def test_video_error_is_a_one_line_user_error_also_from_a_worker():
    from emcl.data.video import VideoError

    e = VideoError("unreadable", path="/d/v.mp4", video_id="v")
    assert isinstance(e, UserError) and isinstance(e, RuntimeError)
    worker = ("Caught VideoError in DataLoader worker process 0.\n"
              "Original Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
              "emcl.data.video.VideoError: video 'v' (/d/v.mp4): unreadable\n")
    w = VideoError(worker)
    assert str(w) == "video 'v' (/d/v.mp4): unreadable (in a DataLoader worker)"
    assert w.worker_traceback == worker
