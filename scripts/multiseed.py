#!/usr/bin/env python
"""One configuration over several seeds: mean ± std of every metric under every evaluation policy.

    python scripts/multiseed.py --config configs/synthetic.yaml --seeds 0 1 2 --output_dir runs/seeds \\
        [--nproc_per_node 8] [--split test] [--overwrite] [--dry_run] [any other flag of the training CLI ...]

Runs ``python -m video_retrieval.emcl_net.main_task_retrieval --config C --seed N
--output_dir OUTPUT/seed_N [other flags]`` once per seed, one after the other (with ``--nproc_per_node
G > 1`` through ``torchrun --standalone --nproc_per_node G -m ...``). Then it reads each
``OUTPUT/seed_N/metrics.json`` and writes ``OUTPUT/multiseed.md`` (a table) and ``OUTPUT/multiseed.json``
(mean, std and the per-seed values of every number).

``OUTPUT`` is locked while the script works. One that holds a finished table (``multiseed.json``) is
refused unless ``--overwrite``, which removes the table and the seed folders the script recorded in
``OUTPUT/sub_runs.json``, then runs every seed afresh; runs are never given ``--overwrite``. Without it,
a seed folder recorded with the very same command and settings files and holding the split's results is
not run again, so an interrupted sweep continues where it stopped; a seed folder holding any other results
(a run started by hand, other settings, an unfinished run) is refused before anything runs. To add seeds
to a finished sweep, remove its ``multiseed.md`` and ``multiseed.json``: the recorded seeds are reused.

What is aggregated, for the chosen split (default ``test``): the headline rows (``t2v``, ``v2t``,
``t2v_dsl``, ``v2t_dsl`` and, for multi-caption data, ``v2t_captions`` ...; they follow the run's
``--eval_block``, named in the table) and every policy under ``policies`` (``paper``, ``query``,
``none``). Each cell is the mean ± the sample standard deviation (n - 1 in the denominator) over the
seeds that report it; with one seed there is no standard deviation. Seeds are independent runs: what
differs is the seed of the EMCL state, the data order and augmentation, and weight initialisation of the
layers CLIP does not provide.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from emcl.errors import cli_main
from emcl.metrics import RANK_KEYS
from emcl.train import tables
from emcl.train.outdir import check_tool_output

REPO = Path(__file__).resolve().parents[1]

MODULE = "video_retrieval.emcl_net.main_task_retrieval"
HEADLINE = "headline"
#: Flags this script sets for each run; giving them as extra flags is an error.
OWN_FLAGS = ("--seed", "--output_dir", "--config")


# ------------------------------------------------------------------------------------ aggregation


def _rows(block: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The metric rows of one result block: entries that are dicts with at least one RANK_KEYS number."""
    rows = {name: tables.numbers(row, RANK_KEYS) for name, row in block.items() if isinstance(row, dict)}
    return {name: row for name, row in rows.items() if row}


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def aggregate(metrics: dict[int, dict[str, Any]], split: str = "test") -> dict[str, Any]:
    """Mean and sample std over seeds of every number in ``metrics[seed][split]``.

    ``metrics`` maps a seed to its parsed ``metrics.json``. Groups: ``"headline"`` (the split's top-level
    rows, which follow the run's ``eval_block``) and each policy under ``policies``. Returns
    ``{"split", "seeds", "eval_block", "groups": {group: {direction: {metric: {"mean", "std", "n",
    "values"}}}}}``, ``values`` in seed order; ``std`` is None for a single value. Raises ValueError
    naming the seed when a run has no results for ``split``.
    """
    if not metrics:
        raise ValueError("no runs to aggregate")
    seeds = sorted(metrics)
    collected: dict[str, dict[str, dict[str, list[float]]]] = {}
    eval_blocks = []
    for seed in seeds:
        block = metrics[seed].get(split)
        if not isinstance(block, dict):
            have = sorted(k for k, v in metrics[seed].items() if isinstance(v, dict))
            raise ValueError(f"seed {seed}: metrics.json has no '{split}' results (it has {have})")
        eval_blocks.append(block.get("eval_block"))
        groups = {HEADLINE: _rows(block)}
        for policy, rows in (block.get("policies") or {}).items():
            if isinstance(rows, dict):
                groups[policy] = _rows(rows)
        for group, rows in groups.items():
            for direction, row in rows.items():
                cells = collected.setdefault(group, {}).setdefault(direction, {})
                for key, value in row.items():
                    cells.setdefault(key, []).append(value)
    out_groups: dict[str, Any] = {}
    for group, rows in collected.items():
        out_groups[group] = {}
        for direction, cells in rows.items():
            out_groups[group][direction] = {}
            for key in RANK_KEYS:
                if key in cells:
                    mean, std = _mean_std(cells[key])
                    out_groups[group][direction][key] = {
                        "mean": mean, "std": std, "n": len(cells[key]), "values": cells[key]
                    }
    distinct = sorted({str(b) for b in eval_blocks})
    return {
        "split": split,
        "seeds": seeds,
        "eval_block": eval_blocks[0] if len(distinct) == 1 else eval_blocks,
        "std": "sample standard deviation over seeds (n - 1); null with one seed",
        "groups": out_groups,
    }


