"""The paper's retrieval table from finished runs, with the paper's and the reference re-runs' numbers beside.

    python scripts/paper_table.py runs/*/metrics.json [--out paper_table] [--dsl] [--policy all]

For every ``metrics.json`` (its ``test`` results, else ``val``, labelled) and every evaluation policy it
holds (``policies: {paper, query, none}`` when the run evaluated several, else the one in ``eval_block``),
one row: R@1, R@5, R@10, MdR, MnR text-to-video and video-to-text. The dataset comes from ``config.yaml``
beside ``metrics.json`` (``datatype``, ``msrvtt_test``; a synthetic run is labelled as such). Under each
row: the paper's number, the reference's re-run (docs/reference.md, 'Reported numbers') and our
difference to each; differences are left out for synthetic data, which only shares the layout with the
real dataset. Cells the paper does not report are "-". Writes ``OUT.md`` and ``OUT.json`` (each
atomically; nothing else) and prints the markdown. Existing ``OUT.md`` / ``OUT.json`` are replaced only
with ``--overwrite``, and never when one would be a run's ``metrics.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from emcl.errors import UserError, cli_main
from emcl.train import tables
from emcl.train.tables import RunFileError as TableError

KEYS = ("R1", "R5", "R10", "MdR", "MnR")
DIRECTIONS = ("t2v", "v2t")
POLICIES = ("paper", "query", "none")
DATASET_ORDER = ("msrvtt-1k", "msrvtt-full", "msvd", "lsmdc", "activitynet", "didemo")
DATASET_NAMES = {
    "msrvtt-1k": "MSR-VTT 1k-A",
    "msrvtt-full": "MSR-VTT full test",
    "msvd": "MSVD",
    "lsmdc": "LSMDC",
    "activitynet": "ActivityNet Captions",
    "didemo": "DiDeMo",
}

# docs/reference.md, 'Reported numbers' (ViT-B/32): the paper's numbers and the reference code's
# re-runs, nothing else.
PAPER: dict[str, dict[str, dict[str, float]]] = {
    "msrvtt-1k": {"t2v": {"R1": 46.8, "R5": 73.1, "R10": 83.1, "MnR": 12.8}, "t2v_dsl": {"R1": 51.6}},
    "msvd": {"t2v": {"R1": 42.1, "R5": 71.3, "R10": 81.1, "MdR": 2.0, "MnR": 17.6}},
    "didemo": {"t2v": {"R1": 46.8, "R5": 74.3, "R10": 83.1, "MdR": 2.0, "MnR": 12.3}},
    "activitynet": {"t2v": {"R1": 41.2}},
}
REFERENCE: dict[str, list[tuple[str, dict[str, dict[str, float]]]]] = {
    "msrvtt-1k": [
        ("reference re-run, 2 GPUs", {"t2v": {"R1": 47.0, "R5": 72.6, "R10": 83.0, "MnR": 13.6}}),
        ("reference re-run, 8 GPUs", {"t2v": {"R1": 48.2, "R5": 74.7, "R10": 83.6, "MnR": 13.1}}),
    ],
}
DSL_NOTE = ("The reported numbers give 'with DSL 51.6' (MSR-VTT 1k-A text-to-video R@1) without saying "
            "whether it is the paper's or the re-run's; shown as the paper's DSL number")
NOTES = {
    "msrvtt-full": "the paper reports MSR-VTT on the 1k-A split only",
    "lsmdc": "the reported numbers hold no LSMDC number for EMCL-Net",
}


def dataset_of(cfg: dict[str, Any], results: dict[str, Any]) -> tuple[str | None, str, bool]:
    """(dataset key, label, synthetic?) from a run's config (``datatype``, ``msrvtt_test``, ``synthetic``)."""
    datatype = cfg.get("datatype") or results.get("datatype")
    if datatype is None:
        return None, "unknown dataset (no config.yaml with datatype)", False
    key = datatype
    if datatype == "msrvtt":
        key = "msrvtt-full" if cfg.get("msrvtt_test") == "full" else "msrvtt-1k"
    syn = cfg.get("synthetic")
    synthetic = False
    if isinstance(syn, dict) and cfg.get("anno_path"):
        out = str(syn.get("out", "data/synthetic")).rstrip("/")
        synthetic = str(cfg["anno_path"]).rstrip("/") == f"{out}/annotations"
    name = DATASET_NAMES.get(key, key)
    return key, (f"synthetic, {name} layout" if synthetic else name), synthetic


