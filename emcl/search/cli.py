"""``python -m emcl.search {index,query,eval}``: the command line (its help is :mod:`emcl.search`'s)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

from emcl.errors import UserError
from emcl.search.build import build_index
from emcl.search.index import Index, evaluate, query


def build_parser() -> argparse.ArgumentParser:
    import emcl.search

    p = argparse.ArgumentParser(prog="python -m emcl.search", description=emcl.search.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    ix = sub.add_parser("index", help="embed a folder of videos")
    ix.add_argument("videos_dir")
    ix.add_argument("--checkpoint", required=True, help="EMCL-Net checkpoint (holds its config)")
    ix.add_argument("--config", default=None, help="YAML whose settings override the checkpoint's config")
    ix.add_argument("--out", required=True, help="index folder to write")
    ix.add_argument("--frame_cache", default="auto", help="auto (the run's, if it fits), none, or a path")
    ix.add_argument("--batch_size", type=int, default=32)
    ix.add_argument("--workers", type=int, default=0, help="decoding worker processes")
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
        sp.add_argument("-k", type=int, default=5)
        sp.add_argument("--emcl", action="store_true", help="re-score the top candidates with EMCL")
        sp.add_argument("--rerank", type=int, default=100, help="candidates re-scored with --emcl")
        sp.add_argument("--json", action="store_true", help="print JSON")
    for sp in (ix, q, ev):
        sp.add_argument("--device", default="cpu")
        sp.add_argument("--debug", action="store_true")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    if getattr(args, "k", 1) < 1:
        raise UserError(f"-k must be at least 1, got {args.k}")
    if args.command == "index":
        meta = build_index(args.videos_dir, args.checkpoint, args.out, args.config, args.device,
                           args.batch_size, args.workers, args.frame_cache)
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

