"""The sweep plot of the inference module: sensitivity to K, T, lambda, beta and to the mu draw."""

from __future__ import annotations

from pathlib import Path
from typing import Any

_AXES = (
    ("K", "K (bases)", False),
    ("T", "T (EM iterations)", False),
    ("lamd", "lambda", True),
    ("beta", "beta", False),
)


def plot_sweep(
    rows: list[dict[str, Any]], base, summary: dict[str, Any], path: str | Path, title: str = ""
) -> Path:
    """Six panels, written atomically as PNG: t2v/v2t R@1 against K, T, lambda, beta (others at ``base``),
    the t2v R@1 gain of every mu seed against its number of '+' signs (upstream init; the gaussian init's
    seeds beside it), and a text summary. Dashed lines: without EMCL."""
    from emcl.viz.plot import figure, save_png

    none = next(r for r in rows if r["axis"] == "none")
    fig, axes = figure(2, 3, size=(15, 8.5))
    for ax, (key, label, log_x) in zip(axes.flat, _AXES):
        _axis_panel(ax, rows, none, base, key, label, log_x)
    axes.flat[0].legend(fontsize=8)
    _seed_panel(axes.flat[4], rows, base)
    _summary_panel(axes.flat[5], none, base, summary)
    fig.suptitle(title or "EMCL inference sweep")
    return save_png(fig, path, dpi=110)


def _axis_panel(ax, rows: list[dict[str, Any]], none: dict[str, Any], base, key: str, label: str,
                log_x: bool) -> None:
    """R@1 with EMCL against one setting, the others at ``base``; dashed: without EMCL."""
    pts = sorted((r[key], r["t2v_R1"], r["v2t_R1"]) for r in rows if r["axis"] == key)
    if pts:
        xs, t2v, v2t = zip(*pts)
        ax.plot(xs, t2v, "o-", color="C0", label="t2v R@1 with EMCL")
        ax.plot(xs, v2t, "s-", color="C1", label="v2t R@1 with EMCL")
    ax.axhline(none["t2v_R1"], color="C0", ls="--", lw=1, label="t2v R@1 without")
    ax.axhline(none["v2t_R1"], color="C1", ls="--", lw=1, label="v2t R@1 without")
    ax.axvline(getattr(base, key), color="grey", ls=":", lw=1)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(label + f" (default {getattr(base, key):g})")
    ax.set_ylabel("R@1 (%)")
    ax.grid(alpha=0.3)


def _seed_panel(ax, rows: list[dict[str, Any]], base) -> None:
    """The t2v R@1 gain of every mu draw: upstream seeds by their '+' count, gaussian seeds and linspace
    beside them."""
    ups = [r for r in rows if r["axis"] == "seed_upstream"]
    gau = [r for r in rows if r["axis"] == "seed_gaussian"]
    if ups:
        ax.scatter(
            [r["mu_plus"] for r in ups],
            [r["d_t2v_R1"] for r in ups],
            color="C0",
            alpha=0.6,
            label=f"upstream (+-1) mu, {len(ups)} seeds",
        )
        mine = [r for r in ups if r["seed"] == base.seed]
        if mine:
            ax.scatter(
                [mine[0]["mu_plus"]],
                [mine[0]["d_t2v_R1"]],
                marker="*",
                s=250,
                color="C3",
                zorder=3,
                label=f"seed {base.seed}",
            )
    if gau:
        x = base.K + 1.5
        ax.scatter(
            [x] * len(gau),
            [r["d_t2v_R1"] for r in gau],
            color="C2",
            alpha=0.6,
            label=f"gaussian mu, {len(gau)} seeds (at x={x:g})",
        )
    lin = [r for r in rows if r["axis"] == "init_linspace"]
    if lin:
        ax.scatter([base.K + 2.5], [lin[0]["d_t2v_R1"]], marker="D", color="C4", label="linspace mu")
    ax.axhline(0, color="black", lw=1)
    ax.set_xlabel(f"number of '+' entries in mu (of K={base.K})")
    ax.set_ylabel("t2v R@1 gain over no EMCL (points)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _summary_panel(ax, none: dict[str, Any], base, summary: dict[str, Any]) -> None:
    ax.axis("off")
    lines = [f"without EMCL: t2v R@1 {none['t2v_R1']:.1f}, v2t R@1 {none['v2t_R1']:.1f}"]
    if "run_seed_d_t2v_R1" in summary:
        lines.append(f"defaults (seed {base.seed}): t2v R@1 gain {summary['run_seed_d_t2v_R1']:+.2f}")
    for init in ("upstream", "gaussian"):
        s = summary.get(f"seeds_{init}")
        if s:
            lines.append(
                f"{init} mu over {s['n']} seeds: gain {s['mean_d_t2v_R1']:+.2f} +- {s['std_d_t2v_R1']:.2f}"
            )
            lines.append(
                f"   min {s['min_d_t2v_R1']:+.2f}, max {s['max_d_t2v_R1']:+.2f}, "
                f"{100 * s['share_positive']:.0f}% of seeds > 0"
            )
    ax.text(
        0.0,
        1.0,
        "\n".join(lines),
        va="top",
        ha="left",
        family="monospace",
        fontsize=9,
        transform=ax.transAxes,
    )
