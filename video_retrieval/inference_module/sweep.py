"""``--sweep``: how much of EMCL's effect at inference depends on K, T, lambda, beta and the mu draw.

One-at-a-time sweeps around the run's setting, then mu seeds (upstream and gaussian init) and the
deterministic linspace init; every point is scored on the same embeddings. Rank 0 writes ``sweep.csv``
and ``sweep.png``; the summary (the spread of the t2v R@1 gain over mu seeds) goes into ``metrics.json``.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from emcl import dist
from emcl.fileio import save_bytes
from emcl.train.config import nonneg_float, nonneg_int, positive_float, positive_int
from emcl.train.flags import flag, group

from .embeddings import Embeddings
from .report import DIRECTIONS, TABLE_KEYS
from .scores import EMSettings, evaluate_settings

log = logging.getLogger("emcl.inference")

SWEEP_DEFAULTS = {
    "K": "1,2,3,4,5,7,10,16,32",
    "T": "1,2,3,5,7,10,15,20",
    "lamd": "0.01,0.03,0.05,0.1,0.2,0.5,1",
    "beta": "0,0.5,1,2,3,4,6,8",
}


def values(text: str, convert: Callable[[str], Any]) -> list[Any]:
    """Comma-separated values, each checked by ``convert`` (e.g. :func:`positive_int`)."""
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected comma-separated values ({convert.allowed}), got {text!r}")
    return [convert(x) for x in items]


def value_list(convert: Callable[[str], Any]) -> Callable[[str], str]:
    """argparse type of a sweep list: every value checked at parse time (``--sweep_K 0`` stops before the
    output folder is touched or anything is scored); the flag keeps its text, so that a saved
    ``config.yaml`` reads back."""

    def parse(text: str) -> str:
        return ",".join(str(v) for v in values(text, convert))

    parse.__name__ = f"list of {convert.__name__}"
    return parse


SWEEP_TYPES = {"K": positive_int, "T": positive_int, "lamd": positive_float, "beta": nonneg_float}
SWEEP = group(
    "sweep",
    flag("--sweep", action="store_true", help="also sweep K, T, lambda, beta and mu seeds"),
    *(flag(f"--sweep_{key}", type=value_list(SWEEP_TYPES[key]), default=value,
           help=f"comma-separated {key} values ({SWEEP_TYPES[key].allowed})")
      for key, value in SWEEP_DEFAULTS.items()),
    flag(
        "--sweep_seeds",
        type=nonneg_int,
        default=32,
        help="mu seeds 0..N-1 and the run's --seed (upstream, gaussian)",
    ),
)


def sweep_settings(cfg: argparse.Namespace, base: EMSettings) -> list[tuple[str, EMSettings]]:
    """One-at-a-time sweeps around ``base`` over K, T, lambda, beta (lists checked at parse time); then mu
    seeds (upstream and gaussian init) and the deterministic linspace init."""
    runs: list[tuple[str, EMSettings]] = []
    for axis in ("K", "T", "lamd", "beta"):
        axis_values = values(getattr(cfg, f"sweep_{axis}"), SWEEP_TYPES[axis])
        runs += [(axis, replace(base, **{axis: v})) for v in axis_values]
    seeds = list(range(cfg.sweep_seeds))
    if cfg.sweep_seeds and base.seed not in seeds:  # the run's own draw, marked in the plot
        seeds.append(base.seed)
    for init in ("upstream", "gaussian"):
        for s in seeds:
            runs.append((f"seed_{init}", replace(base, init=init, seed=s)))
    runs.append(("init_linspace", replace(base, init="linspace")))
    return runs


def run_sweep(
    cfg: argparse.Namespace, emb: Embeddings, base: EMSettings, without: dict, info: dist.DistInfo, out: Path
) -> dict[str, Any]:
    """Score every sweep setting; rank 0 writes ``sweep.csv`` and ``sweep.png``; returns the summary."""
    none = {"axis": "none", "K": 0, "T": 0, "lamd": 0, "beta": 0, "init": "-", "seed": -1, "mu_plus": -1}
    rows: list[dict[str, Any]] = [{**none, **_flat(without), **_gain(without, without)}]
    t0 = time.perf_counter()
    settings = sweep_settings(cfg, base)
    for i, (axis, em) in enumerate(settings):
        res = evaluate_settings(emb, {axis: em}, cfg, info)[axis]
        plus = em.mu_signs().count("+") if em.init == "upstream" else -1
        rows.append({"axis": axis, **asdict(em), "mu_plus": plus, **_flat(res), **_gain(res, without)})
        if (i + 1) % 10 == 0:
            log.info("sweep %d/%d (%.0f s)", i + 1, len(settings), time.perf_counter() - t0)
    summary = sweep_summary(rows, base)
    if info.is_main:
        write_csv(rows, out / "sweep.csv")
        from .plots import plot_sweep

        plot_sweep(rows, base, summary, out / "sweep.png", title=_plot_title(emb, cfg))
        log.info("sweep: %d settings in %.0f s -> %s, %s", len(settings), time.perf_counter() - t0,
                 out / "sweep.csv", out / "sweep.png")
    return summary


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """``sweep.csv``: one row per setting (the first without EMCL), floats with 4 decimals (atomic)."""
    header = ["axis", "K", "T", "lamd", "beta", "init", "seed", "mu_plus"]
    header += [f"{d}_{k}" for d in DIRECTIONS for k in TABLE_KEYS]
    header += ["d_t2v_R1", "d_v2t_R1", "d_t2v_R5", "d_v2t_R5"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    save_bytes(buf.getvalue().encode(), path)


def _flat(res: dict) -> dict[str, float]:
    return {f"{d}_{k}": res[d][k] for d in DIRECTIONS for k in TABLE_KEYS}


def _gain(res: dict, without: dict) -> dict[str, float]:
    return {f"d_{d}_{k}": res[d][k] - without[d][k] for d in ("t2v", "v2t") for k in ("R1", "R5")}


def _plot_title(emb: Embeddings, cfg: argparse.Namespace) -> str:
    src = emb.info.get("source", "?")
    return (
        f"EMCL at inference: {src}, {emb.num_texts} texts x {emb.num_videos} videos, policy {cfg.eval_block}"
        + (f" ({cfg.eval_block_size}-blocks)" if cfg.eval_block == "paper" else "")
    )


def sweep_summary(rows: list[dict[str, Any]], base: EMSettings) -> dict[str, Any]:
    """How much of the gain is the mu draw: the spread of the t2v R@1 gain over seeds, per init."""
    out: dict[str, Any] = {}
    for init in ("upstream", "gaussian"):
        gains = torch.tensor(
            [r["d_t2v_R1"] for r in rows if r["axis"] == f"seed_{init}"], dtype=torch.float64
        )
        if len(gains):
            out[f"seeds_{init}"] = {
                "n": len(gains),
                "mean_d_t2v_R1": float(gains.mean()),
                "std_d_t2v_R1": float(gains.std()) if len(gains) > 1 else 0.0,
                "min_d_t2v_R1": float(gains.min()),
                "max_d_t2v_R1": float(gains.max()),
                "share_positive": float((gains > 0).double().mean()),
            }
    base_rows = [r for r in rows if r["axis"] == "seed_upstream" and r["seed"] == base.seed]
    if base_rows:
        out["run_seed_d_t2v_R1"] = base_rows[0]["d_t2v_R1"]
    by_plus: dict[int, list[float]] = {}
    for r in rows:
        if r["axis"] == "seed_upstream":
            by_plus.setdefault(int(r["mu_plus"]), []).append(r["d_t2v_R1"])
    out["upstream_d_t2v_R1_by_plus_count"] = {
        str(k): sorted(set(round(x, 4) for x in v)) for k, v in sorted(by_plus.items())
    }
    return out
