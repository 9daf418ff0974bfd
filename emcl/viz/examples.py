"""Retrieval examples: for n text queries of a split, key frames of the top-5 videos with their scores and the
ground truth marked; a PNG and an HTML page that links the video files.

    python -m emcl.viz.examples --run runs/demo -n 8 [--split test] [--policy query] [--out DIR] [--overwrite]

Writes ``examples.png``, ``examples.html`` and ``examples.json`` into ``RUN/examples/`` (``--out DIR``
elsewhere; never into the run folder itself); the folder is locked while the command works, and earlier
results there are replaced only with ``--overwrite``. The run must be an EMCL-Net one. Queries are n
captions spread evenly over the split (``--queries 0,17,42`` picks them). Scores are the model's cosine scores
under the run's evaluation policy (``eval_block``, or ``--policy``), computed over the whole split as in
the evaluation. Key frames are three of the clip's sampled frames (first, middle, last), decoded from the
video file at ``--thumb_size`` pixels when it can be read, else taken from the run's frame source.
"""

from __future__ import annotations

import argparse
import base64
import html
import logging
import os
import textwrap
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emcl.errors import UserError, cli_main
from emcl.fileio import atomic_write, save_json
from emcl.train.config import positive_int
from emcl.viz import figure_output, load_figure_run, run_parser, split_features

log = logging.getLogger("emcl.viz")


def pick_queries(num_captions: int, n: int) -> list[int]:
    """``n`` caption indices spread evenly over ``[0, num_captions)`` (all of them when fewer)."""
    if n >= num_captions:
        return list(range(num_captions))
    return sorted({int(round(x)) for x in np.linspace(0, num_captions - 1, n)})


def top_k(sim: torch.Tensor, queries: list[int], gt: list[int], k: int = 5) -> list[dict[str, Any]]:
    """For each query row: the top-k columns and scores, and the rank of the ground-truth column (1-based,
    1 + the number of strictly higher scores, as the metrics count it)."""
    out = []
    for q in queries:
        row = sim[q]
        scores, idx = row.topk(min(k, row.numel()))
        rank = int((row > row[gt[q]]).sum()) + 1
        out.append({"query": q, "videos": idx.tolist(), "scores": scores.tolist(), "gt": gt[q],
                    "gt_rank": rank, "gt_score": float(row[gt[q]])})
    return out


def strip(frames: torch.Tensor, mask: torch.Tensor, n: int = 3, gap: int = 2) -> np.ndarray:
    """``n`` evenly spaced real frames of a clip side by side: (S, n*S + (n-1)*gap, 3) uint8."""
    real = int(mask.sum())
    if real == 0:
        s = frames.shape[-1]
        return np.full((s, s, 3), 128, np.uint8)
    pick = sorted({int(round(x)) for x in np.linspace(0, real - 1, min(n, real))})
    imgs = [frames[i].permute(1, 2, 0).cpu().numpy() for i in pick]
    s = imgs[0].shape[0]
    sep = np.full((s, gap, 3), 255, np.uint8)
    parts: list[np.ndarray] = []
    for img in imgs:
        parts += [img, sep]
    return np.concatenate(parts[:-1], axis=1)


class KeyFrames:
    """Key-frame strips of a run's videos: from the file at ``size`` px, else from the run's frame source."""

    def __init__(self, run: Any, split: Any, size: int) -> None:
        from emcl.data.sources import VideoSource

        cfg = run.cfg
        self.split, self.size = split, size
        self.source = run.video_source()
        self.files = None
        self._memo: dict[str, np.ndarray] = {}
        if getattr(cfg, "video_path", None):
            self.files = VideoSource(cfg.video_path, framerate=cfg.video_framerate, max_frames=cfg.max_frames,
                                     size=size, backend=cfg.decode_backend,
                                     any_extension=getattr(cfg, "datatype", "") == "msvd")

    def path(self, video_id: str) -> str | None:
        from emcl.data.video import VideoError

        if self.files is None:
            return None
        try:
            return self.files.path_for(video_id)
        except VideoError:
            return None

    def __call__(self, video_id: str) -> np.ndarray:
        if video_id not in self._memo:
            self._memo[video_id] = self._load(video_id)
        return self._memo[video_id]

    def _load(self, video_id: str) -> np.ndarray:
        from emcl.data.video import VideoError

        start, end = (self.split.windows or {}).get(video_id, (None, None))
        for src in (self.files, self.source):
            if src is None:
                continue
            try:
                return strip(*src.load(video_id, start, end))
            except VideoError as e:
                log.warning("key frames of %s: %s", video_id, e)
        return np.full((self.size, self.size, 3), 128, np.uint8)