def _cell(cell: dict[str, Any] | None, n_seeds: int) -> str:
    if cell is None:
        return "-"
    text = f"{cell['mean']:.1f}" if cell["std"] is None else f"{cell['mean']:.1f} ± {cell['std']:.1f}"
    return text if cell["n"] == n_seeds else f"{text} (n={cell['n']})"


def format_markdown(summary: dict[str, Any], title: str = "") -> str:
    """A markdown table: one line per (policy, direction), one column per metric, ``mean ± std``.

    The headline rows are printed once, as their policy's rows marked ``(headline)``, when they are
    that policy's numbers in every run (as the runner writes them); otherwise as a group of their own.
    """
    n = len(summary["seeds"])
    block = summary["eval_block"]
    head_name = f"{HEADLINE} (eval_block={block})" if isinstance(block, str) else HEADLINE
    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines.append(
        f"{summary['split']} split, seeds {', '.join(map(str, summary['seeds']))}: mean ± sample std "
        f"over {n} run{'s' if n != 1 else ''}."
    )
    lines.append("")
    groups = summary["groups"]
    order = [HEADLINE] + [g for g in ("paper", "query", "none") if g in groups]
    order += [g for g in groups if g not in order]
    names = {g: g for g in order}
    names[HEADLINE] = head_name
    if isinstance(block, str) and groups.get(block) == groups.get(HEADLINE):
        # the headline rows are that policy's rows: print them once, labelled
        order.remove(HEADLINE)
        names[block] = f"{block} (headline)"
    rows = [[names[group], direction, *(_cell(cells.get(k), n) for k in RANK_KEYS)]
            for group in order for direction, cells in groups.get(group, {}).items()]
    lines += tables.markdown_table(["policy", "direction", *RANK_KEYS], rows, right_from=2)
    diffs = summary.get("config_differences") or {}
    if diffs:
        lines += ["", "**The runs differ in settings other than the seed:** "
                  + "; ".join(f"{k}: {v}" for k, v in diffs.items())]
    if any("v2t_captions" in rows for rows in groups.values()):
        lines += ["", "v2t: each video ranks the videos' best captions (the reference's protocol); "
                  "v2t_captions: each video ranks all captions (harder; not the paper's protocol)."]
    return "\n".join(lines) + "\n"


def load_runs(output_dir: str | os.PathLike[str], seeds: Sequence[int]) -> dict[int, dict[str, Any]]:
    """``{seed: metrics}`` from ``output_dir/seed_N/metrics.json``; a clear error for a missing or
    unparsable file."""
    runs = {}
    for seed in seeds:
        path = Path(output_dir) / f"seed_{seed}" / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"seed {seed}: {path} not found (did the run finish?)")
        try:
            runs[seed] = tables.read_json(path)
        except tables.RunFileError as e:
            raise ValueError(f"seed {seed}: {e}") from None
    return runs


#: Settings expected to differ between the runs of one sweep.
PER_RUN_KEYS = frozenset({"seed", "output_dir", "overwrite", "resume", "n_display", "debug", "tensorboard"})


def config_differences(output_dir: str | os.PathLike[str], seeds: Sequence[int]) -> dict[str, dict[int, Any]]:
    """Settings (from each run's ``config.yaml``) that differ between the seeds, other than
    :data:`PER_RUN_KEYS`: ``{key: {seed: value}}``. Runs without a config.yaml are left out."""
    loaded = {seed: tables.read_config(Path(output_dir) / f"seed_{seed}") for seed in seeds}
    configs = {seed: c for seed, c in loaded.items() if c}
    keys = sorted({k for c in configs.values() for k in c} - PER_RUN_KEYS)
    return {k: {seed: c.get(k) for seed, c in configs.items()} for k in keys
            if len({repr(c.get(k)) for c in configs.values()}) > 1}


def write_summary(
    output_dir: str | os.PathLike[str], summary: dict[str, Any], title: str = ""
) -> tuple[Path, Path]:
    """``multiseed.json`` and ``multiseed.md`` in ``output_dir``, both written atomically."""
    return tables.write_table(Path(output_dir) / "multiseed", format_markdown(summary, title), summary)


# ------------------------------------------------------------------------------------------- runs


def seed_command(config: str, seed: int, output_dir: str | os.PathLike[str], extra: Sequence[str],
                 nproc_per_node: int = 1, module: str = MODULE) -> list[str]:
    """The training command of one seed (never with ``--overwrite``: see the module's docstring)."""
    argv = ["--config", config, "--seed", str(seed), "--output_dir", str(Path(output_dir) / f"seed_{seed}"),
            *extra]
    return tables.module_command(module, argv, nproc_per_node)


