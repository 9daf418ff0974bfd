"""EMCL as a joint training module, with and without, on two baselines: MMT on expert features and
CLIP4Clip-style mean pooling (EMCL-Net ``--agg_module meanP``), same data and seeds per baseline.

    python scripts/emcl_table.py --config configs/mmt_synthetic.yaml --output_dir runs/emcl_table

Writes ``table.md``, ``table.json`` (R@1/5/10, MdR, MnR text->video under both evaluation policies) and
``table.png`` (a bar plot of R@1) in ``--output_dir``, and keeps each run's folder under it (with its log
``DIR.log`` beside it, and ``sub_runs.json``, the record of the runs the table started). The two
baselines run side by side (``--jobs 2``, one thread each); each baseline's two runs run one after the
other, so the first writes the synthetic data and the second reuses it.

The folder is locked while the script works; one holding a finished table is refused unless
``--overwrite``, which removes the table's files and the run folders it recorded, then runs everything
afresh. Runs are never given ``--overwrite``: a run folder this table recorded with the same command and
finished is reused, and one holding any other results is refused before anything runs (see
``emcl/train/tables.py``).

Policies: ``paper`` runs EM per block of 32 (MMT: 32 matched pairs in list order; EMCL-Net: 32 texts x 32
videos), as the reference, so each query meets its own positive inside EM (transductive); ``query`` runs
EM per query over [all videos; that query]. A model without EMCL has no EM: one number, shown under both.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from emcl.errors import UserError, cli_main
from emcl.train import tables

ROOT = Path(__file__).resolve().parents[1]

KEYS = ("R1", "R5", "R10", "MdR", "MnR")
POLICIES = ("paper", "query")


def _runs(args: argparse.Namespace) -> list[list[dict]]:
    """Two lanes (one per baseline), each a list of runs in order."""
    common = ["--seed", str(args.seed), "--device", "cpu"]
    mmt = [
        {
            "model": "MMT",
            "emcl": use,
            "module": "video_retrieval.joint_training.main_task_joint",
            "argv": ["--config", args.config, "--use_emcl", str(use), *common, *args.mmt_flags],
            "dir": f"mmt_emcl{use}",
        }
        for use in (0, 1)
    ]
    meanp = [
        {
            "model": "mean-pooling CLIP",
            "emcl": use,
            "module": "video_retrieval.emcl_net.main_task_retrieval",
            "argv": ["--config", args.clip_config, "--agg_module", "meanP", "--use_emcl", str(use),
                     "--epochs", str(args.clip_epochs), "--workers", "0", *common, *args.clip_flags],
            "dir": f"meanP_emcl{use}",
        }
        for use in (0, 1)
    ]  # fmt: skip
    return [mmt, meanp]


def _run(r: dict, out: Path, threads: int, record: tables.SubRuns) -> dict:
    """One run, its output in ``OUT/DIR.log`` (not run again when ``r["reuse"]``); the run with its time
    and test results."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    run_dir = out / r["dir"]
    if r["reuse"]:
        print(f"{r['model']} (EMCL {r['emcl']}): {run_dir} holds this run, finished; not run again")
        seconds = record.seconds(r["dir"]) or 0.0
    else:
        record.started(r["dir"], r["cmd"])
        seconds = tables.launch(tables.SubRun(f"{r['model']} (EMCL {r['emcl']})", r["cmd"], run_dir,
                                              log=out / f"{r['dir']}.log"), ROOT, env=env)
        record.finished(r["dir"], seconds)
    metrics = tables.read_json(run_dir / "metrics.json")
    return {**r, "seconds": round(seconds, 1), "test": metrics["test"]}


def plan(lanes: list[list[dict]], out: Path, record: tables.SubRuns) -> None:
    """Each run's command and whether its folder already holds it (``cmd``, ``reuse``); a folder holding
    other results is refused here, before any run starts."""
    for r in (r for lane in lanes for r in lane):
        r["cmd"] = tables.module_command(r["module"], [*r["argv"], "--output_dir", str(out / r["dir"])])
        r["reuse"] = record.plan(r["dir"], r["cmd"], lambda d: tables.has_results(d, "test"))


def _row(r: dict) -> dict:
    pol = r["test"]["policies"]
    no_em = set(pol) == {"none"}
    return {
        "model": r["model"],
        "emcl": bool(r["emcl"]),
        "policies": {p: pol["none" if no_em else p]["t2v"] for p in POLICIES},
        "no_em": no_em,
        "v2t": {p: pol["none" if no_em else p]["v2t"] for p in POLICIES},
        "run_dir": r["dir"],
        "seconds": r["seconds"],
    }


