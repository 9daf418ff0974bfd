"""A built search index and the model that made it: text queries, and the hit rate of a split's captions."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from emcl.errors import UserError
from emcl.evaluation import encode_split
from emcl.search.build import FORMAT, VERSION, stamp

log = logging.getLogger(__name__)


class Index:
    """A built index with the model that made it (``Index(path)``)."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu") -> None:
        from emcl.train.runs import load_run

        self.path = Path(path)
        meta_path = self.path / "index.json"
        if not meta_path.is_file():
            raise UserError(f"{self.path} is not a search index (no index.json; build it with "
                            "`python -m emcl.search index`)")
        try:
            self.meta = json.loads(meta_path.read_text())
        except ValueError as e:
            raise UserError(f"{meta_path}: not valid JSON: {e}") from None
        if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
            raise UserError(f"{meta_path}: not a version-{VERSION} {FORMAT} file")
        ck = self.meta["checkpoint"]
        if not os.path.isfile(ck):
            raise UserError(f"index {self.path}: its checkpoint {ck} is missing")
        if stamp(ck) != list(self.meta["checkpoint_stamp"]):
            raise UserError(f"index {self.path}: checkpoint {ck} changed since the index was built; "
                            "rebuild the index")
        data = torch.load(self.path / "features.pt", map_location=device, weights_only=True)
        self.frames, self.mask = data["frames"].float(), data["mask"].long()
        self.ids: list[str] = list(self.meta["video_ids"])
        if self.frames.shape[0] != len(self.ids):
            raise UserError(f"index {self.path}: features.pt holds {self.frames.shape[0]} videos, "
                            f"index.json {len(self.ids)}")
        self.run = load_run(checkpoint=ck, config=self.meta["config"], device=device)
        from emcl.clip import get_tokenizer

        get_tokenizer()  # loaded once here, not inside the first query's timing

    def path_of(self, i: int) -> str:
        return str(Path(self.meta["videos_dir"]) / self.meta["paths"][i])

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        from emcl.clip import tokenize

        try:
            ids, mask = tokenize(texts, self.run.cfg.max_words)
        except ValueError as e:
            raise UserError(f"query: {e}") from None
        batch = {"index": torch.arange(len(texts)), "ids": ids, "mask": mask}
        return encode_split([batch], lambda b: self.run.model.encode_text(b["ids"], b["mask"]), len(texts),
                            self.run.device, getattr(self.run.cfg, "precision", "auto"))[0]

    @torch.no_grad()
    def search(self, t: torch.Tensor, k: int = 5, use_emcl: bool = False, rerank: int = 100,
               videos: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Top-k of each text feature row ``t`` (A, D) over the index (or the ``videos`` subset, by position).

        Returns ``index`` (A, k) positions in the index, ``score`` (A, k) ranking scores, ``plain`` (A, k)
        scores without EMCL. With ``use_emcl`` the ``rerank`` best plain candidates are re-scored with EMCL
        (EM over [those candidates; the text]) and ranked by that score.
        """
        from emcl.scoring import score_matrix
        from emcl.train.runs import score_function

        f, m = self.frames, self.mask
        pos = torch.arange(f.shape[0]) if videos is None else videos
        if videos is not None:
            f, m = f[videos], m[videos]
        plain = score_matrix(score_function(self.run, "none"), t, f, m, mode="none")  # (A, V)
        if not use_emcl:
            s, i = plain.topk(min(k, plain.shape[1]), dim=1)
            return {"index": pos[i], "score": s, "plain": s}
        n = min(max(rerank, k), plain.shape[1])
        _, cand = plain.topk(n, dim=1)  # (A, n)
        fn = score_function(self.run, "query")
        rescored = torch.cat([
            fn(t[a:a + 64, None], f[cand[a:a + 64]], m[cand[a:a + 64]])[:, 0]  # (c, 1, n) -> (c, n)
            for a in range(0, t.shape[0], 64)
        ])
        s, j = rescored.topk(min(k, n), dim=1)
        sel = cand.gather(1, j)
        return {"index": pos[sel], "score": s, "plain": plain.gather(1, sel)}


def query(index: Index, text: str, k: int = 5, use_emcl: bool = False, rerank: int = 100) -> dict[str, Any]:
    """One text query: the top-k videos with scores, and the time of each part in milliseconds."""
    t0 = time.perf_counter()
    t = index.encode([text])
    t1 = time.perf_counter()
    res = index.search(t, k, use_emcl, rerank)
    t2 = time.perf_counter()
    results = []
    for r, (i, s, p) in enumerate(zip(res["index"][0].tolist(), res["score"][0].tolist(),
                                       res["plain"][0].tolist())):
        item = {"rank": r + 1, "video_id": index.ids[i], "score": round(s, 6), "path": index.path_of(i)}
        if use_emcl:
            item["score_without_emcl"] = round(p, 6)
        results.append(item)
    return {
        "query": text,
        "k": k,
        "emcl": use_emcl,
        "num_videos": len(index.ids),
        "results": results,
        "timing_ms": {"encode_text": round(1e3 * (t1 - t0), 3), "score_and_rank": round(1e3 * (t2 - t1), 3),
                      "search": round(1e3 * (t2 - t0), 3)},
    }


@torch.no_grad()
def evaluate(index: Index, split_name: str = "test", k: int = 5, use_emcl: bool = False, rerank: int = 100,
             gallery: str = "all", anno: str | None = None, datatype: str | None = None,
             attributes: str | None = None) -> dict[str, Any]:
    """Query every caption of a split; hit rate of its video in the top k (and R@1/5/10) over the gallery.
    ``attributes`` (a synthetic set's folder): also the hit rates of a video with the same content."""
    content = _content(attributes) if attributes is not None else None
    same = [0, 0]  # same content; same content and background
    cfg = index.run.cfg
    if anno is not None:
        cfg.anno_path = anno
    if datatype is not None:
        cfg.datatype = datatype
    split = index.run.split(split_name)
    where = {vid: i for i, vid in enumerate(index.ids)}
    split_pos = [where.get(v) for v in split.video_ids]
    missing = [v for v, p in zip(split.video_ids, split_pos) if p is None]
    if missing:
        log.warning("%d video(s) of %s/%s are not in the index (counted as misses): %s", len(missing),
                    split.datatype, split_name, ", ".join(missing[:10]))
    videos = None
    if gallery == "split":
        videos = torch.tensor(sorted({p for p in split_pos if p is not None}))
    caps = split.captions
    kk = max(k, 10)
    hits = {n: 0 for n in sorted({1, 5, 10, k})}
    start = time.perf_counter()
    for a in range(0, len(caps), 256):
        t = index.encode(caps[a:a + 256])
        res = index.search(t, kk, use_emcl, rerank, videos=videos)["index"]
        for row, c in zip(res.tolist(), range(a, a + len(t))):
            v = split.caption_video[c]
            gt = split_pos[v]
            for n in hits:
                hits[n] += gt is not None and gt in row[:n]
            if content is not None:
                found = [index.ids[i] for i in row[:k]]
                for j, bg in enumerate((False, True)):
                    want = content(split.video_ids[v], bg)
                    same[j] += want is not None and any(content(f, bg) == want for f in found)
    seconds = time.perf_counter() - start
    n_q = len(caps)
    extra = {}
    if content is not None:
        extra = {"hit_rate_same_content": same[0] / n_q,
                 "hit_rate_same_content_and_background": same[1] / n_q}
    return {
        "split": split_name,
        "datatype": split.datatype,
        "k": k,
        "emcl": use_emcl,
        "rerank": rerank if use_emcl else None,
        "gallery": gallery,
        "num_queries": n_q,
        "num_videos": int(len(videos) if videos is not None else len(index.ids)),
        "missing_videos": len(missing),
        "hit_rate": hits[k] / n_q,
        "recall": {f"R{n}": 100.0 * h / n_q for n, h in hits.items()},
        **extra,
        "ms_per_query": round(1e3 * seconds / n_q, 3),
    }


def _content(attributes: str) -> Callable[[str, bool], tuple | None]:
    """A video's (count, colour, shape, motion[, background]) in a synthetic set; None for another video."""
    from emcl.data.synthetic import load_attributes

    try:
        attrs = load_attributes(attributes)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--attributes {attributes}: not a synthetic set's folder ({e})") from None

    def content(vid: str, background: bool) -> tuple | None:
        a = attrs.get(vid)
        if a is None:
            return None
        return (a.count, a.color, a.shape, a.motion) + ((a.background,) if background else ())

    return content