def run_seeds(config: str, seeds: Sequence[int], output_dir: str | os.PathLike[str], extra: Sequence[str],
              *, split: str = "test", table: tables.TableFolder | None = None,
              record: tables.SubRuns | None = None, dry_run: bool = False, nproc_per_node: int = 1,
              runner: Callable[..., Any] = subprocess.run, echo: Callable[[str], None] = print) -> list[int]:
    """Run every seed whose folder does not hold this very run, finished; returns the seeds that were run.

    Every seed folder is checked against the record of the table's runs (``table.record``, else ``record``,
    else the one in ``output_dir``: :class:`emcl.train.tables.SubRuns`) before the ``table`` removes anything
    (``--overwrite``: `TableFolder.begin`) and before any run. ``runner`` is called like
    ``subprocess.run(cmd, cwd=REPO)`` (tests pass a fake). A run that fails stops the script with its exit
    status and the seed's folder named.
    """
    out = Path(output_dir)
    if record is None:
        record = table.record if table is not None else tables.SubRuns(out, REPO)
    planned = []
    for seed in seeds:
        cmd = seed_command(config, seed, out, extra, nproc_per_node=nproc_per_node)
        planned.append((seed, cmd, record.plan(f"seed_{seed}", cmd, lambda d: tables.has_results(d, split))))
    if table is not None:
        table.begin()
    ran = []
    for seed, cmd, reuse in planned:
        run_dir = out / f"seed_{seed}"
        if reuse:
            echo(f"seed {seed}: {run_dir} holds this run with '{split}' results; not run again")
            continue
        echo(f"seed {seed}: {shlex.join(cmd)}")
        if dry_run:
            continue
        record.started(run_dir.name, cmd)
        seconds = tables.launch(tables.SubRun(f"seed {seed}", cmd, run_dir), REPO, runner=runner)
        record.finished(run_dir.name, seconds)
        ran.append(seed)
    return ran


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], allow_abbrev=False,
        epilog="Every other flag is passed to each training run unchanged.",
    )
    p.add_argument("--config", required=True, help="the training config (YAML)")
    p.add_argument("--seeds", type=int, nargs="+", required=True, help="e.g. 0 1 2")
    p.add_argument("--output_dir", required=True, help="runs go to OUTPUT/seed_N; the tables to OUTPUT")
    p.add_argument("--nproc_per_node", type=int, default=1,
                   help="processes (GPUs) per run; above 1 each run is launched with torchrun")
    p.add_argument("--split", default="test", help="which results of metrics.json to aggregate")
    p.add_argument("--overwrite", "--rerun", action="store_true",
                   help="replace the table in --output_dir: it and the seed runs it recorded are removed, "
                        "then every seed runs afresh")
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing, write nothing")
    args, extra = p.parse_known_args(argv)
    extra = [x for x in extra if x != "--"]
    clash = [f for f in OWN_FLAGS if any(x == f or x.startswith(f + "=") for x in extra)]
    if clash:
        p.error(f"{', '.join(clash)} is set by this script per seed; do not pass it")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds has repeats: {args.seeds}")
    return args, extra


TABLE_FILES = ("multiseed.md", "multiseed.json")


def _dry_run(args: argparse.Namespace, extra: list[str]) -> int:
    """Print what a call would run (and refuse what it would refuse), writing nothing."""
    out = Path(args.output_dir)
    record = tables.SubRuns(out, REPO)
    if args.overwrite:
        record.forget()  # what --overwrite would remove: nothing is removed here
    elif out.is_dir():
        check_tool_output(out, False, TABLE_FILES, flag="--output_dir", tool="multiseed.py")
    run_seeds(args.config, args.seeds, out, extra, split=args.split, record=record, dry_run=True,
              nproc_per_node=args.nproc_per_node)
    return 0


def main(argv: Sequence[str] | None = None, runner: Callable[..., Any] = subprocess.run) -> int:
    """Run (or reuse) every seed, then write the table into ``--output_dir``."""
    args, extra = parse_args(argv)
    if args.dry_run:
        return _dry_run(args, extra)
    with tables.TableFolder(args.output_dir, overwrite=args.overwrite, table_files=TABLE_FILES,
                            tool="multiseed.py", cwd=REPO) as table:
        run_seeds(args.config, args.seeds, args.output_dir, extra, split=args.split, table=table,
                  nproc_per_node=args.nproc_per_node, runner=runner)
        try:
            summary = aggregate(load_runs(args.output_dir, args.seeds), args.split)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(str(e)) from None
        summary["config"] = args.config
        summary["extra_flags"] = extra
        summary["config_differences"] = config_differences(args.output_dir, args.seeds)
        if summary["config_differences"]:
            print(f"WARNING: the runs differ in {sorted(summary['config_differences'])} (see their "
                  "config.yaml)", file=sys.stderr)
        title = f"{args.config} {shlex.join(extra)}".strip()
        md, js = write_summary(args.output_dir, summary, title)
    print(format_markdown(summary, title))
    print(f"written: {md}, {js}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
