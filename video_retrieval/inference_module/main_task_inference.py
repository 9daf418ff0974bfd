"""EMCL as an inference module (docs/reference.md, 'EMCL as an inference module'): retrieval metrics
with and without EMCL, no training.

Embeddings come from one of three sources:

    # embeddings of any model, from files (.npy, .npz or HDF5); multi-caption sets need the mapping
    python -m video_retrieval.inference_module.main_task_inference --text_emb T.npy --video_emb V.npy \
        [--caption_video C.npy] --output_dir runs/infer
    # a released CLIP2Video checkpoint (CLIP included) on JPEG frame folders or videos
    python -m video_retrieval.inference_module.main_task_inference \
        --config configs/inference_clip2video.yaml \
        --checkpoint CKPT_DIR --model_num 2 --anno_path data/msrvtt/anno --frame_path data/msrvtt/frames \
        --output_dir runs/clip2video_emcl
    # one of our EMCL-Net checkpoints (its data settings are read from the checkpoint)
    python -m video_retrieval.inference_module.main_task_inference \
        --emcl_net_checkpoint runs/x/checkpoint_best.pt \
        --output_dir runs/x_infer

Runs under torchrun too (features and score rows are shared by the ranks). The defaults reproduce the
reference: EMCL with K=7, T=10, lambda=0.1, beta=4 on ``[64 videos' vectors; 64 texts' vectors]`` of each
64 x 64 block (policy ``paper``), mu = the seed-42 ``upstream`` draw, never updated, Y not renormalised,
score ``t . v`` on Y; CLIP2Video fuses it 0.5 / 0.5 with its TAB score. ``--eval_block query`` runs EM once
per text over all videos instead (scores independent of blocking and order).

Outputs in ``--output_dir``: ``metrics.json`` (``without_emcl`` / ``with_emcl``: ``t2v``, ``v2t`` and their
DSL rows with R@1/5/10/50, MdR, MnR; the settings), ``results.md`` (the table), ``inference.log``; with
``--save_embeddings 1`` the embeddings as .npy; with ``--sweep`` ``sweep.csv`` and ``sweep.png``.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # a busy --output_dir stops the run before the imports below take seconds
    from emcl.train.lock import refuse_busy_output_dir

    refuse_busy_output_dir(sys.argv[1:])

import argparse
import logging
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from emcl import dist
from emcl.em import EMCL
from emcl.errors import UserError, cli_main
from emcl.fileio import save_bytes, save_json, save_yaml
from emcl.metrics import RANK_KEYS, evaluate_similarity
from emcl.scoring import pooled_emcl_scores, score_matrix
from emcl.train import outdir
from emcl.train.config import parse_args
from emcl.train.logs import setup_logging
from emcl.train.runner import prepare_output

from .embeddings import Embeddings, from_clip2video, from_emcl_net, from_files, prepare, save_embeddings

log = logging.getLogger("emcl.inference")

DIRECTIONS = ("t2v", "v2t", "t2v_dsl", "v2t_dsl")
SWEEP_DEFAULTS = {
    "K": "1,2,3,4,5,7,10,16,32",
    "T": "1,2,3,5,7,10,15,20",
    "lamd": "0.01,0.03,0.05,0.1,0.2,0.5,1",
    "beta": "0,0.5,1,2,3,4,6,8",
}


def _general_flags(p: argparse.ArgumentParser) -> None:
    """Where results go, the device and numbers, and the seed of the mu draw."""
    a = p.add_argument
    a("--config", default=None, help="YAML file of option defaults; flags given here override it")
    a("--output_dir", required=False, default=None)
    a("--overwrite", action="store_true", help="replace the results of an earlier run in output_dir")
    a("--device", default=None, choices=("cpu", "cuda"))
    a(
        "--precision",
        default="auto",
        choices=("auto", "bf16", "fp32"),
        help="encoders; scoring is always fp32",
    )
    a("--seed", type=int, default=42, help="seed of the mu draw (the reference: the run's seed, 42)")
    a("--debug", action="store_true", help="tracebacks for user errors")


def _embedding_file_flags(p: argparse.ArgumentParser) -> None:
    """Embeddings of any model, read from files."""
    g = p.add_argument_group("embeddings from files")
    g.add_argument("--text_emb", default=None, help="(A, D) text embeddings: .npy, .npz[:key], .h5[:dataset]")
    g.add_argument(
        "--video_emb",
        default=None,
        help="(V, D) video embeddings, or (V, T, D) per frame (all-zero frames are padding)",
    )
    g.add_argument(
        "--caption_video",
        default=None,
        help="(A,) video index of every caption (.npy/.txt/.json/.h5); default: the diagonal, A == V",
    )
    g.add_argument(
        "--tab_text_emb",
        default=None,
        help="a second (A, D') text embedding fused with "
        "--center_weight (e.g. CLIP2Video's TAB vectors saved by --save_embeddings)",
    )
    g.add_argument("--tab_video_emb", default=None, help="its (V, D') video embedding")
    g.add_argument(
        "--normalize",
        type=int,
        default=1,
        help="L2-normalise pooled file embeddings first (the "
        "reference normalises t and v before EMCL); 0: use them as given (dot product)",
    )
    g.add_argument(
        "--frame_pooling",
        default=None,
        choices=("mean", "text"),
        help="per-frame video features: mean (normalised frames, masked mean; default for files) "
        "or text (EMCL-Net's text-conditioned pooling; default for EMCL-Net checkpoints)",
    )
    g.add_argument(
        "--temp",
        type=float,
        default=3.0,
        help="frame-pooling temperature of --frame_pooling text for files (checkpoints use their own)",
    )


def _checkpoint_flags(p: argparse.ArgumentParser) -> None:
    """A CLIP2Video or EMCL-Net checkpoint run on a dataset's frames or videos."""
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint", default=None, help="folder of a CLIP2Video pytorch_model.bin.N")
    g.add_argument("--model_num", default=None, help="N of pytorch_model.bin.N")
    g.add_argument(
        "--init_model", default=None, help="a CLIP2Video state dict file (instead of --checkpoint)"
    )
    g.add_argument(
        "--emcl_net_checkpoint",
        default=None,
        help="an EMCL-Net checkpoint: ours (checkpoint_*.pt) or the authors' (pytorch_model.bin.N)",
    )
    g.add_argument(
        "--datatype", default="msrvtt", choices=("msrvtt", "msvd", "lsmdc", "activitynet", "didemo")
    )
    g.add_argument("--anno_path", default=None)
    g.add_argument("--msrvtt_test", default="1k", choices=("1k", "full"))
    g.add_argument("--split", default="test", choices=("val", "test", "train"))
    g.add_argument(
        "--frame_path",
        default=None,
        help="JPEG frame folders {frame_path}/{video_id}/%%08d.jpg (scripts/extract_frames.py)",
    )
    g.add_argument(
        "--feature_framerate",
        type=int,
        default=2,
        help="frame folders: keep every N-th file before "
        "the even spacing (the reference: 2 on 5-fps folders)",
    )
    g.add_argument("--extract_fps", type=float, default=5.0, help="rate the frame folders were extracted at")
    g.add_argument("--video_path", default=None, help="videos decoded on the fly (instead of --frame_path)")
    g.add_argument("--video_framerate", type=float, default=2.5, help="videos: sampling rate in fps")
    g.add_argument("--frame_cache", default=None, help="EMCL-Net: HDF5 frame store (else the checkpoint's)")
    g.add_argument("--decode_backend", default="pyav", choices=("pyav", "opencv"))
    g.add_argument("--max_frames", type=int, default=12)
    g.add_argument("--max_words", type=int, default=32)
    g.add_argument("--batch_size_val", type=int, default=64, help="per-rank batch for feature extraction")
    g.add_argument("--workers", type=int, default=2)
    g.add_argument("--skip_bad_videos", action="store_true", help="leave unreadable videos out (and say so)")
    g.add_argument(
        "--temporal_layers",
        type=int,
        default=4,
        help="CLIP2Video temporal transformer blocks (the reference's cross_num_hidden_layers)",
    )
    g.add_argument("--centerK", type=int, default=5, help="CLIP2Video TAB centres")
    g.add_argument("--center_weight", type=float, default=0.5, help="weight of the main score against TAB")
    g.add_argument(
        "--save_embeddings", type=int, default=0, help="write the embeddings as .npy to output_dir"
    )


