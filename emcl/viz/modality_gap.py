"""The modality-gap figure: text and video embeddings of a split in 2-D, without and with EMCL.

    python -m emcl.viz.modality_gap --run runs/demo
    python -m emcl.viz.modality_gap --checkpoint CK --config C --split test [--out DIR] [--overwrite]

Writes ``modality_gap.png`` and ``modality_gap.json`` into ``RUN/modality_gap/`` (``--out DIR`` elsewhere;
never into the run folder itself) and prints the gap. The folder is locked while the command works, and
earlier results there are replaced only with ``--overwrite``. The run must be an EMCL-Net one.

What is plotted (EMCL-Net runs):

- **Texts**: one caption per video of the split (its first caption), so both modalities have the same
  count; the text embedding is the model's text feature ``t`` (projected EOT token).
- **Videos**: EMCL-Net scores a video through a text-conditioned pooling of its frames, so there is no
  single video vector; the figure uses the text-independent one, the masked mean of the per-frame features
  (after temporal aggregation): ``v = sum_k m_k f_k / sum_k m_k``. Unreadable videos (and their captions)
  are left out.
- **Without EMCL**: ``X = [videos; texts]`` (2V x D), each row L2-normalised.
- **With EMCL**: the run's trained layer applied once to that same ``X``: ``Y = X + beta * R`` with
  ``R`` the EM reconstruction from the run's momentum state ``mu`` (K, T, lambda, beta of the run), then
  each row L2-normalised, as the model normalises after EMCL. A run trained without EMCL gets a fresh
  layer from its settings (said in the JSON).
- ``emcl_relative_change`` (diagnostic): the mean of ``|beta R_i| / |X_i|``, how far EMCL moves a row
  relative to its length. ``R`` is built from normalised bases and assignments, so its size does not grow
  with the features': features with large norms move little.
- **2-D view**: one PCA (top two principal directions) fitted on both conditions together, so the two
  panels share the projection and the axes.

The measured gap (in the full D dimensions, not the 2-D view), for each condition:

- ``centroid_distance``: the Euclidean distance between the mean text and the mean video embedding
  (rows are unit vectors, so it lies in [0, 2]).
- ``probe_accuracy``: a linear probe separating the modalities: L2-regularised logistic regression
  (weight 1e-3 on the squared weights, fitted by Newton's method in float64) trained on a random half of each
  modality's rows and evaluated on the other half; reported as balanced accuracy (the mean of the two
  modalities' accuracies), so chance is 0.5 and 1.0 means the modalities are linearly separable.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from emcl.em import EMCL, em_reconstruct
from emcl.errors import UserError, cli_main
from emcl.fileio import save_json
from emcl.train.config import positive_int
from emcl.viz import figure_output, load_figure_run, run_parser, split_features

Pair = tuple[torch.Tensor, torch.Tensor]  # (texts, videos)

log = logging.getLogger("emcl.viz")


# ------------------------------------------------------------------------------------------- numbers
def video_vectors(f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean of per-frame features: (V, T, D) and (V, T) -> (V, D), float32."""
    m = mask.to(torch.float32)[..., None]
    return (f.float() * m).sum(-2) / m.sum(-2).clamp(min=1.0)


def apply_emcl(x: torch.Tensor, emcl: EMCL) -> torch.Tensor:
    """``x + beta * R`` with the layer's state ``mu`` (no update), float32, autocast off."""
    with torch.autocast(x.device.type, enabled=False):
        x = x.float()
        r, _ = em_reconstruct(x, emcl.mu, emcl.stage_num, emcl.lamd, emcl.lamd_mode)
        return x + emcl.beta * r


def gap_embeddings(t: torch.Tensor, v: torch.Tensor, emcl: EMCL) -> dict[str, Pair]:
    """(texts, videos) without and with EMCL over ``X = [v; t]``, rows L2-normalised."""
    x = torch.cat([v.float(), t.float()])
    n = v.shape[0]
    plain = F.normalize(x, dim=-1)
    with_emcl = F.normalize(apply_emcl(x, emcl), dim=-1)
    return {
        "without_emcl": (plain[n:], plain[:n]),
        "with_emcl": (with_emcl[n:], with_emcl[:n]),
    }


