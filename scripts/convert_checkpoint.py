#!/usr/bin/env python
"""Convert an authors' EMCL-Net (or CLIP4Clip) checkpoint into one of ours.

    python scripts/convert_checkpoint.py pytorch_model.bin.4 runs/authors/checkpoint_msrvtt.pt \\
        [--config configs/msrvtt.yaml] [--seed 0] [any other EMCL-Net flag ...] [--overwrite]

The reference saves a plain ``state_dict()`` with no settings and no EM state. The output carries the
model in our key names, the architecture read from the file (CLIP's dimensions, aggregation module and
layer count), the other settings from ``--config`` and the flags (EMCL-Net's defaults otherwise), and
``mu`` as drawn from ``--seed`` (the reference's default seed is 0). It is then used like any checkpoint
of ours: ``--init_model``, ``emcl.train.runs.load_run``, search, figures, the inference module.
A setting that contradicts the file (e.g. ``agg_layers``) is an error naming both values; an existing
``OUT`` is replaced only with ``--overwrite``. The file is written atomically.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from emcl.dist import DistInfo
from emcl.errors import UserError, cli_main
from emcl.fileio import save_torch
from emcl.train.checkpoint import load_checkpoint
from emcl.train.config import parse_args
from emcl.train.runner import build_parser, config_dict, configured_keys, explicit_flags
from video_retrieval.emcl_net import main_task_retrieval as retrieval

log = logging.getLogger("emcl.convert")


def convert(src: str | Path, dst: str | Path, flags: list[str], overwrite: bool = False) -> dict[str, Any]:
    """Write ``dst`` (our checkpoint) from the reference file ``src``; returns its saved config."""
    dst = Path(dst)
    if dst.is_dir():
        raise UserError(f"{dst} is a folder: give the path of the checkpoint file to write")
    if dst.exists() and not overwrite:
        raise UserError(f"{dst} exists: pass --overwrite to replace it, or choose another path")
    parser = build_parser(retrieval.TASK)
    cfg = parse_args(parser, flags, retrieval.TASK.config_blocks)
    cfg._explicit = explicit_flags(parser, flags)
    task = retrieval.TASK(
        cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
    )
    ref = task.adopt_checkpoint(load_checkpoint(src), str(src), configured_keys(cfg))
    if ref is None:
        raise UserError(
            f"{src} is not a reference EMCL-Net / CLIP4Clip checkpoint (no plain state dict "
            f"with clip.visual.conv1.weight); checkpoints of ours need no conversion"
        )
    cfg.task, cfg.task_module = retrieval.TASK.name, retrieval.TASK.module
    model = task.build_model()
    ref.load_into(model)
    saved, notes = config_dict(cfg), ref.metrics(cfg)
    save_torch({"model": model.state_dict(), "config": saved, "converted_from": str(src), **notes}, dst)
    log.info("wrote %s (agg_module %s; %s)", dst, cfg.agg_module, notes["em_state"])
    return saved


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="the authors' pytorch_model.bin.N (or a CLIP4Clip checkpoint)")
    p.add_argument("dst", help="our checkpoint to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args, flags = p.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    convert(args.src, args.dst, flags, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
