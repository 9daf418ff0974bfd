"""Text-to-video search over a folder of videos with a trained EMCL-Net checkpoint.

    python -m emcl.search index VIDEOS_DIR --checkpoint CK --out INDEX   # embed every video once
    python -m emcl.search query INDEX "a red ball moves left" -k 5 [--json] [--emcl]
    python -m emcl.search eval INDEX --split test -k 5 [--emcl]         # hit rate of a split's captions

**index** walks ``VIDEOS_DIR`` (every file with a video ending, sub-folders included), samples each clip
as the run did (its ``max_frames``, ``video_framerate``, ``image_size``) and stores the per-frame features
(after temporal aggregation) in ``INDEX/`` (``features.pt`` + ``index.json``). Clips come from the run's
frame cache when it holds them decoded from the same file (size and modification time), else the file is
decoded (``--frame_cache PATH|none`` chooses the cache). A video that cannot be read is named in a
warning, recorded in ``index.json`` under ``failed`` and left out; the rest are indexed.
A video's id is its path under ``VIDEOS_DIR`` without the ending.

**query** encodes the text and scores every indexed video as EMCL-Net does without EMCL
(text-conditioned pooling of the frames, cosine). ``--emcl`` re-scores the ``--rerank`` best candidates
(default 100) with the checkpoint's EMCL layer, EM running once over [the candidates' pooled vectors; the
text] (the ``query`` evaluation policy restricted to the candidates), and ranks them by that score.
The query reports in milliseconds the time of its search (``search``: encoding the text + scoring +
top-k) and of the command (``command``: loading the index and the model included; Python start-up and
importing PyTorch not).

**eval** queries every caption of a split of the run's dataset (``--anno`` and ``--datatype`` for
another annotation folder) against the whole index (``--gallery all``) or only the split's videos
(``--gallery split``) and reports how often the caption's video is among the top k (and R@1/5/10).

The index records the checkpoint (path, size, modification time) and the run's config; ``query`` and
``eval`` load the model from there and refuse an index whose checkpoint has changed since.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from emcl.data.workers import loader_context
from emcl.errors import UserError, cli_main
from emcl.fileio import save_json, save_torch

log = logging.getLogger("emcl.search")

FORMAT = "emcl-search-index"
VERSION = 1


# ------------------------------------------------------------------------------------------- indexing
def list_videos(root: str | os.PathLike) -> list[tuple[str, str]]:
    """(id, path) of every video file under ``root``, sorted; id = path under root without the ending
    (with the ending when two files would share an id)."""
    from emcl.data.video import find_videos

    root = Path(root)
    if not root.is_dir():
        raise UserError(f"video folder {root} does not exist")
    files = sorted({p for paths in find_videos(root).values() for p in paths})
    rel = [Path(p).relative_to(root).as_posix() for p in files]
    stems = [os.path.splitext(r)[0] for r in rel]
    clash = {s for s in stems if stems.count(s) > 1}
    return [(r if s in clash else s, p) for r, s, p in zip(rel, stems, files)]


class _Clips(Dataset):
    """Clips of the listed videos: from the frame cache when it is current for the file, else decoded."""

    def __init__(self, videos: list[tuple[str, str]], cfg: argparse.Namespace,
                 cache_path: str | None) -> None:
        self.videos, self.cfg, self.cache_path = videos, cfg, cache_path
        self._cache = None

    def __len__(self) -> int:
        return len(self.videos)

    def _from_cache(self, vid: str, path: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.cache_path is None:
            return None
        if self._cache is None:
            from emcl.data.cache import FrameCache

            self._cache = FrameCache(self.cache_path)
        if not self._cache.is_current(vid, path):
            return None
        return self._cache.get(vid)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from emcl.data.video import VideoError, read_frames

        vid, path = self.videos[i]
        cfg = self.cfg
        try:
            clip = self._from_cache(vid, path)
            cached = clip is not None
            if clip is None:
                clip = read_frames(path, framerate=cfg.video_framerate, max_frames=cfg.max_frames,
                                   size=cfg.image_size, backend=getattr(cfg, "decode_backend", "pyav"),
                                   video_id=vid)
        except (VideoError, OSError, ValueError) as e:
            return {"index": i, "error": str(e)}
        return {"index": i, "frames": clip[0], "mask": clip[1], "cached": cached}


def _usable_cache(cfg: argparse.Namespace, choice: str) -> str | None:
    """The frame cache to read clips from: ``auto`` = the run's, when it exists and fits the settings."""
    if choice == "none":
        return None
    path = getattr(cfg, "frame_cache", None) if choice == "auto" else choice
    if not path:
        return None
    if not os.path.isfile(path):
        if choice != "auto":
            raise UserError(f"--frame_cache {path}: file not found")
        log.info("the run's frame cache %s is not here: decoding every video", path)
        return None
    from emcl.data.cache import FrameCache

    try:
        FrameCache(path).check_settings(max_frames=cfg.max_frames, framerate=cfg.video_framerate,
                                        size=cfg.image_size)
    except ValueError as e:
        if choice != "auto":
            raise UserError(str(e)) from None
        log.info("not using the run's frame cache: %s", e)
        return None
    return path


def _stamp(path: str | os.PathLike) -> list[int]:
    st = os.stat(path)
    return [int(st.st_size), int(st.st_mtime_ns)]


