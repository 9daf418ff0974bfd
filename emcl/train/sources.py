"""Where a run's clips come from, from its settings: the :class:`VideoSource` of a run, and the synthetic
dataset (with its frame cache) that a config's ``synthetic:`` block generates on first use. Shared by every
trainer (EMCL-Net, EMCL-QA)."""

from __future__ import annotations

import argparse
import inspect
import logging
from pathlib import Path

from emcl import dist
from emcl.data.sources import SkipBudget, VideoSource, check_videos_exist, missing_videos
from emcl.errors import UserError
from emcl.train.config import check_keys

log = logging.getLogger("emcl.data")


def index_rounding(cfg: argparse.Namespace) -> str:
    """Evenly spaced frame indices: rounded (ours) or truncated as the reference (``--faithful``)."""
    return "floor" if cfg.faithful else "round"


def video_source(cfg: argparse.Namespace, any_extension: bool = False) -> VideoSource:
    """The run's clips: ``--video_path`` or ``--frame_cache``, sampled as the flags say."""
    return VideoSource(
        cfg.video_path,
        framerate=cfg.video_framerate,
        max_frames=cfg.max_frames,
        size=cfg.image_size,
        backend=cfg.decode_backend,
        frame_cache=cfg.frame_cache,
        any_extension=any_extension,
        cache_in_memory=bool(cfg.cache_in_memory),
        index_rounding=index_rounding(cfg),
    )


def prepare_synthetic(cfg: argparse.Namespace, info: dist.DistInfo, format: str, default_out: str) -> None:
    """Generate the config's synthetic dataset (and its frame cache) on first use when no ``--anno_path``
    was given, then point ``anno_path`` / ``video_path`` (/ ``frame_cache``) at it. Without a ``synthetic:``
    block ``--anno_path`` is required. Every rank calls it; rank 0 writes."""
    if cfg.anno_path is not None or not cfg.synthetic:
        if cfg.anno_path is None:
            raise UserError("--anno_path is required (or use a config with a synthetic dataset)")
        return
    from emcl.data.cache import build_cache
    from emcl.data.synthetic import make_synthetic

    params = inspect.signature(make_synthetic).parameters
    syn = check_keys(
        cfg.synthetic,
        [*(k for k in params if k not in ("out", "format")), "out", "frame_cache"],
        f"{cfg.config or 'config'}: synthetic",
        required=[k for k, p in params.items() if p.default is p.empty and k != "out"],
    )
    out = Path(syn.pop("out", default_out))
    use_cache = syn.pop("frame_cache", False) and cfg.frame_cache is None
    rounding = index_rounding(cfg)
    suffix = "" if rounding == "round" else f"_{rounding}"
    cache = out / f"frames_{cfg.max_frames}x{cfg.video_framerate:g}fps_{cfg.image_size}px{suffix}.h5"
    if info.is_main:
        make_synthetic(out, format=format, **syn)
        if use_cache:
            build_cache(
                out / "videos",
                cache,
                max_frames=cfg.max_frames,
                framerate=cfg.video_framerate,
                size=cfg.image_size,
                workers=min(2, cfg.workers),
                backend=cfg.decode_backend,
                index_rounding=rounding,
            )
    dist.barrier()
    cfg.anno_path = str(out / "annotations")
    cfg.video_path = str(out / "videos")
    if use_cache:
        cfg.frame_cache = str(cache)


def check_split_videos(
    source: VideoSource,
    video_ids: list[str],
    what: str,
    cfg: argparse.Namespace,
    skipped: str = "will be skipped",
) -> None:
    """Before the first step: every video of a split is found and non-empty. With ``--skip_bad_videos``
    the missing ones are logged (they are skipped like unreadable ones) up to ``--max_skip_fraction``."""
    if not cfg.skip_bad_videos:
        check_videos_exist(source, video_ids, what)
        return
    bad = missing_videos(source, video_ids)
    if bad:
        log.warning(
            "%s: %d missing or empty video(s) %s: %s", what, len(bad), skipped, ", ".join(list(bad)[:20])
        )
        SkipBudget(len(video_ids), cfg.max_skip_fraction, what).add(bad)


def check_skip_fraction(skipped_ids: set[str] | list[str], total: int, what: str, cfg) -> None:
    """Stop once more than ``--max_skip_fraction`` of a split's videos proved unreadable (the rule and the
    message are :class:`emcl.data.sources.SkipBudget`'s)."""
    if total:
        SkipBudget(total, cfg.max_skip_fraction, what).add(sorted(skipped_ids))
