"""The embeddings the inference module scores, from files, a CLIP2Video checkpoint or an EMCL-Net checkpoint.

Everything ends up as one :class:`Embeddings`: text vectors (A, D), video vectors (V, D) or per-frame
video features (V, T, D) with a frame mask, the caption→video mapping, and optionally a second,
blocking-independent pair of vectors (CLIP2Video's TAB) fused with ``center_weight``.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from emcl import dist
from emcl.errors import UserError
from emcl.fileio import save_bytes

if TYPE_CHECKING:
    from emcl.data.sources import ClipSource

log = logging.getLogger("emcl.inference")

H5_SUFFIXES = (".h5", ".hdf5", ".hdf")


@dataclass
class Embeddings:
    """What the scores are computed from (float32, on one device).

    ``pooling``: ``pooled`` (``video`` is (V, D); EMCL on [video rows; text rows] of a block, dot product
    on Y, docs/reference.md, 'EMCL as an inference module') or ``text`` (``video`` is (V, T, D) per
    frame with ``frame_mask``; EMCL-Net's text-conditioned pooling at temperature ``temp`` and EMCL on
    [pair vectors; texts], cosine, docs/reference.md, 'EMCL-Net').
    ``tab_text`` / ``tab_video``: a second score ``g_t . g_v`` added as
    ``center_weight * main + (1 - center_weight) * tab`` (CLIP2Video's TAB).
    """

    text: torch.Tensor
    video: torch.Tensor
    caption_video: torch.Tensor
    pooling: str = "pooled"
    frame_mask: torch.Tensor | None = None
    tab_text: torch.Tensor | None = None
    tab_video: torch.Tensor | None = None
    center_weight: float = 1.0
    temp: float = 3.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_texts(self) -> int:
        return int(self.text.shape[0])

    @property
    def num_videos(self) -> int:
        return int(self.video.shape[0])


# ------------------------------------------------------------------------------------------- files
def _split_spec(spec: str) -> tuple[Path, str | None]:
    """``file.h5:dataset`` -> (file, dataset); anything else -> (path, None)."""
    head, sep, key = spec.rpartition(":")
    if sep and head.lower().endswith(H5_SUFFIXES + (".npz",)):
        return Path(head), key or None
    return Path(spec), None


def _h5_datasets(group, prefix: str = "") -> list[str]:
    import h5py

    out = []
    for name, item in group.items():
        if isinstance(item, h5py.Dataset):
            out.append(prefix + name)
        elif isinstance(item, h5py.Group):
            out.extend(_h5_datasets(item, prefix + name + "/"))
    return out


def read_array(spec: str, what: str) -> np.ndarray:
    """An array from ``.npy``, ``.npz[:key]``, ``.h5/.hdf5[:dataset]``, or a text file (one number a line,
    ``.txt`` / ``.csv``) or ``.json`` list; errors name the flag's file."""
    path, key = _split_spec(spec)
    if not path.is_file():
        raise UserError(f"{what}: file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                names = list(z.keys())
                if key is None and len(names) != 1:
                    raise UserError(f"{what}: {path} holds arrays {names}; name one as {path}:NAME")
                name = key or names[0]
                if name not in names:
                    raise UserError(f"{what}: {path} has no array {name!r} (has {names})")
                return z[name]
        if suffix in H5_SUFFIXES:
            import h5py

            with h5py.File(path, "r") as fh:
                names = _h5_datasets(fh)
                if key is None and len(names) != 1:
                    raise UserError(f"{what}: {path} holds datasets {names[:20]}; name one as {path}:NAME")
                name = key or names[0]
                if name not in fh or not hasattr(fh[name], "shape"):
                    raise UserError(f"{what}: {path} has no dataset {name!r} (has {names[:20]})")
                return fh[name][()]
        if suffix == ".json":
            import json

            with open(path) as fh:
                return np.asarray(json.load(fh))
        if suffix in (".txt", ".csv", ".tsv", ""):
            with open(path) as fh:
                rows = [line.strip().split(",")[0].split("\t")[0] for line in fh if line.strip()]
            return np.asarray([float(r) if "." in r or "e" in r.lower() else int(r) for r in rows])
    except UserError:
        raise
    except Exception as error:
        raise UserError(f"{what}: cannot read {path}: {error}") from error
    raise UserError(f"{what}: {path}: unknown format {suffix!r} (use .npy, .npz, .h5/.hdf5, .txt or .json)")


def _float_tensor(arr: np.ndarray, what: str, spec: str, ndims: tuple[int, ...]) -> torch.Tensor:
    if arr.ndim not in ndims or not np.issubdtype(arr.dtype, np.number):
        want = " or ".join(f"{n}-D" for n in ndims)
        raise UserError(
            f"{what} {spec}: expected a {want} numeric array, got shape {arr.shape} ({arr.dtype})"
        )
    if arr.shape[0] == 0 or arr.shape[-1] == 0:
        raise UserError(f"{what} {spec}: empty array of shape {arr.shape}")
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        row = int(bad.reshape(x.shape[0], -1).any(dim=1).nonzero()[0])
        raise UserError(f"{what} {spec}: row {row} has a non-finite value ({int(bad.sum())} in all)")
    return x


def _first(indices: list[int], n: int = 10) -> str:
    """``3, 7, 9`` or ``0, 1, ..., 9 and 5 more``."""
    return ", ".join(map(str, indices[:n])) + (f" and {len(indices) - n} more" if len(indices) > n else "")


def check_zero_rows(x: torch.Tensor, what: str, spec: str, keep: bool, info: dict[str, Any]) -> None:
    """All-zero rows of a (rows, D) embedding: an error naming the file and the first rows, or, with
    ``--keep_zero_rows``, a warning and their count in ``info["zero_rows"]`` (``metrics.json``).

    A zero vector scores the same against every candidate: a tie, which the metrics rank as a hit, so such
    rows would raise R@K without saying so (a failed or padded export is the usual cause)."""
    rows = (x == 0).all(dim=1).nonzero().flatten().tolist()
    if not rows:
        return
    listed = _first(rows)
    if not keep:
        raise UserError(
            f"{what} {spec}: {len(rows)} of {x.shape[0]} rows are all zero (row {listed}); a zero vector "
            "ties with every candidate and the tie counts as a hit. Fix the export, or pass --keep_zero_rows "
            "to score them anyway"
        )
    log.warning("%s %s: %d all-zero row(s) kept (--keep_zero_rows): row %s", what, spec, len(rows), listed)
    info.setdefault("zero_rows", {})[what.lstrip("-")] = len(rows)


def read_caption_video(spec: str | None, num_texts: int, num_videos: int) -> torch.Tensor:
    """The caption→video index array (A,), or the diagonal when ``spec`` is None (needs A == V)."""
    if spec is None:
        if num_texts != num_videos:
            raise UserError(
                f"{num_texts} text embeddings but {num_videos} video embeddings: give "
                "--caption_video (the video index of every caption) for a multi-caption set"
            )
        return torch.arange(num_texts)
    arr = read_array(spec, "--caption_video").reshape(-1)
    if not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.mod(arr, 1) == 0):
            arr = arr.astype(np.int64)
        else:
            raise UserError(f"--caption_video {spec}: expected integer video indices, got {arr.dtype}")
    if arr.shape[0] != num_texts:
        raise UserError(f"--caption_video {spec}: {arr.shape[0]} entries for {num_texts} text embeddings")
    bad = np.nonzero((arr < 0) | (arr >= num_videos))[0]
    if len(bad):
        raise UserError(
            f"--caption_video {spec}: entry {bad[0]} is {arr[bad[0]]}, outside 0..{num_videos - 1}"
        )
    counts = np.bincount(arr, minlength=num_videos)
    if (counts == 0).any():
        v = int(np.nonzero(counts == 0)[0][0])
        raise UserError(
            f"--caption_video {spec}: video {v} (and {int((counts == 0).sum()) - 1} more) has no "
            "caption; drop such videos from --video_emb"
        )
    return torch.from_numpy(arr.astype(np.int64))


def frame_mask_of(frames: torch.Tensor) -> torch.Tensor:
    """Padding convention of per-frame files: an all-zero frame vector is padding (mask 0)."""
    return (frames.abs().sum(dim=-1) > 0).long()


def mean_pool(frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CLIP2Video / CLIP4Clip mean pooling: L2-normalise each frame, masked mean, L2-normalise."""
    f = F.normalize(frames.float(), dim=-1) * mask[..., None].float()
    total = mask.float().sum(dim=1, keepdim=True).clamp_min(1.0)
    return F.normalize(f.sum(dim=1) / total, dim=-1)


def from_files(cfg: argparse.Namespace) -> Embeddings:
    """``--text_emb``, ``--video_emb`` (pooled (V, D) or per frame (V, T, D)), ``--caption_video`` and the
    optional ``--tab_text_emb`` / ``--tab_video_emb`` pair."""
    if not cfg.video_emb:
        raise UserError("--text_emb needs --video_emb")
    t = _float_tensor(read_array(cfg.text_emb, "--text_emb"), "--text_emb", cfg.text_emb, (2,))
    v = _float_tensor(read_array(cfg.video_emb, "--video_emb"), "--video_emb", cfg.video_emb, (2, 3))
    if t.shape[-1] != v.shape[-1]:
        raise UserError(
            f"--text_emb {cfg.text_emb} is {t.shape[-1]}-d but --video_emb {cfg.video_emb} is {v.shape[-1]}-d"
        )
    cv = read_caption_video(cfg.caption_video, t.shape[0], v.shape[0])
    emb = Embeddings(
        t,
        v,
        cv,
        info={
            "source": "files",
            "text_emb": cfg.text_emb,
            "video_emb": cfg.video_emb,
            "caption_video": cfg.caption_video,
        },
    )
    keep = bool(getattr(cfg, "keep_zero_rows", False))
    check_zero_rows(t, "--text_emb", cfg.text_emb, keep, emb.info)
    if v.dim() == 2:
        check_zero_rows(v, "--video_emb", cfg.video_emb, keep, emb.info)
    if v.dim() == 3:
        emb.frame_mask = frame_mask_of(v)
        empty = (emb.frame_mask.sum(dim=1) == 0).nonzero().flatten().tolist()
        if empty:
            raise UserError(f"--video_emb {cfg.video_emb}: {len(empty)} of {v.shape[0]} videos have only "
                            f"all-zero (padding) frames (video {_first(empty)})")
        emb.pooling = "text" if cfg.frame_pooling == "text" else "pooled"  # default for files: mean
        emb.info["frames"] = int(v.shape[1])
    if bool(cfg.tab_text_emb) != bool(cfg.tab_video_emb):
        raise UserError("--tab_text_emb and --tab_video_emb go together")
    if cfg.tab_text_emb:
        emb.tab_text, emb.tab_video = _tab_pair(cfg, t, v, keep, emb.info)
        emb.center_weight = cfg.center_weight
    return emb


def _tab_pair(cfg: argparse.Namespace, t: torch.Tensor, v: torch.Tensor, keep: bool,
              info: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``--tab_text_emb`` / ``--tab_video_emb``: one vector per text and per video of ``t`` and ``v``."""
    gt = _float_tensor(
        read_array(cfg.tab_text_emb, "--tab_text_emb"), "--tab_text_emb", cfg.tab_text_emb, (2,)
    )
    gv = _float_tensor(
        read_array(cfg.tab_video_emb, "--tab_video_emb"), "--tab_video_emb", cfg.tab_video_emb, (2,)
    )
    if gt.shape[0] != t.shape[0] or gv.shape[0] != v.shape[0] or gt.shape[1] != gv.shape[1]:
        raise UserError(
            f"--tab_text_emb {tuple(gt.shape)} / --tab_video_emb {tuple(gv.shape)} do not match "
            f"{t.shape[0]} texts and {v.shape[0]} videos"
        )
    check_zero_rows(gt, "--tab_text_emb", cfg.tab_text_emb, keep, info)
    check_zero_rows(gv, "--tab_video_emb", cfg.tab_video_emb, keep, info)
    return gt, gv


def prepare(emb: Embeddings, normalize: bool, device: torch.device, temp: float | None = None) -> Embeddings:
    """Pool per-frame features when asked, L2-normalise pooled vectors (``normalize``), move to ``device``.

    ``temp``: frame-pooling temperature of the ``text`` pooling (None: keep the checkpoint's)."""
    if emb.video.dim() == 3 and emb.pooling == "pooled":
        emb.video, emb.frame_mask = mean_pool(emb.video, emb.frame_mask), None
        emb.info["frame_pooling"] = "mean (normalised frames, masked mean, normalised)"
    elif emb.pooling == "text":
        emb.temp = emb.temp if temp is None else temp
        emb.info["frame_pooling"] = (
            f"text-conditioned softmax over frames, temperature {emb.temp:g} (EMCL-Net)"
        )
    if normalize and emb.pooling == "pooled":
        emb.text, emb.video = F.normalize(emb.text, dim=-1), F.normalize(emb.video, dim=-1)
        if emb.tab_text is not None:
            emb.tab_text, emb.tab_video = (
                F.normalize(emb.tab_text, dim=-1),
                F.normalize(emb.tab_video, dim=-1),
            )
    for name in ("text", "video", "caption_video", "frame_mask", "tab_text", "tab_video"):
        x = getattr(emb, name)
        if x is not None:
            setattr(emb, name, x.to(device))
    return emb


def save_embeddings(emb: Embeddings, out: Path) -> list[str]:
    """The embeddings as .npy files in ``out`` (atomic), ready for ``--text_emb/--video_emb`` runs."""
    import io

    video = emb.video
    if emb.frame_mask is not None:  # padded frames saved as zeros: the per-frame file convention
        video = video * emb.frame_mask[..., None].to(video.dtype)
    files = {"text_emb.npy": emb.text, "video_emb.npy": video, "caption_video.npy": emb.caption_video}
    if emb.frame_mask is not None:
        files["frame_mask.npy"] = emb.frame_mask
    if emb.tab_text is not None:
        files["tab_text_emb.npy"] = emb.tab_text
        files["tab_video_emb.npy"] = emb.tab_video
    for name, x in files.items():
        buf = io.BytesIO()
        np.save(buf, x.detach().cpu().numpy())
        save_bytes(buf.getvalue(), out / name)
    return sorted(files)


# ------------------------------------------------------------------------------------ checkpoints
def _drop_invalid(emb: Embeddings, ok: torch.Tensor, video_ids: list[str], cfg: argparse.Namespace,
                  what: str) -> Embeddings:
    """Leave unreadable videos (only with --skip_bad_videos) and their captions out, and say so; more than
    ``--max_skip_fraction`` of the split's videos stops the run, as in the trainers."""
    bad = (~ok).nonzero().flatten().tolist()
    if not bad:
        return emb
    log.warning(
        "%d unreadable video(s) left out of evaluation: %s",
        len(bad),
        ", ".join(video_ids[i] for i in bad[:20]),
    )
    from emcl.data.sources import SkipBudget

    SkipBudget(len(video_ids), cfg.max_skip_fraction, what).add(sorted(video_ids[i] for i in bad))
    keep_v = ok.nonzero().flatten()
    new_index = torch.full(ok.shape, -1, dtype=torch.long, device=ok.device)
    new_index[keep_v] = torch.arange(len(keep_v), device=ok.device)
    keep_t = ok[emb.caption_video]
    emb.text, emb.caption_video = emb.text[keep_t], new_index[emb.caption_video[keep_t]]
    emb.video = emb.video[keep_v]
    if emb.frame_mask is not None:
        emb.frame_mask = emb.frame_mask[keep_v]
    if emb.tab_text is not None:
        emb.tab_text, emb.tab_video = emb.tab_text[keep_t], emb.tab_video[keep_v]
    emb.info["num_skipped_videos"] = len(bad)
    emb.info["skipped_video_ids"] = [video_ids[i] for i in bad]
    return emb


def frame_source(cfg: argparse.Namespace, size: int) -> ClipSource:
    """JPEG frame folders (``--frame_path``) or videos decoded on the fly (``--video_path``)."""
    flag = "--frame_path" if cfg.frame_path else "--video_path"
    folder = cfg.frame_path or cfg.video_path
    if folder and not os.path.isdir(folder):
        raise UserError(f"{flag} {folder} is not a folder")
    if cfg.frame_path:
        from emcl.data.frames import FrameFolderSource

        return FrameFolderSource(cfg.frame_path, sample_fp=cfg.feature_framerate, max_frames=cfg.max_frames,
                                 size=size, extract_fps=cfg.extract_fps)
    if cfg.video_path:
        from emcl.data.sources import VideoSource

        return VideoSource(cfg.video_path, framerate=cfg.video_framerate, max_frames=cfg.max_frames,
                           size=size, backend=cfg.decode_backend, any_extension=cfg.datatype == "msvd")
    raise UserError("a CLIP2Video checkpoint needs --frame_path (JPEG folders) or --video_path (videos)")


def load_split(cfg: argparse.Namespace):
    from emcl.data.annotations import load_split as _load

    if not cfg.anno_path:
        raise UserError("--anno_path is required with a checkpoint (the folder of the dataset's annotations)")
    options = {"msrvtt_test": cfg.msrvtt_test} if cfg.datatype == "msrvtt" else {}
    try:
        return _load(cfg.datatype, cfg.anno_path, cfg.split, **options)
    except (ValueError, FileNotFoundError) as error:
        raise UserError(str(error)) from error


@torch.no_grad()
def from_clip2video(cfg: argparse.Namespace, info: dist.DistInfo) -> Embeddings:
    """Encode a split with a CLIP2Video checkpoint: main vectors and TAB vectors of every text and video."""
    from emcl.data.datasets import TextDataset, VideoDataset
    from emcl.data.loader import build_loader, rank_subset
    from emcl.evaluation import encode_split

    from .clip2video import checkpoint_path, load_clip2video

    path = checkpoint_path(cfg.checkpoint or cfg.init_model, cfg.model_num if cfg.checkpoint else None)
    model = load_clip2video(
        path, temporal_layers=cfg.temporal_layers, center_k=cfg.tab_centers, center_weight=cfg.center_weight
    )
    log.info("loaded CLIP2Video from %s (CLIP from the checkpoint)", path)
    model.to(info.device).eval()
    split = load_split(cfg)
    source = frame_source(cfg, model.clip.image_size)
    kw = dict(batch_size=cfg.batch_size_val, shuffle=False, seed=cfg.seed, distributed=False)
    texts = build_loader(
        rank_subset(TextDataset(split, cfg.max_words), info.rank, info.world_size), workers=0, **kw
    )
    videos = build_loader(
        rank_subset(
            VideoDataset(split, source, skip_bad_videos=cfg.skip_bad_videos), info.rank, info.world_size
        ),
        workers=cfg.workers,
        **kw,
    )
    t, gt = encode_split(
        texts,
        lambda b: model.encode_text(b["text_ids"], b["text_mask"]),
        split.num_captions,
        info.device,
        cfg.precision,
        "caption_index",
    )
    v, gv, ok = encode_split(
        _logged(videos, info),
        lambda b: (*model.encode_video(b["frames"], b["frame_mask"]), b["valid"]),
        split.num_videos,
        info.device,
        cfg.precision,
        "video_index",
    )
    emb = Embeddings(
        text=t,
        video=v,
        caption_video=torch.tensor(split.caption_video, device=info.device),
        tab_text=gt,
        tab_video=gv,
        center_weight=cfg.center_weight,
        info={
            "source": "clip2video",
            "checkpoint": str(path),
            "datatype": cfg.datatype,
            "split": cfg.split,
            "frames": repr(source),
            "logit_scale": float(model.logit_scale),
        },
    )
    return _drop_invalid(emb, ok.bool(), split.video_ids, cfg, f"{cfg.datatype}/{cfg.split}")


def _logged(loader: Any, info: dist.DistInfo) -> Any:
    """The loader's batches, with a log line every 10 batches (rank 0)."""
    for k, batch in enumerate(loader):
        yield batch
        if info.is_main and (k + 1) % 10 == 0:
            log.info("videos: %d/%d batches", k + 1, len(loader))


# Settings that change speed or memory, never the scores: today's defaults, not the checkpoint's.
_SPEED_KEYS = ("grad_checkpointing", "checkpoint_layers", "lean_activations", "memory_budget", "compile")


@torch.no_grad()
def from_emcl_net(cfg: argparse.Namespace, info: dist.DistInfo) -> Embeddings:
    """Encode a split with an EMCL-Net checkpoint: ours (its own data settings unless overridden) or the
    authors' (architecture from the file, the rest EMCL-Net's defaults and these flags)."""
    from emcl.train.runs import load_run, task_defaults
    from video_retrieval.emcl_net import main_task_retrieval as retrieval

    defaults = task_defaults(retrieval.TASK)
    overrides = {key: defaults[key] for key in _SPEED_KEYS}
    for key in ("anno_path", "video_path", "frame_cache", "cache_in_memory", "datatype", "msrvtt_test"):
        if getattr(cfg, key, None) is not None and key in cfg._explicit:  # the data may have moved
            overrides[key] = getattr(cfg, key)
    overrides.update(batch_size_val=cfg.batch_size_val, workers=cfg.workers, precision=cfg.precision,
                     skip_bad_videos=cfg.skip_bad_videos, max_skip_fraction=cfg.max_skip_fraction)
    run = load_run(checkpoint=cfg.emcl_net_checkpoint, overrides=overrides, device=info.device,
                   expect=(retrieval.TASK.name, "--emcl_net_checkpoint"))
    if not isinstance(run.task, retrieval.TASK):  # a checkpoint naming no task, with another's task_module
        raise UserError(f"--emcl_net_checkpoint {cfg.emcl_net_checkpoint} is a checkpoint of task "
                        f"'{run.task.name}', not of EMCL-Net (task 'retrieval')")
    ncfg, model = run.cfg, run.model
    log.info(
        "loaded EMCL-Net from %s (trained with use_emcl=%s)",
        cfg.emcl_net_checkpoint,
        getattr(ncfg, "use_emcl", "?"),
    )
    try:
        split = run.task.load_split(cfg.split)
    except (ValueError, FileNotFoundError) as error:
        raise UserError(str(error)) from error
    run.task.info = info  # encoded by every rank
    t, f, m, ok = run.task.encode(model, split)
    emb = Embeddings(
        text=t.float(),
        video=f.float(),
        frame_mask=m,
        pooling="text",
        caption_video=torch.tensor(split.caption_video, device=t.device),
        info={
            "source": "emcl_net",
            "checkpoint": str(cfg.emcl_net_checkpoint),
            "datatype": ncfg.datatype,
            "split": cfg.split,
            "trained_with_emcl": bool(getattr(ncfg, "use_emcl", 0)),
            "trained_emcl_settings": {
                k: getattr(ncfg, k, None) for k in ("centerK", "stage_num", "lamd", "beta", "em_init")
            },
        },
    )
    emb.temp = float(getattr(ncfg, "temp", 3.0))
    emb = _drop_invalid(emb, ok, split.video_ids, cfg, f"{ncfg.datatype}/{cfg.split}")
    if cfg.frame_pooling == "mean":  # default for EMCL-Net: its own text-conditioned pooling
        emb.pooling = "pooled"
    return emb