def markdown(rows: list[dict]) -> str:
    head = ["baseline", "EMCL", *(f"{p} {k}" for p in POLICIES for k in KEYS)]
    cells = [[r["model"], "yes" if r["emcl"] else "no (no EM: one number)",
              *(tables.number_cell(r["policies"][p][k]) for p in POLICIES for k in KEYS)] for r in rows]
    lines = tables.markdown_table(head, cells)
    lines.append("")
    lines.append(
        "Text-to-video on the test split. paper: EM per block of 32 as the reference (transductive: "
        "each query meets its own positive inside EM); query: EM per query over [all videos; that "
        "query]. R@k in %, MdR/MnR: median/mean rank."
    )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    from emcl.viz.plot import figure, save_png

    models = list(dict.fromkeys(r["model"] for r in rows))
    bars = [
        ("without EMCL", False, "paper"),
        ("with EMCL, paper", True, "paper"),
        ("with EMCL, query", True, "query"),
    ]
    fig, axes = figure(size=(6.5, 3.6))
    ax = axes[0, 0]
    width = 0.8 / len(bars)
    for j, (label, emcl, pol) in enumerate(bars):
        vals = [
            next(r["policies"][pol]["R1"] for r in rows if r["model"] == m and r["emcl"] == emcl)
            for m in models
        ]
        xs = [i + (j - (len(bars) - 1) / 2) * width for i in range(len(models))]
        ax.bar(xs, vals, width, label=label)
        for x, v in zip(xs, vals):
            ax.text(x, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(models)), models)
    ax.set_ylabel("text-to-video R@1 (%)")
    ax.set_title("EMCL as a joint training module (synthetic data)")
    ax.legend(fontsize=8)
    save_png(fig, path, dpi=120)


TABLE_FILES = ("table.md", "table.json", "table.png")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/mmt_synthetic.yaml", help="MMT config (joint training)")
    p.add_argument("--clip_config", default="configs/synthetic.yaml", help="EMCL-Net config for meanP")
    p.add_argument("--clip_epochs", type=int, default=3, help="epochs of the meanP runs (shortened)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--overwrite", action="store_true",
                   help="replace the table in --output_dir: its files and the runs it recorded are removed")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--jobs", type=int, default=2, choices=(1, 2), help="baselines run side by side")
    p.add_argument("--threads", type=int, default=1, help="threads per run (OMP_NUM_THREADS)")
    p.add_argument("--mmt_flags", nargs=argparse.REMAINDER, default=[], help="extra flags for the MMT runs")
    p.add_argument("--clip_flags", default="", help="extra flags for the meanP runs, one string")
    args = p.parse_args(argv)
    args.clip_flags = args.clip_flags.split()
    for name in ("mmt_flags", "clip_flags"):
        given = [f for f in getattr(args, name) if f.split("=")[0] in ("--overwrite", "--output_dir")]
        if given:
            raise UserError(f"--{name}: {given[0]} is the table's to set, not a run's (give --overwrite to "
                            "the table: it then starts its runs afresh)")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run (or reuse) the four runs and write the table into ``--output_dir``."""
    args = parse_args(argv)
    out = Path(args.output_dir)
    lanes = _runs(args)
    with tables.TableFolder(out, overwrite=args.overwrite, table_files=TABLE_FILES, tool="emcl_table.py",
                            cwd=ROOT, logs=("*.log",)) as table:
        plan(lanes, out, table.record)
        table.begin()
        start = time.perf_counter()
        done = tables.run_lanes(lanes, lambda r: _run(r, out, args.threads, table.record), args.jobs)
        rows = [_row(r) for r in done]
        total = round(time.perf_counter() - start, 1)
        table_data = {
            "rows": rows,
            "direction": "t2v",
            "policies": {
                "paper": "EM per block of 32 as the reference (transductive)",
                "query": "EM per query over [all videos; that query]",
            },
            "settings": {
                "mmt_config": args.config,
                "clip_config": args.clip_config,
                "clip_epochs": args.clip_epochs,
                "seed": args.seed,
                "jobs": args.jobs,
                "threads": args.threads,
            },
            "seconds": total,
        }
        md = markdown(rows) + f"\nWall time {total:.0f} s ({args.jobs} job(s) x {args.threads} thread(s)).\n"
        tables.write_table(out / "table", md, table_data)
        plot(rows, out / "table.png")
    print(md)
    return table_data


if __name__ == "__main__":
    cli_main(main)
