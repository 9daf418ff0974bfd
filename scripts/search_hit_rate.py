"""Hit rate of a search index on the synthetic data's test captions, counting exact and equivalent videos.

    python scripts/search_hit_rate.py INDEX [--data data/synthetic] [--split test] [-k 5] [--emcl]

For every caption of the split: is its own video among the top k of the whole index (``exact``), and is a
video with the same count, colour, shape and motion among them (``same_content``: a caption does not
always name the background, and clips differ only in positions beyond these attributes)? Also reports
``same_content_and_background``. Prints JSON.
"""

from __future__ import annotations

import argparse
import json

import torch

from emcl.data.synthetic import load_attributes
from emcl.search import Index


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("index")
    p.add_argument("--data", default="data/synthetic", help="the synthetic set (synthetic_attributes.json)")
    p.add_argument("--split", default="test")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--emcl", action="store_true", help="EMCL re-scoring of the top --rerank candidates")
    p.add_argument("--rerank", type=int, default=100)
    args = p.parse_args(argv)
    attrs = load_attributes(args.data)
    index = Index(args.index)
    split = index.run.split(args.split)

    def content(vid: str, background: bool = False) -> tuple:
        a = attrs[vid]
        return (a.count, a.color, a.shape, a.motion) + ((a.background,) if background else ())

    hits = {"exact": 0, "same_content": 0, "same_content_and_background": 0}
    for a in range(0, len(split.captions), 256):
        t = index.encode(split.captions[a:a + 256])
        with torch.no_grad():
            top = index.search(t, args.k, args.emcl, args.rerank)["index"].tolist()
        for c, row in zip(range(a, a + len(t)), top):
            gt = split.video_ids[split.caption_video[c]]
            found = [index.ids[i] for i in row]
            hits["exact"] += gt in found
            hits["same_content"] += any(content(v) == content(gt) for v in found)
            hits["same_content_and_background"] += any(content(v, True) == content(gt, True) for v in found)
    n = len(split.captions)
    out = {"index_videos": len(index.ids), "queries": n, "k": args.k, "emcl": args.emcl,
           **{f"hit_rate_{k}": v / n for k, v in hits.items()}}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