def _row(results: Any, where: str) -> dict[str, dict[str, float]]:
    """The t2v/v2t (and DSL) metric dicts of one result block, numbers only."""
    if not isinstance(results, dict) or not isinstance(results.get("t2v"), dict):
        raise TableError(f"{where}: no t2v results")
    return {d: tables.numbers(results[d]) for d in ("t2v", "v2t", "t2v_dsl", "v2t_dsl")
            if isinstance(results.get(d), dict)}


def runs_of(path: Path, policy_filter: str = "all") -> list[dict[str, Any]]:
    """The table rows of one metrics file (one per evaluation policy it holds)."""
    metrics = tables.read_json(path)
    cfg = tables.read_config(path.parent)
    split = next((s for s in ("test", "val") if isinstance(metrics.get(s), dict)), None)
    if split is None:
        raise TableError(f"{path}: no test or val results (an unfinished run?)")
    main = metrics[split]
    main_policy = main.get("eval_block") or cfg.get("eval_block") or "unknown"
    policies = metrics.get("policies") if isinstance(metrics.get("policies"), dict) else main.get("policies")
    blocks: list[tuple[str, Any]] = []
    if isinstance(policies, dict) and policies:
        for name in [p for p in POLICIES if p in policies] + [p for p in policies if p not in POLICIES]:
            blocks.append((name, policies[name]))
    else:
        blocks.append((main_policy, main))
    if policy_filter != "all":
        blocks = [(n, b) for n, b in blocks if n == policy_filter]
    key, label, synthetic = dataset_of(cfg, main)
    backbone = "tiny CLIP from scratch (clip_config)" if cfg.get("clip_config") else cfg.get("clip_path")
    rows = []
    for name, block in blocks:
        where = f"{path} ({split}, policy {name})"
        policy_label = name + (f", blocks of {cfg.get('eval_block_size', 32)}" if name == "paper" else "")
        if name == main_policy and len(blocks) > 1:
            policy_label += " (the run's main policy)"
        notes = []
        if main.get("selected_on_test") or cfg.get("select_on_test"):
            notes.append("model selected on the test split")
        if split == "val":
            notes.append("validation results: the run has no test results")
        if backbone and backbone not in ("ViT-B/32", "tiny CLIP from scratch (clip_config)"):
            notes.append(f"backbone {backbone}; the paper's numbers are ViT-B/32")
        if key in NOTES:
            notes.append(NOTES[key])
        rows.append({
            "metrics_file": str(path),
            "run": path.parent.name,
            "dataset_key": key,
            "dataset": label,
            "synthetic": synthetic,
            "backbone": backbone,
            "split": split,
            "policy": name,
            "policy_label": policy_label,
            "ours": _row(block, where),
            "notes": notes,
        })
    return rows


def _diff(ours: dict, ref: dict) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for d, vals in ref.items():
        for k, v in vals.items():
            mine = ours.get(d, {}).get(k)
            if mine is not None and math.isfinite(mine):
                out.setdefault(d, {})[k] = round(mine - v, 4)
    return out


def compare(row: dict[str, Any]) -> dict[str, Any]:
    """Add the paper's numbers, the reference re-runs and the differences (not for synthetic data)."""
    key = row["dataset_key"]
    row["paper"] = PAPER.get(key)
    row["reference"] = [{"label": lab, **vals} for lab, vals in REFERENCE.get(key, [])]
    real = not row["synthetic"]
    row["diff_paper"] = _diff(row["ours"], row["paper"]) if real and row["paper"] else None
    row["diff_reference"] = (
        [{"label": r["label"], **_diff(row["ours"], {d: r[d] for d in r if d != "label"})}
         for r in row["reference"]] if real else []
    )
    if not real and (row["paper"] or row["reference"]):
        row["notes"].append("synthetic data: the real dataset's numbers are shown for orientation only, "
                            "no difference is computed")
    return row


def _cells(vals: dict | None, dirs: tuple[str, ...], signed: bool = False) -> list[str]:
    return [tables.number_cell((vals or {}).get(d, {}).get(k), signed) for d in dirs for k in KEYS]