def _emcl_flags(p: argparse.ArgumentParser) -> None:
    """The EM settings and how scoring is blocked."""
    g = p.add_argument_group("EMCL")
    g.add_argument("--K", type=int, default=7, help="bases")
    g.add_argument("--stage_num", type=int, default=10, help="EM iterations T")
    g.add_argument("--lamd", type=float, default=0.1, help="softmax temperature lambda")
    g.add_argument("--beta", type=float, default=4.0, help="weight of the reconstruction")
    g.add_argument(
        "--em_init",
        default="upstream",
        choices=("upstream", "gaussian", "linspace"),
        help="mu initialisation (upstream: the reference's +-1 draw)",
    )
    g.add_argument(
        "--eval_block",
        default="paper",
        choices=("paper", "query"),
        help="paper: EM per block of texts x videos, as the reference; query: EM per text over all videos",
    )
    g.add_argument("--eval_block_size", type=int, default=64)


def _metric_and_sweep_flags(p: argparse.ArgumentParser) -> None:
    """Retrieval metrics and the sweep over EM settings."""
    g = p.add_argument_group("metrics and sweep")
    g.add_argument(
        "--v2t_candidates",
        default="videos",
        choices=("videos", "captions"),
        help="multi-caption video->text: videos (the reference: rank V caption groups by their best "
        "caption) or captions (rank all captions)",
    )
    g.add_argument("--dsl_temperature", type=float, default=0.01)
    g.add_argument("--sweep", action="store_true", help="also sweep K, T, lambda, beta and mu seeds")
    for key, default in SWEEP_DEFAULTS.items():
        g.add_argument(f"--sweep_{key}", default=default, help=f"comma-separated {key} values")
    g.add_argument(
        "--sweep_seeds",
        type=int,
        default=32,
        help="mu seeds 0..N-1 and the run's --seed (upstream, gaussian)",
    )


