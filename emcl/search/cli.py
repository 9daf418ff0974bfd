"""Text-to-video search over a folder of videos with a trained EMCL-Net checkpoint.

    python -m emcl.search index VIDEOS_DIR --checkpoint CK --out INDEX [--overwrite]  # embed every video once
    python -m emcl.search query INDEX "a red ball moves left" -k 5 [--json] [--emcl]
    python -m emcl.search eval INDEX --split test -k 5 [--emcl] [--attributes data/synthetic]  # hit rate

**index** walks ``VIDEOS_DIR`` (every file with a video ending, sub-folders included), samples each clip
as the run did (its ``max_frames``, ``video_framerate``, ``image_size``) and stores the per-frame features
(after temporal aggregation) in ``INDEX/`` (``features.pt`` + ``index.json``). Clips come from the run's
frame cache when it holds them decoded from the same file (size and modification time), else the file is
decoded (``--frame_cache PATH|none`` chooses the cache). A video that cannot be read is named in a
warning, recorded in ``index.json`` under ``failed`` and left out; the rest are indexed.
A video's id is its path under ``VIDEOS_DIR`` without the ending, as it is seen there: videos linked into
the folder (symbolic links to files elsewhere) keep their link's name and path.
``INDEX`` is a folder of its own: the command holds its lock (``INDEX/.run.lock``) while it works, refuses
a folder that already holds an index unless ``--overwrite`` (and one holding a run's results always), and
writes each file atomically, ``index.json`` last. The checkpoint must be an EMCL-Net one: a checkpoint of
another task (question answering, MMT) is refused before anything is written.

**query** encodes the text and scores every indexed video as EMCL-Net does without EMCL
(text-conditioned pooling of the frames, cosine). ``--emcl`` re-scores the ``--rerank`` best candidates
(default 100) with the checkpoint's EMCL layer, EM running once over [the candidates' pooled vectors; the
text] (the ``query`` evaluation policy restricted to the candidates), and ranks them by that score.
The query reports in milliseconds the time of its search (``search``: encoding the text + scoring +
top-k) and of the command (``command``: loading the index and the model included; Python start-up and
importing PyTorch not).

**eval** queries every caption of a split of the run's dataset (``--anno`` and ``--datatype`` for
another annotation folder) against the whole index (``--gallery all``) or only the split's videos
(``--gallery split``) and reports how often the caption's video is among the top k (and R@1/5/10). On
synthetic data, ``--attributes DATA`` (the set's folder, with ``synthetic_attributes.json``) also counts a
video with the same count, colour, shape and motion as the caption's in the top k (``same_content``: a
caption does not always name the background, and clips differ only in positions beyond these
attributes), and one that also has its background (``same_content_and_background``).

The index records the checkpoint (path, size, modification time) and the run's config; ``query`` and
``eval`` load the model from there and refuse an index whose checkpoint has changed since.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

from emcl.errors import OneLineParser
from emcl.search.build import build_index
from emcl.search.index import Index, evaluate, query
from emcl.train.config import nonneg_int, positive_int


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m emcl.search", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    ix = sub.add_parser("index", help="embed a folder of videos")
    ix.add_argument("videos_dir")
    ix.add_argument("--checkpoint", required=True, help="EMCL-Net checkpoint (holds its config)")
    ix.add_argument("--config", default=None, help="YAML whose settings override the checkpoint's config")
    ix.add_argument("--out", required=True, help="index folder to write (a folder of its own)")
    ix.add_argument("--overwrite", action="store_true", help="replace the index already in --out")
    ix.add_argument("--frame_cache", default="auto", help="auto (the run's, if it fits), none, or a path")
    ix.add_argument("--batch_size", type=positive_int, default=32)
    ix.add_argument("--workers", type=nonneg_int, default=0, help="decoding worker processes")
    q = sub.add_parser("query", help="search an index with a text")
    q.add_argument("index")
    q.add_argument("text")
    ev = sub.add_parser("eval", help="hit rate of a split's captions against an index")
    ev.add_argument("index")
    ev.add_argument("--split", default="test")
    ev.add_argument("--anno", default=None, help="annotation folder (default: the run's)")
    ev.add_argument("--datatype", default=None, help="dataset layout of --anno (default: the run's)")
    ev.add_argument("--gallery", default="all", choices=("all", "split"),
                    help="rank against every indexed video, or only the split's")
    ev.add_argument("--attributes", default=None, metavar="DATA",
                    help="synthetic set's folder: also count videos with the caption's video's content")
    for sp in (q, ev):
        sp.add_argument("-k", type=positive_int, default=5)
        sp.add_argument("--emcl", action="store_true", help="re-score the top candidates with EMCL")
        sp.add_argument("--rerank", type=positive_int, default=100, help="candidates re-scored with --emcl")
        sp.add_argument("--json", action="store_true", help="print JSON")
    for sp in (ix, q, ev):
        sp.add_argument("--device", default="cpu")
        sp.add_argument("--debug", action="store_true")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    if args.command == "index":
        meta = build_index(args.videos_dir, args.checkpoint, args.out, args.config, args.device,
                           args.batch_size, args.workers, args.frame_cache, overwrite=args.overwrite)
        n, bad = len(meta["video_ids"]), meta["failed"]
        print(f"indexed {n} video(s) into {args.out} in {meta['seconds']:.1f} s "
              f"({meta['num_from_frame_cache']} from the frame cache)")
        if bad:
            print(f"{len(bad)} video(s) could not be read and were left out: {', '.join(sorted(bad))}",
                  file=sys.stderr)
        return meta
    index = Index(args.index, args.device)
    if args.command == "query":
        res = query(index, args.text, args.k, args.emcl, args.rerank)
        res["timing_ms"]["command"] = round(1e3 * (time.perf_counter() - start), 1)
        if args.json:
            print(json.dumps(res, indent=2))
        else:
            for r in res["results"]:
                print(f"{r['rank']:>3}  {r['score']:.4f}  {r['video_id']}  {r['path']}")
            tm = res["timing_ms"]
            print(f"search {tm['search']:.1f} ms (scoring {tm['score_and_rank']:.1f} ms) over "
                  f"{res['num_videos']} videos", file=sys.stderr)
        return res
    res = evaluate(index, args.split, args.k, args.emcl, args.rerank, args.gallery, args.anno, args.datatype,
                   args.attributes)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        rec = res["recall"]
        print(f"{res['datatype']}/{res['split']}: {res['num_queries']} captions against {res['num_videos']} "
              f"videos ({'EMCL re-scoring' if args.emcl else 'no EMCL'}): ground truth in the top {args.k} "
              f"for {100 * res['hit_rate']:.1f}%; R@1 {rec['R1']:.1f}, R@5 {rec['R5']:.1f}, "
              f"R@10 {rec['R10']:.1f}; {res['ms_per_query']:.2f} ms per query")
        if "hit_rate_same_content" in res:
            print(f"a video with the same count, colour, shape and motion in the top {args.k} for "
                  f"{100 * res['hit_rate_same_content']:.1f}% ("
                  f"{100 * res['hit_rate_same_content_and_background']:.1f}% also the same background)")
    return res