def draw_examples(rows: list[dict[str, Any]], captions: list[str], video_ids: list[str], frames: Any,
                  path: str | Path, title: str = "") -> None:
    """The grid: one row per query (caption on the left), the top-k videos' key frames with scores."""
    from emcl.viz.plot import GT_COLOR, MISS_COLOR, figure, save_png

    k = max(len(r["videos"]) for r in rows)
    fig, axes = figure(len(rows), k + 1, size=(2.3 * k + 2.8, 1.25 * len(rows) + 0.6),
                       gridspec_kw={"width_ratios": [1.5] + [1.0] * k})
    for r, ax_row in zip(rows, axes):
        cap = ax_row[0]
        cap.axis("off")
        wrapped = "\n".join(textwrap.wrap(captions[r["query"]], 28)[:4])
        rank = f"ground truth at rank {r['gt_rank']}"
        if r["gt_rank"] > k:
            rank += f" ({r['gt_score']:.3f})"
        cap.text(0.0, 0.5, f"\u201c{wrapped}\u201d\n{rank}", ha="left", va="center", fontsize=8,
                 transform=cap.transAxes)
        for j, ax in enumerate(ax_row[1:]):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            if j >= len(r["videos"]):
                ax.axis("off")
                continue
            v = r["videos"][j]
            ax.imshow(frames(video_ids[v]))
            hit = v == r["gt"]
            for side in ax.spines.values():
                side.set_visible(True)
                side.set_color(GT_COLOR if hit else MISS_COLOR)
                side.set_linewidth(3 if hit else 0.8)
            label = f"#{j + 1}  {r['scores'][j]:.3f}" + ("  \u2713 GT" if hit else "")
            ax.set_title(label, fontsize=8, color=GT_COLOR if hit else "black",
                         fontweight="bold" if hit else "normal")
            ax.set_xlabel(video_ids[v], fontsize=6)
    if title:
        fig.suptitle(title)
    save_png(fig, path)


def _data_uri(img: np.ndarray) -> str:
    from emcl.viz.plot import image_png_bytes

    return "data:image/png;base64," + base64.b64encode(image_png_bytes(img)).decode()


def write_html(rows: list[dict[str, Any]], captions: list[str], video_ids: list[str], frames: KeyFrames,
               path: str | Path, title: str, png_name: str) -> None:
    """A self-contained page: per query its top-k videos (thumbnail, link to the file, score, GT mark)."""
    path = Path(path)
    e = html.escape
    out = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(title)}</title><style>body{{font-family:sans-serif;margin:1.5em}}"
        "table{border-collapse:collapse;margin-bottom:1.2em}td{padding:4px 8px;text-align:center;"
        "vertical-align:top;font-size:13px}td.gt{outline:3px solid #1a9641}img{image-rendering:pixelated;"
        "height:72px}.cap{text-align:left;max-width:16em}</style></head><body>",
        f"<h1>{e(title)}</h1><p><img src='{e(png_name)}' style='height:auto;max-width:100%'></p>",
    ]
    for r in rows:
        out.append(f"<table><tr><td class='cap'><b>\u201c{e(captions[r['query']])}\u201d</b><br>"
                   f"ground truth: {e(video_ids[r['gt']])}, rank {r['gt_rank']}</td>")
        for j, v in enumerate(r["videos"]):
            vid = video_ids[v]
            file = frames.path(vid)
            name = e(vid)
            if file is not None:
                rel = os.path.relpath(os.path.abspath(file), path.parent.resolve())
                name = f"<a href='{e(urllib.parse.quote(rel.replace(os.sep, '/')))}'>{e(vid)}</a>"
            gt = " class='gt'" if v == r["gt"] else ""
            mark = " &#10003; ground truth" if v == r["gt"] else ""
            out.append(f"<td{gt}><img src='{_data_uri(frames(vid))}'><br>#{j + 1} {name}<br>"
                       f"score {r['scores'][j]:.3f}{mark}</td>")
        out.append("</tr></table>")
    out.append("</body></html>\n")
    atomic_write(path, lambda fh: fh.write("\n".join(out).encode()))