def build_parser() -> argparse.ArgumentParser:
    """All flags; the reference's names where it has them (--K, --stage_num, --lamd, --beta, --centerK)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for add_flags in (_general_flags, _embedding_file_flags, _checkpoint_flags, _emcl_flags,
                      _metric_and_sweep_flags):
        add_flags(p)
    return p


@dataclass(frozen=True)
class EMSettings:
    """One EMCL setting: K bases, T iterations, lambda, beta, and the mu draw (init, seed)."""

    K: int  # noqa: N815 - the reference's flag name
    T: int  # noqa: N815
    lamd: float
    beta: float
    init: str
    seed: int

    def layer(self) -> EMCL:
        return EMCL(
            k=self.K, stage_num=self.T, lamd=self.lamd, beta=self.beta, init=self.init, seed=self.seed
        )

    def mu_signs(self) -> str:
        mu = self.layer().mu.flatten()
        return "".join("+" if x > 0 else "-" for x in mu.tolist())

    def describe(self) -> str:
        return (
            f"K={self.K} T={self.T} lambda={self.lamd:g} beta={self.beta:g}, mu {self.init} seed {self.seed}"
            + (f" ({self.mu_signs()})" if self.init == "upstream" else "")
        )


def parse(argv: list[str] | None) -> argparse.Namespace:
    try:
        cfg = parse_args(build_parser(), argv)
    except (ValueError, FileNotFoundError) as error:
        raise UserError(str(error)) from error
    cfg.explicit = {a[2:].split("=")[0] for a in (argv or []) if a.startswith("--")}
    sources = [s for s in ("text_emb", "checkpoint", "init_model", "emcl_net_checkpoint") if getattr(cfg, s)]
    if len(sources) != 1:
        raise UserError(
            "give exactly one source: --text_emb/--video_emb, --checkpoint (with --model_num), "
            f"--init_model or --emcl_net_checkpoint (got {sources or 'none'})"
        )
    cfg.source = {
        "text_emb": "files",
        "checkpoint": "clip2video",
        "init_model": "clip2video",
        "emcl_net_checkpoint": "emcl_net",
    }[sources[0]]
    if not cfg.output_dir:
        raise UserError("--output_dir is required")
    if cfg.K < 1 or cfg.stage_num < 1 or cfg.lamd <= 0 or cfg.eval_block_size < 1:
        raise UserError(
            f"need K >= 1, stage_num >= 1, lamd > 0, eval_block_size >= 1 (got {cfg.K}, "
            f"{cfg.stage_num}, {cfg.lamd}, {cfg.eval_block_size})"
        )
    if not 0.0 <= cfg.center_weight <= 1.0:
        raise UserError(f"--center_weight must be in [0, 1], got {cfg.center_weight}")
    return cfg


# -------------------------------------------------------------------------------------------- scoring
def score(
    emb: Embeddings, em: EMSettings | None, policy: str, block: int, info: dist.DistInfo
) -> torch.Tensor:
    """The (A, V) float32 score matrix on the cosine scale (no logit scale), with EMCL ``em`` or without.

    ``pooled``: EMCL on [video rows; text rows] of each block, ``t . v`` on Y (not renormalised).
    ``text``: EMCL-Net's scores (text-conditioned frame pooling, EMCL on [pair vectors; texts], cosine).
    A TAB pair is added as ``w * main + (1 - w) * g_t . g_v``; it does not depend on the blocking.
    """
    device = emb.text.device
    if emb.pooling == "text":
        from video_retrieval.emcl_net.model import emcl_scores

        layer = em.layer().to(device) if em is not None else None

        def fn(t, f, m):
            return emcl_scores(t, f, m, layer, emb.temp)

        rows = score_matrix(
            fn,
            emb.text,
            emb.video,
            emb.frame_mask,
            mode=policy,
            block=block,
            rank=info.rank,
            world_size=info.world_size,
        )
    else:
        if em is None:
            fn = partial(pooled_emcl_scores, mu=None)
        else:
            fn = partial(
                pooled_emcl_scores, mu=em.layer().mu.to(device), stage_num=em.T, lamd=em.lamd, beta=em.beta
            )
        rows = score_matrix(
            fn,
            emb.text,
            emb.video,
            None,
            mode=policy,
            block=block,
            rank=info.rank,
            world_size=info.world_size,
        )
    sim = dist.gather_tensors_no_grad(rows)
    if emb.tab_text is not None:
        w = emb.center_weight
        with torch.autocast(device.type, enabled=False):
            sim = w * sim + (1.0 - w) * (emb.tab_text.float() @ emb.tab_video.float().t())
    return sim


def metrics(sim: torch.Tensor, emb: Embeddings, cfg: argparse.Namespace) -> dict[str, dict[str, float]]:
    return evaluate_similarity(
        sim, emb.caption_video, temperature=cfg.dsl_temperature, v2t_candidates=cfg.v2t_candidates
    )


# ------------------------------------------------------------------------------------------- reporting
def format_results(without: dict, with_: dict, markdown: bool = False) -> str:
    """One table: raw and DSL rows, without and with EMCL, both directions (R@1/5/10, MdR, MnR)."""
    keys = ("R1", "R5", "R10", "MdR", "MnR")
    names = ("R@1", "R@5", "R@10", "MdR", "MnR")
    rows = []
    for kind, suffix in (("raw", ""), ("DSL", "_dsl")):
        for label, res in (("without EMCL", without), ("with EMCL", with_)):
            cells = [f"{res['t2v' + suffix][k]:.1f}" for k in keys] + [
                f"{res['v2t' + suffix][k]:.1f}" for k in keys
            ]
            rows.append((kind, label, cells))
    if markdown:
        head = (
            "| scores | | "
            + " | ".join(f"t2v {n}" for n in names)
            + " | "
            + " | ".join(f"v2t {n}" for n in names)
            + " |"
        )
        lines = [head, "|" + "---|" * (2 + 2 * len(keys))]
        lines += [f"| {k} | {label} | " + " | ".join(c) + " |" for k, label, c in rows]
        return "\n".join(lines)
    head = (
        f"{'scores':<7}{'':<14}| "
        + "".join(f"{'t2v ' + n:>9}" for n in names)
        + " | "
        + "".join(f"{'v2t ' + n:>9}" for n in names)
    )
    lines = [head, "-" * len(head)]
    for k, label, c in rows:
        lines.append(
            f"{k:<7}{label:<14}| "
            + "".join(f"{x:>9}" for x in c[:5])
            + " | "
            + "".join(f"{x:>9}" for x in c[5:])
        )
    return "\n".join(lines)


def delta(without: dict, with_: dict) -> dict[str, dict[str, float]]:
    return {d: {k: round(with_[d][k] - without[d][k], 6) for k in RANK_KEYS} for d in DIRECTIONS}


def settings_of(cfg: argparse.Namespace, em: EMSettings, emb: Embeddings) -> dict[str, Any]:
    score_desc = {
        "pooled": "EMCL on [block videos; block texts] (pooled vectors), Y not renormalised, score t.v on Y",
        "text": "EMCL-Net: text-conditioned frame pooling, EMCL on [pair vectors; texts], cosine on Y",
    }[emb.pooling]
    if emb.tab_text is not None:
        score_desc += f"; fused {emb.center_weight:g} * main + {1 - emb.center_weight:g} * TAB (g_t.g_v)"
    if emb.info.get("source") == "files" and emb.pooling == "pooled":
        score_desc += "; inputs L2-normalised first (cosine)" if cfg.normalize else "; inputs as given (dot)"
    return {
        "K": em.K,
        "T": em.T,
        "lamd": em.lamd,
        "beta": em.beta,
        "mu_init": em.init,
        "mu_seed": em.seed,
        "mu_signs": em.mu_signs() if em.init == "upstream" else None,
        "mu_updated": False,
        "policy": cfg.eval_block,
        "block": cfg.eval_block_size if cfg.eval_block == "paper" else None,
        "score": score_desc,
        "score_scale": "cosine scale (CLIP2Video's logit_scale factor left out: it changes no rank, and "
        "DSL's temperature applies to cosine-scale scores)",
        "v2t_candidates": cfg.v2t_candidates,
        "dsl_temperature": cfg.dsl_temperature,
        "precision": "EMCL and scoring in float32, autocast off",
    }


def settings_line(s: dict[str, Any]) -> str:
    block = f"{s['block']}x{s['block']} blocks" if s["policy"] == "paper" else "EM per text query"
    signs = f" ({s['mu_signs']})" if s["mu_signs"] else ""
    return (
        f"EMCL K={s['K']} T={s['T']} lambda={s['lamd']:g} beta={s['beta']:g}; "
        f"policy {s['policy']} ({block}); mu init {s['mu_init']} seed {s['mu_seed']}{signs}, never updated"
    )


# --------------------------------------------------------------------------------------------- sweep
def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--sweep_{flag}: expected comma-separated numbers, got {text!r}") from None


def sweep_settings(cfg: argparse.Namespace, base: EMSettings) -> list[tuple[str, EMSettings]]:
    """One-at-a-time sweeps around ``base`` over K, T, lambda, beta; then mu seeds (upstream and gaussian
    init) and the deterministic linspace init."""
    runs: list[tuple[str, EMSettings]] = []
    for k in _floats(cfg.sweep_K, "K"):
        runs.append(("K", replace(base, K=int(k))))
    for t in _floats(cfg.sweep_T, "T"):
        runs.append(("T", replace(base, T=int(t))))
    for lam in _floats(cfg.sweep_lamd, "lamd"):
        if lam <= 0:
            raise UserError(f"--sweep_lamd: lambda must be positive, got {lam}")
        runs.append(("lamd", replace(base, lamd=lam)))
    for b in _floats(cfg.sweep_beta, "beta"):
        runs.append(("beta", replace(base, beta=b)))
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
    """Score every sweep setting; rank 0 writes ``sweep.csv`` and ``sweep.png``; returns a summary."""
    import csv
    import io

    header = ["axis", "K", "T", "lamd", "beta", "init", "seed", "mu_plus"]
    for d in DIRECTIONS:
        header += [f"{d}_{k}" for k in ("R1", "R5", "R10", "MdR", "MnR")]
    header += ["d_t2v_R1", "d_v2t_R1", "d_t2v_R5", "d_v2t_R5"]
    rows: list[dict[str, Any]] = [
        {
            "axis": "none",
            "K": 0,
            "T": 0,
            "lamd": 0,
            "beta": 0,
            "init": "-",
            "seed": -1,
            "mu_plus": -1,
            **_flat(without),
            **_gain(without, without),
        }
    ]
    t0 = time.perf_counter()
    settings = sweep_settings(cfg, base)
    for i, (axis, em) in enumerate(settings):
        res = metrics(score(emb, em, cfg.eval_block, cfg.eval_block_size, info), emb, cfg)
        plus = em.mu_signs().count("+") if em.init == "upstream" else -1
        rows.append({"axis": axis, **asdict(em), "mu_plus": plus, **_flat(res), **_gain(res, without)})
        if (i + 1) % 10 == 0:
            log.info("sweep %d/%d (%.0f s)", i + 1, len(settings), time.perf_counter() - t0)
    summary = sweep_summary(rows, base)
    if info.is_main:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=header, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
        save_bytes(buf.getvalue().encode(), out / "sweep.csv")
        from .plots import plot_sweep

        plot_sweep(rows, base, summary, out / "sweep.png", title=_plot_title(emb, cfg))
        log.info(
            "sweep: %d settings in %.0f s -> %s, %s",
            len(settings),
            time.perf_counter() - t0,
            out / "sweep.csv",
            out / "sweep.png",
        )
    return summary


def _flat(res: dict) -> dict[str, float]:
    return {f"{d}_{k}": res[d][k] for d in DIRECTIONS for k in ("R1", "R5", "R10", "MdR", "MnR")}


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


# ---------------------------------------------------------------------------------------------- main
def get_embeddings(cfg: argparse.Namespace, info: dist.DistInfo) -> Embeddings:
    if cfg.source == "files":
        emb = from_files(cfg)
        return prepare(emb, bool(cfg.normalize), info.device, temp=cfg.temp)
    if cfg.source == "clip2video":
        return prepare(from_clip2video(cfg, info), False, info.device)
    return prepare(from_emcl_net(cfg, info), False, info.device)


# what an inference run writes: --overwrite removes these, and only these, of an earlier run
RESULT_FILES = (*outdir.RESULT_FILES, "results.md", "inference.log", "sweep.csv", "sweep.png", "*_emb.npy",
                "caption_video.npy", "frame_mask.npy")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse, load the embeddings, score without and with EMCL, write metrics.json (and the sweep).

    Like the trainers: the output folder's lock is held for the whole run, a folder holding another
    run's results is refused unless ``--overwrite``, and the process group is torn down however the run
    ends."""
    cfg = parse(argv)
    info = dist.init_distributed(cfg.device)
    out = Path(cfg.output_dir)
    lock = None
    try:
        lock = prepare_output(out, info, resume=False, overwrite=cfg.overwrite, result_patterns=RESULT_FILES,
                              resumable=False)
        setup_logging(out, info.rank, name="inference.log")
        return _run(cfg, info, out)
    finally:
        if lock is not None:
            lock.release()
        dist.cleanup()


