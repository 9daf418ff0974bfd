"""Consolidate MMT's per-video expert files into one HDF5 store (emcl.data.experts.consolidate_experts),
so training reads one file instead of opening one per video.

    python scripts/consolidate_experts.py --root data/MSRVTT/vid_feat_files/mult_h5 \
        --out data/MSRVTT/experts.h5 --config configs/mmt_msrvtt.yaml

Every file is validated (a malformed one is an error naming the file and the expert); missing experts
(absent, empty or NaN-marked, as the published files mark them) are counted and printed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from emcl.data.experts import consolidate_experts, parse_experts
from emcl.errors import cli_main
from emcl.train.config import load_yaml


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="folder of per-video files {id[0]}/{id[1]}/{id[2]}/{id}.h5")
    p.add_argument("--out", required=True, help="the consolidated .h5 to write")
    p.add_argument("--config", default=None, help="take the experts from this YAML (its 'experts' key)")
    p.add_argument("--experts", default=None, help="name[:dim],... (default: the config's, else all 7)")
    p.add_argument("--ids", default=None, help="a file of video ids, one a line (default: every file found)")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    experts = args.experts
    if experts is None and args.config:
        experts = load_yaml(args.config).get("experts")
    experts = parse_experts(experts or "face,ocr,rgb,s3d,scene,speech,vggish")
    ids = None
    if args.ids:
        ids = [line.strip() for line in Path(args.ids).read_text().splitlines() if line.strip()]
    counts = consolidate_experts(args.root, args.out, experts, ids)
    print(json.dumps({"out": args.out, "experts": experts, "missing": counts}, indent=2))
    return counts


if __name__ == "__main__":
    cli_main(main)