def markdown(rows: list[dict[str, Any]], dsl: bool = False) -> str:
    """One markdown table; each run's row followed by the paper's, the re-runs' and the differences."""
    dirs = DIRECTIONS
    head = ["dataset", "run", "policy", "numbers"] + [f"{d} {k}" for d in ("T→V", "V→T")
                                                      for k in ("R@1", "R@5", "R@10", "MdR", "MnR")]
    lines = tables.markdown_table(head, [])

    def add(first: list[str], vals: dict | None, what: str, signed: bool = False, dirs=dirs) -> None:
        lines.append(tables.markdown_row(first + [what] + _cells(vals, dirs, signed)))

    notes: list[str] = []
    for r in rows:
        policy = r["policy_label"] + ("" if r["split"] == "test" else " (val)")
        first = [r["dataset"], f"`{r['run']}`", policy]
        blank = ["", "", ""]
        add(first, r["ours"], "**ours**")
        if dsl and "t2v_dsl" in r["ours"]:
            dsl_vals = {"t2v": r["ours"].get("t2v_dsl", {}), "v2t": r["ours"].get("v2t_dsl", {})}
            add(blank, dsl_vals, "ours, DSL (separate protocol)")
        if r["paper"]:
            add(blank, r["paper"], "paper")
            if dsl and "t2v_dsl" in r["paper"]:
                add(blank, {"t2v": r["paper"]["t2v_dsl"]}, "paper, DSL")
                if DSL_NOTE not in notes:
                    notes.append(DSL_NOTE)
            if r["diff_paper"]:
                add(blank, r["diff_paper"], "ours − paper", signed=True)
        for ref, diff in zip(r["reference"], r["diff_reference"] or [None] * len(r["reference"])):
            add(blank, ref, ref["label"])
            if diff:
                add(blank, diff, f"ours − {ref['label']}", signed=True)
        for n in r["notes"]:
            note = f"`{r['run']}`: {n}"
            if note not in notes:
                notes.append(note)
    out = "\n".join(lines)
    if notes:
        out += "\n\n" + "\n".join(f"- {n}" for n in notes)
    return out + "\n"


def build(paths: list[str], policy: str = "all") -> tuple[list[dict[str, Any]], list[str]]:
    """Rows (sorted by dataset, then run, then policy) and the warnings of skipped files."""
    rows, skipped = [], []
    for p in paths:
        try:
            rows += runs_of(Path(p), policy)
        except TableError as e:
            skipped.append(str(e))
    order = {k: i for i, k in enumerate(DATASET_ORDER)}
    pol = {k: i for i, k in enumerate(POLICIES)}
    rows.sort(key=lambda r: (order.get(r["dataset_key"], 99), r["synthetic"], r["run"],
                             pol.get(r["policy"], 9)))
    return [compare(r) for r in rows], skipped


def check_out(out: Path, inputs: list[str], overwrite: bool) -> list[Path]:
    """``OUT.md`` and ``OUT.json``, checked: never a run's file (an input or any ``metrics.json``), never a
    folder, and an existing one only with ``overwrite``."""
    targets = [out.with_name(out.name + ".md"), out.with_name(out.name + ".json")]
    read = {Path(p).resolve() for p in inputs}
    for t in targets:
        if t.resolve() in read or t.name == "metrics.json":
            raise UserError(f"--out {out} would replace {t}, a run's file; choose another --out")
        if t.is_dir():
            raise UserError(f"--out {out}: {t} is a folder; choose another --out")
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        raise UserError(f"--out {out}: {' and '.join(map(str, existing))} already exist(s); pass --overwrite "
                        "to replace the table, or choose another --out")
    return targets


def main(argv: list[str] | None = None) -> int:
    """Read the metrics files, write ``OUT.md`` and ``OUT.json`` and print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", nargs="+", help="metrics.json files of finished runs")
    p.add_argument("--out", default="paper_table", help="writes OUT.md and OUT.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT.md / OUT.json")
    p.add_argument("--policy", default="all", choices=("all",) + POLICIES, help="which policies' rows")
    p.add_argument("--dsl", action="store_true", help="add the DSL rows (a separate protocol)")
    args = p.parse_args(argv)
    out = Path(args.out)
    check_out(out, args.metrics, args.overwrite)
    rows, skipped = build(args.metrics, args.policy)
    for s in skipped:
        print(f"warning: skipped {s}", file=sys.stderr)
    if not rows:
        raise UserError("no usable metrics file among the arguments")
    md = markdown(rows, args.dsl)
    source = "docs/reference.md, 'Reported numbers' (ViT-B/32)"
    tables.write_table(out, md, {"rows": rows, "skipped": skipped, "source_of_reference_numbers": source})
    print(md)
    print(f"wrote {out}.md and {out}.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
