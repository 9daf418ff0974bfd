"""A tiny finished-looking EMCL-Net run for the figure and search tests: a handful of synthetic clips in the
MSVD layout, the model of configs/synthetic.yaml's clip_config (untrained, seeded), a checkpoint holding its
config under "config" (as training writes it), and config.yaml beside it."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from emcl.fileio import save_torch, save_yaml
from emcl.train.config import parse_args

REPO = Path(__file__).resolve().parents[1]
TASK = "video_retrieval.emcl_net.main_task_retrieval"


def cpu_info():
    """A single CPU process's :class:`emcl.dist.DistInfo`."""
    from emcl.dist import DistInfo

    return DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)


def tiny_config(data: Path, **over) -> argparse.Namespace:
    """configs/synthetic.yaml's settings (its tiny CLIP) pointed at the synthetic set in ``data``."""
    from emcl.train.runner import build_parser
    from video_retrieval.emcl_net import main_task_retrieval as task

    parser = build_parser(task.TASK)
    cfg = parse_args(parser, ["--config", str(REPO / "configs/synthetic.yaml")], task.TASK.config_blocks)
    cfg.task_module = TASK
    cfg.anno_path = str(data / "annotations")
    cfg.video_path = str(data / "videos")
    cfg.frame_cache = None
    cfg.cache_in_memory = 0
    cfg.synthetic = None
    cfg.workers = 0
    cfg.batch_size_val = 8
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def make_data(root: Path, num_videos: int = 10) -> Path:
    """Synthetic clips (MSVD layout; train 4, val 1, test the rest) under ``root/data``."""
    from emcl.data.synthetic import make_synthetic

    data = root / "data"
    make_synthetic(data, num_videos=num_videos, seed=3, format="msvd",
                   split_sizes=[4, 1, num_videos - 5], frames=6, fps=4, size=32, captions_per_video=2)
    return data


def make_run(root: Path, num_videos: int = 10, **over) -> tuple[Path, argparse.Namespace]:
    """A run folder ``root/run`` with config.yaml and checkpoint_best.pt of an untrained tiny model."""
    from video_retrieval.emcl_net import main_task_retrieval as task

    data = make_data(root, num_videos)
    cfg = tiny_config(data, **over)
    model = task.TASK(cfg, cpu_info()).build_model()
    with torch.no_grad():  # a non-trivial EMCL state, as after training
        model.emcl.mu.copy_(torch.linspace(-1.0, 1.0, model.emcl.mu.shape[-1]))
    run = root / "run"
    save_yaml(vars(cfg), run / "config.yaml")
    save_torch({"model": model.state_dict(), "config": dict(vars(cfg))}, run / "checkpoint_best.pt")
    return run, cfg