def _run(cfg: argparse.Namespace, info: dist.DistInfo, out: Path) -> dict[str, Any]:
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    emb = get_embeddings(cfg, info)
    log.info(
        "%s: %d texts x %d videos, %s video vectors, on %s",
        emb.info.get("source"),
        emb.num_texts,
        emb.num_videos,
        emb.pooling,
        info.device,
    )
    em = EMSettings(cfg.K, cfg.stage_num, cfg.lamd, cfg.beta, cfg.em_init, cfg.seed)
    settings = settings_of(cfg, em, emb)
    without = metrics(score(emb, None, cfg.eval_block, cfg.eval_block_size, info), emb, cfg)
    with_ = metrics(score(emb, em, cfg.eval_block, cfg.eval_block_size, info), emb, cfg)
    table = format_results(without, with_)
    log.info("%s\n%s", settings_line(settings), table)
    result: dict[str, Any] = {
        "finished": True,
        "settings": settings,
        "source": emb.info,
        "num_texts": emb.num_texts,
        "num_videos": emb.num_videos,
        "without_emcl": without,
        "with_emcl": with_,
        "delta": delta(without, with_),
        "seconds": round(time.perf_counter() - start, 3),
    }
    if info.is_main:
        saved = {k: v for k, v in vars(cfg).items() if k != "explicit" and not k.startswith("_")}
        save_yaml(saved, out / "config.yaml")
        save_bytes(
            (f"{settings_line(settings)}\n\n{format_results(without, with_, markdown=True)}\n").encode(),
            out / "results.md",
        )
        if cfg.save_embeddings:
            result["embedding_files"] = save_embeddings(emb, out)
        save_json(result, out / "metrics.json")
        log.info("metrics written to %s (%.1f s)", out / "metrics.json", result["seconds"])
    if cfg.sweep:
        result["sweep"] = run_sweep(cfg, emb, em, without, info, out)
        result["seconds_with_sweep"] = round(time.perf_counter() - start, 3)
        if info.is_main:
            save_json(result, out / "metrics.json")
    dist.barrier()
    return result


if __name__ == "__main__":
    cli_main(main)
