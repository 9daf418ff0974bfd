"""Training curves of a run: loss, learning rate and validation R@1 by epoch, from its ``metrics.json``.

    python -m emcl.viz.curves runs/demo        # writes runs/demo/curves.png

``metrics.json`` holds ``train.history``: one record per epoch with ``epoch``, ``loss``, ``lr`` (the
learning rate at the end of the epoch; a list counts by its last entry) and the selection split's results
under ``val`` (or ``test`` with ``--select_on_test``), of which text-to-video ``t2v.R1`` is drawn.
Missing values leave their panel marked "not recorded"; the run loop calls :func:`draw_curves` at the end
of every run.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("emcl.viz")


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(float(x)):
        return None
    return float(x)


def _lr(rec: dict) -> float | None:
    lr = rec.get("lr")
    if isinstance(lr, list | tuple) and lr:  # one value per parameter group
        lr = lr[-1]
    return _number(lr)


def _r1(rec: dict) -> tuple[str, float] | tuple[None, None]:
    for split in ("val", "test"):
        res = rec.get(split)
        if isinstance(res, dict) and isinstance(res.get("t2v"), dict):
            r1 = _number(res["t2v"].get("R1"))
            if r1 is not None:
                return split, r1
    return None, None


def curve_data(metrics: dict) -> dict[str, Any]:
    """Per-epoch series from a metrics dict: ``epoch``, ``loss``, ``lr``, ``r1`` (None where missing) and
    ``r1_split`` (the split the R@1 values come from)."""
    train = metrics.get("train") if isinstance(metrics, dict) else None
    history = train.get("history") if isinstance(train, dict) else None
    if not isinstance(history, list):
        return {"epoch": [], "loss": [], "lr": [], "r1": [], "r1_split": None}
    epochs, loss, lr, r1, splits = [], [], [], [], set()
    for i, rec in enumerate(history):
        if not isinstance(rec, dict):
            continue
        epochs.append(_number(rec.get("epoch")) or float(i + 1))
        loss.append(_number(rec.get("loss")))
        lr.append(_lr(rec))
        split, value = _r1(rec)
        r1.append(value)
        if split:
            splits.add(split)
    return {"epoch": epochs, "loss": loss, "lr": lr, "r1": r1,
            "r1_split": "/".join(sorted(splits)) if splits else None}


def draw_curves(run_dir: str | Path) -> Path | None:
    """Draw ``run_dir/curves.png`` from ``run_dir/metrics.json``; None (and a log line) when there is no
    training history to draw. Never raises on a malformed file: a figure must not fail a finished run."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("no training curves: cannot read %s: %s", path, e)
        return None
    data = curve_data(metrics)
    if not data["epoch"]:
        log.info("no training curves: %s has no train.history", path)
        return None
    from emcl.viz.plot import LINE_COLORS, figure, save_png

    fig, axes = figure(1, 3, size=(12, 3.4))
    ep = data["epoch"]
    panels = [
        ("loss", "training loss (epoch mean)", "loss", False),
        ("lr", "learning rate (end of epoch)", "lr", True),
        ("r1", f"{data['r1_split'] or 'val'} text-to-video R@1", "R@1 (%)", False),
    ]
    for i, (ax, (key, title, ylabel, log_y)) in enumerate(zip(axes[0], panels)):
        pts = [(e, y) for e, y in zip(ep, data[key]) if y is not None]
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        if not pts:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="gray")
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", ms=3.5, lw=1.5, color=LINE_COLORS[i])
        if log_y and min(ys) > 0:
            ax.set_yscale("log")
        if key == "r1":
            best = max(range(len(ys)), key=ys.__getitem__)
            ax.annotate(f"best {ys[best]:.1f} (epoch {xs[best]:g})", (xs[best], ys[best]),
                        textcoords="offset points", xytext=(4, -14), ha="right", fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(run_dir.name)
    return save_png(fig, run_dir / "curves.png")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m emcl.viz.curves RUN_DIR", file=sys.stderr)
        return 2
    out = draw_curves(args[0])
    if out is None:
        print(f"error: nothing to draw from {Path(args[0]) / 'metrics.json'}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(main())