def centroid_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Euclidean distance between the means of the rows of ``a`` (N, D) and ``b`` (M, D)."""
    return float((a.double().mean(0) - b.double().mean(0)).norm())


def probe_accuracy(a: torch.Tensor, b: torch.Tensor, seed: int = 0, l2: float = 1e-3) -> float:
    """Held-out balanced accuracy of a logistic-regression probe separating rows of ``a`` from rows of ``b``.

    Each set is split at random (``seed``) into halves; the probe (weights + bias, penalty ``l2 * |w|^2``,
    Newton's method in float64) is fitted on the first halves and scored on the second: the mean of the
    accuracy on ``a``'s and on ``b``'s held-out rows. Needs at least 2 rows per set.
    """
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"probe needs at least 2 rows per modality, got {a.shape[0]} and {b.shape[0]}")
    g = torch.Generator().manual_seed(seed)

    def halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        perm = torch.randperm(x.shape[0], generator=g)
        k = x.shape[0] // 2
        return x[perm[:k]].double(), x[perm[k:]].double()

    a_tr, a_te = halves(a)
    b_tr, b_te = halves(b)
    x = torch.cat([a_tr, b_tr])
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)  # bias as the last weight
    y = torch.cat([torch.ones(len(a_tr)), torch.zeros(len(b_tr))]).double()
    # balanced classes in the loss, so the probe cannot win by predicting the larger set
    wts = torch.cat([torch.full((len(a_tr),), 0.5 / len(a_tr)), torch.full((len(b_tr),), 0.5 / len(b_tr))])
    wts = wts.double()
    pen = torch.full((x.shape[1],), l2, dtype=torch.float64)
    pen[-1] = 1e-12  # the bias is not penalised (a tiny ridge keeps the Hessian invertible)

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        nll = F.binary_cross_entropy_with_logits(x @ w, y, reduction="none")
        return (nll * wts).sum() + (pen * w * w).sum()

    # Newton's method with backtracking: the objective is strictly convex, so this converges to its minimum
    w = torch.zeros(x.shape[1], dtype=torch.float64)
    loss = loss_of(w)
    for _ in range(100):
        p = torch.sigmoid(x @ w)
        grad = x.T @ (wts * (p - y)) + 2 * pen * w
        hess = (x.T * (wts * p * (1 - p))) @ x + torch.diag(2 * pen)
        step = torch.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-8:
            new = loss_of(w - t * step)
            if new <= loss - 1e-4 * t * float(grad @ step):
                break
            t *= 0.5
        w, loss = w - t * step, new
        if float(grad.abs().max()) < 1e-10 or t <= 1e-8:
            break
    bias, w = w[-1], w[:-1]
    acc_a = ((a_te @ w + bias) > 0).double().mean()
    acc_b = ((b_te @ w + bias) <= 0).double().mean()
    return float((acc_a + acc_b) / 2)


def pca_2d(groups: list[torch.Tensor]) -> tuple[list[np.ndarray], list[float]]:
    """One PCA fitted on all ``groups`` stacked; each group projected on the top two directions.

    Returns the projections ((N_i, 2) arrays) and the fraction of the variance of the stacked data that
    each of the two directions explains.
    """
    x = torch.cat([g.double() for g in groups])
    mean = x.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    basis = vh[:2].T
    if basis.shape[1] < 2:  # D == 1: pad a zero direction
        basis = torch.cat([basis, torch.zeros_like(basis)], dim=1)
    # fix the sign of each direction so the figure does not flip between runs
    signs = torch.sign(basis[basis.abs().argmax(0), torch.arange(2)])
    basis = basis * torch.where(signs == 0, torch.ones_like(signs), signs)
    var = s.pow(2)
    frac = (var[:2] / var.sum().clamp(min=1e-300)).tolist() + [0.0] * max(0, 2 - len(var))
    return [((g.double() - mean) @ basis).numpy() for g in groups], [float(f) for f in frac[:2]]


def measure_gap(emb: dict[str, Pair], seed: int = 0) -> dict[str, dict[str, float]]:
    """``centroid_distance`` and ``probe_accuracy``, each ``without_emcl`` and ``with_emcl``."""
    return {
        "centroid_distance": {k: centroid_distance(t, v) for k, (t, v) in emb.items()},
        "probe_accuracy": {k: probe_accuracy(t, v, seed=seed) for k, (t, v) in emb.items()},
    }


# -------------------------------------------------------------------------------------------- figure
def draw_gap(emb: dict[str, Pair], gap: dict[str, dict[str, float]],
             path: str | Path, title: str = "") -> dict[str, Any]:
    """The side-by-side PCA figure; returns the projection's explained-variance fractions."""
    from emcl.viz.plot import TEXT_COLOR, VIDEO_COLOR, figure, save_png

    keys = ["without_emcl", "with_emcl"]
    groups = [x for k in keys for x in emb[k]]  # t0, v0, t1, v1
    proj, frac = pca_2d(groups)
    fig, axes = figure(1, 2, size=(10, 4.6), sharex=True, sharey=True)
    labels = {"without_emcl": "without EMCL", "with_emcl": "with EMCL"}
    for i, (ax, key) in enumerate(zip(axes[0], keys)):
        pt, pv = proj[2 * i], proj[2 * i + 1]
        ax.scatter(pv[:, 0], pv[:, 1], s=9, alpha=0.55, color=VIDEO_COLOR, marker="^", linewidths=0,
                   label=f"video ({len(pv)})")
        ax.scatter(pt[:, 0], pt[:, 1], s=9, alpha=0.55, color=TEXT_COLOR, marker="o", linewidths=0,
                   label=f"text ({len(pt)})")
        ct, cv = pt.mean(0), pv.mean(0)
        ax.plot([ct[0], cv[0]], [ct[1], cv[1]], color="black", lw=1.0, zorder=3)
        for c, col in ((cv, VIDEO_COLOR), (ct, TEXT_COLOR)):
            ax.scatter([c[0]], [c[1]], s=120, marker="X", color=col, edgecolors="black", linewidths=0.8,
                       zorder=4)
        ax.set_title(
            f"{labels[key]}\ncentroid distance {gap['centroid_distance'][key]:.3f}, "
            f"probe accuracy {100 * gap['probe_accuracy'][key]:.1f}%"
        )
        ax.set_xlabel(f"PC 1 ({100 * frac[0]:.0f}% of variance)")
        ax.legend(loc="best", markerscale=2)
    axes[0][0].set_ylabel(f"PC 2 ({100 * frac[1]:.0f}% of variance)")
    if title:
        fig.suptitle(title)
    save_png(fig, path)
    return {"pca_explained_variance": frac}


# ---------------------------------------------------------------------------------------------- main
def pick_captions(caption_video: list[int], valid: list[bool]) -> tuple[list[int], list[int]]:
    """For each valid video with a caption, (its first caption, the video index)."""
    first: dict[int, int] = {}
    for c, v in enumerate(caption_video):
        if valid[v] and v not in first:
            first[v] = c
    vids = sorted(first)
    return [first[v] for v in vids], vids


#: What the command writes into its folder: ``--overwrite`` replaces these, and only these.
OWN_FILES = ("modality_gap.png", "modality_gap.json", ".*.tmp")

DEFINITIONS = {
    "text": "text feature (projected EOT), first caption of each video",
    "video": "masked mean of the per-frame features after temporal aggregation",
    "without_emcl": "rows of [videos; texts] L2-normalised",
    "with_emcl": "X + beta * EM reconstruction of X = [videos; texts] with the run's mu, then L2",
    "centroid_distance": "|mean(text) - mean(video)| in D dimensions",
    "emcl_relative_change": "mean over rows of |beta * R_i| / |X_i| (before normalisation)",
    "probe_accuracy": "balanced held-out accuracy of L2-regularised logistic regression (1e-3), "
                      "trained on a random half of each modality, tested on the other half",
}


def build_parser() -> argparse.ArgumentParser:
    p = run_parser(__doc__)
    p.add_argument("--max_videos", type=positive_int, default=2000,
                   help="use at most this many videos (the first; at least 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the probe's train/test halves")
    return p


def run_layer(run: Any) -> tuple[EMCL, str]:
    """The run's EMCL layer and what it is; a fresh one from its settings when it was trained without."""
    emcl = getattr(run.model, "emcl", None)
    if emcl is not None:
        return emcl, "trained (the run's mu)"
    cfg = run.cfg
    return (EMCL(k=cfg.centerK, stage_num=cfg.stage_num, momentum=cfg.momentum, lamd=cfg.lamd, beta=cfg.beta,
                 init=cfg.em_init, seed=cfg.seed),
            "fresh layer from the run's settings (the run was trained without EMCL)")


def measure(args: argparse.Namespace, loaded: Any) -> dict[str, Any]:
    """The gap of a loaded split: embeddings (``emb``), the numbers (``gap``), EMCL's relative change and
    layer, and the counts. Refuses a split with fewer than 4 usable videos and a non-finite gap."""
    split, (t, f, m, ok) = loaded.split, loaded.features
    captions, vids = pick_captions(list(split.caption_video), ok.cpu().tolist())
    if len(vids) < 4:
        raise UserError(f"split {args.split} has {len(vids)} usable video(s) with captions; need at least 4")
    captions, vids = captions[: args.max_videos], vids[: args.max_videos]
    t = t[torch.tensor(captions)].cpu()
    v = video_vectors(f[torch.tensor(vids)], m[torch.tensor(vids)]).cpu()
    emcl, emcl_state = run_layer(loaded.run)
    emb = gap_embeddings(t, v, emcl.cpu())
    gap = measure_gap(emb, seed=args.seed)
    if not all(math.isfinite(x) for d in gap.values() for x in d.values()):
        raise UserError("the measured gap is not finite (NaN features?)")
    x = torch.cat([v, t]).float()
    change = float(((apply_emcl(x, emcl) - x).norm(dim=-1) / x.norm(dim=-1).clamp(min=1e-12)).mean())
    return {"emb": emb, "gap": gap, "change": change, "emcl": emcl, "emcl_state": emcl_state,
            "num_videos": len(vids), "num_texts": len(captions)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure the gap and write ``modality_gap.png`` and ``modality_gap.json`` into the command's folder
    (``RUN/modality_gap/`` unless ``--out``)."""
    args = build_parser().parse_args(argv)
    if args.max_videos < 4:
        raise UserError(f"argument --max_videos: {args.max_videos} is out of range (an integer >= 4)")
    run = load_figure_run(args)
    with figure_output(args, run, "modality_gap", OWN_FILES) as claim:
        loaded = split_features(args, run, claim.folder)
        out, m = loaded.out, measure(args, loaded)
        gap, emcl = m["gap"], m["emcl"]
        claim.clear()
        title = (f"{loaded.name}: {loaded.split.datatype}/{args.split}, {m['num_videos']} videos and one "
                 "caption each")
        result = {
            **gap,
            **draw_gap(m["emb"], gap, out / "modality_gap.png", title=title),
            "split": args.split,
            "num_videos": m["num_videos"],
            "num_texts": m["num_texts"],
            "checkpoint": str(run.checkpoint),
            "emcl_relative_change": m["change"],
            "emcl": {"state": m["emcl_state"], "K": emcl.k, "stage_num": emcl.stage_num, "lamd": emcl.lamd,
                     "beta": emcl.beta},
            "definitions": DEFINITIONS,
        }
        save_json(result, out / "modality_gap.json")
    for key in ("without_emcl", "with_emcl"):
        print(f"{key:>13}: centroid distance {gap['centroid_distance'][key]:.4f}, "
              f"probe accuracy {100 * gap['probe_accuracy'][key]:.1f}%")
    print(f"EMCL moves each row by {100 * m['change']:.1f}% of its norm on average (|beta R_i| / |X_i|)")
    print(f"wrote {out / 'modality_gap.png'} and {out / 'modality_gap.json'}")
    return result


if __name__ == "__main__":
    cli_main(main)