def _plain(obj: Any) -> Any:
    """A JSON-able copy of a config value (paths and tuples as strings and lists)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return str(obj)


@torch.no_grad()
def build_index(videos_dir: str | os.PathLike, checkpoint: str | os.PathLike, out: str | os.PathLike,
                config: str | None = None, device: str = "cpu", batch_size: int = 32, workers: int = 0,
                frame_cache: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Embed every video under ``videos_dir`` with the checkpoint's model and write the index to ``out``.
    Returns the index metadata (also ``out/index.json``)."""
    from emcl.amp import autocast
    from emcl.train.runs import load_run

    run = load_run(checkpoint=checkpoint, config=config, device=device)
    cfg, model = run.cfg, run.model
    videos = list_videos(videos_dir)
    if not videos:
        raise UserError(f"no video files under {videos_dir}")
    cache = _usable_cache(cfg, frame_cache)
    loader = DataLoader(_Clips(videos, cfg, cache), batch_size=batch_size, num_workers=workers,
                        collate_fn=list, multiprocessing_context=loader_context(workers))
    feats: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    keep: list[int] = []
    failed: dict[str, str] = {}
    n_cached = 0
    start = time.perf_counter()
    with tqdm(total=len(videos), desc="index", unit="video", disable=not progress, file=sys.stderr) as bar:
        for batch in loader:
            good = [b for b in batch if "error" not in b]
            for b in batch:
                if "error" in b:
                    vid, path = videos[b["index"]]
                    failed[vid] = b["error"]
                    log.warning("cannot index %s: %s", path, b["error"])
            if good:
                frames = torch.stack([b["frames"] for b in good]).to(run.device)
                mask = torch.stack([b["mask"] for b in good]).to(run.device)
                with autocast(run.device, getattr(cfg, "precision", "auto")):
                    f = model.encode_video(frames, mask)
                feats.append(f.float().cpu())
                masks.append(mask.to(torch.uint8).cpu())
                keep += [b["index"] for b in good]
                n_cached += sum(bool(b["cached"]) for b in good)
            bar.update(len(batch))
    if not keep:
        raise UserError(f"none of the {len(videos)} video(s) under {videos_dir} could be read "
                        f"(first: {next(iter(failed.items()))})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(videos_dir).resolve()
    save_torch({"frames": torch.cat(feats), "mask": torch.cat(masks)}, out / "features.pt")
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "checkpoint": str(Path(checkpoint).resolve()),
        "checkpoint_stamp": _stamp(checkpoint),
        "videos_dir": str(root),
        "video_ids": [videos[i][0] for i in keep],
        "paths": [Path(videos[i][1]).resolve().relative_to(root).as_posix() for i in keep],
        "failed": failed,
        "num_from_frame_cache": n_cached,
        "frame_cache": cache,
        "seconds": round(time.perf_counter() - start, 2),
        "config": _plain({k: v for k, v in vars(cfg).items() if not k.startswith("_")}),
    }
    save_json(meta, out / "index.json")  # written last: its presence marks a finished index
    return meta


# --------------------------------------------------------------------------------------------- search
class Index:
    """A built index with the model that made it (``Index.open(path)``)."""

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
        if _stamp(ck) != list(self.meta["checkpoint_stamp"]):
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
        from emcl.amp import autocast
        from emcl.clip import tokenize

        try:
            ids, mask = tokenize(texts, self.run.cfg.max_words)
        except ValueError as e:
            raise UserError(f"query: {e}") from None
        dev = self.run.device
        with autocast(dev, getattr(self.run.cfg, "precision", "auto")):
            return self.run.model.encode_text(ids.to(dev), mask.to(dev)).float()

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
             gallery: str = "all", anno: str | None = None, datatype: str | None = None) -> dict[str, Any]:
    """Query every caption of a split; hit rate of its video in the top k (and R@1/5/10) over the gallery."""
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
            gt = split_pos[split.caption_video[c]]
            for n in hits:
                hits[n] += gt is not None and gt in row[:n]
    seconds = time.perf_counter() - start
    n_q = len(caps)
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
        "ms_per_query": round(1e3 * seconds / n_q, 3),
    }


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m emcl.search", description=__doc__,
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
    for sp in (ix,):
        sp.add_argument("--device", default="cpu")
        sp.add_argument("--debug", action="store_true")
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
    for sp in (q, ev):
        sp.add_argument("-k", type=int, default=5)
        sp.add_argument("--emcl", action="store_true", help="re-score the top candidates with EMCL")
        sp.add_argument("--rerank", type=int, default=100, help="candidates re-scored with --emcl")
        sp.add_argument("--json", action="store_true", help="print JSON")
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
    res = evaluate(index, args.split, args.k, args.emcl, args.rerank, args.gallery, args.anno, args.datatype)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        rec = res["recall"]
        print(f"{res['datatype']}/{res['split']}: {res['num_queries']} captions against {res['num_videos']} "
              f"videos ({'EMCL re-scoring' if args.emcl else 'no EMCL'}): ground truth in the top {args.k} "
              f"for {100 * res['hit_rate']:.1f}%; R@1 {rec['R1']:.1f}, R@5 {rec['R5']:.1f}, "
              f"R@10 {rec['R10']:.1f}; {res['ms_per_query']:.2f} ms per query")
    return res


if __name__ == "__main__":
    cli_main(main)
