"""A stand-in for a training entry point in the table scripts' tests: ``python -m tests._fake_train
--output_dir DIR [--use_emcl N] [--fail] [--sleep S] ...`` writes ``DIR/metrics.json`` with fixed test
results (only the ``none`` policy without EMCL, ``paper`` and ``query`` with it) and ``DIR/config.yaml``;
``--fail`` exits with status 3 instead; ``--sleep S`` waits S seconds first (a run that takes a while).
Like a real run, it refuses a DIR that already holds metrics.json unless ``--overwrite``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from emcl.fileio import save_json, save_yaml


def result(r1: float) -> dict[str, float]:
    return {"R1": r1, "R5": r1 + 20, "R10": r1 + 30, "R50": 99.0, "MdR": 2.0, "MnR": 11.5}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--output_dir", required=True)
    p.add_argument("--use_emcl", type=int, default=0)
    p.add_argument("--fail", action="store_true")
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--overwrite", action="store_true")
    args, extra = p.parse_known_args(argv)
    print(f"fake training, other flags: {extra}, overwrite: {args.overwrite}")
    if args.fail:
        return 3
    if (Path(args.output_dir) / "metrics.json").exists() and not args.overwrite:
        print(f"error: output folder {args.output_dir} already holds a run", file=sys.stderr)
        return 2
    time.sleep(args.sleep)
    base = 20.0 + 5 * args.use_emcl + len(extra) % 3
    names = ("paper", "query") if args.use_emcl else ("none",)
    policies = {n: {"t2v": result(base + i), "v2t": result(base - 1 + i)} for i, n in enumerate(names)}
    out = Path(args.output_dir)
    test = {**policies[names[0]], "eval_block": names[0], "policies": policies}
    save_json({"test": test}, out / "metrics.json")
    save_yaml({"use_emcl": args.use_emcl, "output_dir": str(out)}, out / "config.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