#: What the command writes into its folder: ``--overwrite`` replaces these, and only these.
OWN_FILES = ("examples.png", "examples.html", "examples.json", ".*.tmp")


def build_parser() -> argparse.ArgumentParser:
    p = run_parser(__doc__)
    p.add_argument("-n", type=positive_int, default=8, help="number of text queries")
    p.add_argument("-k", type=positive_int, default=5, help="videos shown per query")
    p.add_argument("--queries", default=None, help="comma-separated caption indices instead of -n")
    p.add_argument("--policy", default=None, choices=("paper", "query", "none"),
                   help="evaluation policy of the scores (default: the run's eval_block)")
    p.add_argument("--thumb_size", type=positive_int, default=96, help="key-frame size in pixels")
    return p


def chosen_queries(args: argparse.Namespace, num_captions: int) -> list[int]:
    """``--queries`` checked against the split, else ``-n`` captions spread over it."""
    if not args.queries:
        return pick_queries(num_captions, args.n)
    try:
        queries = [int(x) for x in args.queries.split(",")]
    except ValueError:
        raise UserError(f"--queries {args.queries!r}: expected comma-separated integers") from None
    bad = [q for q in queries if not 0 <= q < num_captions]
    if bad:
        raise UserError(f"--queries: caption index {bad[0]} outside 0..{num_captions - 1}")
    return queries


def summary_of(rows: list[dict[str, Any]], split: Any, args: argparse.Namespace, policy: str,
               num_videos: int) -> dict[str, Any]:
    """``examples.json``: the policy, and per query its caption, ground truth, its rank and the top k."""
    return {"policy": policy, "split": args.split, "num_videos": num_videos, "k": args.k,
            "hits_at_k": sum(r["gt_rank"] <= args.k for r in rows), "queries": [
                {"caption": split.captions[r["query"]], "caption_index": r["query"],
                 "ground_truth": split.video_ids[r["gt"]], "gt_rank": r["gt_rank"],
                 "top": [{"video_id": split.video_ids[v], "score": s}
                         for v, s in zip(r["videos"], r["scores"])]} for r in rows]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Score the split and write ``examples.png``, ``examples.html`` and ``examples.json`` into the
    command's folder (``RUN/examples/`` unless ``--out``)."""
    from emcl.train.runs import similarity

    args = build_parser().parse_args(argv)
    run = load_figure_run(args)
    with figure_output(args, run, "examples", OWN_FILES) as claim:
        loaded = split_features(args, run, claim.folder)
        split, out, (t, f, m, ok) = loaded.split, loaded.out, loaded.features
        if not bool(ok.all()):
            raise UserError(f"{int((~ok).sum())} video(s) of split {args.split} could not be read")
        policy = args.policy or getattr(run.cfg, "eval_block", "query")
        queries = chosen_queries(args, len(split.captions))
        sim = similarity(run, t, f, m, policy).cpu()
        rows = top_k(sim, queries, list(split.caption_video), args.k)
        title = (f"{loaded.name}: {split.datatype}/{args.split}, top {args.k} of {sim.shape[1]} videos "
                 f"(policy {policy})")
        frames = KeyFrames(run, split, args.thumb_size)
        claim.clear()
        draw_examples(rows, split.captions, split.video_ids, frames, out / "examples.png", title)
        write_html(rows, split.captions, split.video_ids, frames, out / "examples.html", title,
                   "examples.png")
        summary = summary_of(rows, split, args, policy, int(sim.shape[1]))
        save_json(summary, out / "examples.json")
    print(f"{summary['hits_at_k']}/{len(rows)} queries have their ground truth in the top {args.k}")
    print(f"wrote {out / 'examples.png'}, {out / 'examples.html'} and {out / 'examples.json'}")
    return summary


if __name__ == "__main__":
    cli_main(main)
