r"""EMCL as an inference module (docs/reference.md, 'EMCL as an inference module'): retrieval metrics
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
reference: EMCL with K=7 (``--centerK``, or ``--K``), T=10, lambda=0.1, beta=4 on ``[64 videos' vectors;
64 texts' vectors]`` of each 64 x 64 block (policy ``paper``), mu = the seed-42 ``upstream`` draw, never
updated, Y not renormalised, score ``t . v`` on Y; CLIP2Video fuses it 0.5 / 0.5 with its TAB score
(``--tab_centers`` centres). ``--eval_block query`` runs EM once per text over all videos instead (scores
independent of blocking and order).

Outputs in ``--output_dir``: ``metrics.json`` (``without_emcl`` / ``with_emcl``: ``t2v``, ``v2t`` and their
DSL rows with R@1/5/10/50, MdR, MnR; the settings), ``results.md`` (the table), ``inference.log``; with
``--save_embeddings 1`` the embeddings as .npy; with ``--sweep`` ``sweep.csv`` and ``sweep.png``. The run
loop, the output folder's lock and ``metrics.json`` are :mod:`emcl.train.runner`'s; the scores are in
``scores.py``, the report in ``report.py``, the sweep in ``sweep.py``.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # a busy --output_dir stops the run before the imports below take seconds
    from emcl.train.lock import refuse_busy_output_dir

    refuse_busy_output_dir(sys.argv[1:])

import argparse
import logging
import time
from dataclasses import replace
from typing import Any

from emcl.errors import UserError, cli_main
from emcl.train.config import fraction, positive_float, positive_int
from emcl.train.flags import Group, data_group, em_group, evaluation_group, flag, frame_group, group
from emcl.train.runner import run
from emcl.train.task import EvalOnlyTask

from .embeddings import Embeddings, from_clip2video, from_emcl_net, from_files, prepare, save_embeddings
from .report import delta, format_results, settings_line, settings_of, write_results_md
from .scores import EMSettings, evaluate_settings
from .sweep import SWEEP, run_sweep

log = logging.getLogger("emcl.inference")

FILES = group(
    "embeddings from files",
    flag("--text_emb", default=None, help="(A, D) text embeddings: .npy, .npz[:key], .h5[:dataset]"),
    flag("--video_emb", default=None,
         help="(V, D) video embeddings, or (V, T, D) per frame (all-zero frames are padding)"),
    flag("--caption_video", default=None,
         help="(A,) video index of every caption (.npy/.txt/.json/.h5); default: the diagonal, A == V"),
    flag("--tab_text_emb", default=None,
         help="a second (A, D') text embedding fused with --center_weight (e.g. CLIP2Video's TAB vectors "
         "saved by --save_embeddings)"),
    flag("--tab_video_emb", default=None, help="its (V, D') video embedding"),
    flag("--normalize", type=int, default=1, choices=(0, 1),
         help="L2-normalise pooled file embeddings first (the reference normalises t and v before EMCL); "
         "0: use them as given (dot product)"),
    flag("--frame_pooling", default=None, choices=("mean", "text"),
         help="per-frame video features: mean (normalised frames, masked mean; default for files) or text "
         "(EMCL-Net's text-conditioned pooling; default for EMCL-Net checkpoints)"),
    flag("--keep_zero_rows", action="store_true",
         help="score all-zero rows of the embedding files (each ties with every candidate, a tie counts as "
         "a hit) instead of stopping; their count goes into metrics.json"),
    flag("--temp", type=positive_float, default=3.0,
         help="frame-pooling temperature of --frame_pooling text for files (checkpoints use their own)"),
)
CHECKPOINTS = group(
    "checkpoints",
    flag("--checkpoint", default=None, help="folder of a CLIP2Video pytorch_model.bin.N"),
    flag("--model_num", default=None, help="N of pytorch_model.bin.N"),
    flag("--init_model", default=None, help="a CLIP2Video state dict file (instead of --checkpoint)"),
    flag("--emcl_net_checkpoint", default=None,
         help="an EMCL-Net checkpoint: ours (checkpoint_*.pt) or the authors' (pytorch_model.bin.N)"),
    flag("--datatype", default="msrvtt", choices=("msrvtt", "msvd", "lsmdc", "activitynet", "didemo")),
    flag("--msrvtt_test", default="1k", choices=("1k", "full")),
    flag("--split", default="test", choices=("val", "test", "train")),
    flag("--frame_path", default=None,
         help="JPEG frame folders {frame_path}/{video_id}/%%08d.jpg (scripts/extract_frames.py)"),
    flag("--feature_framerate", type=positive_int, default=2,
         help="frame folders: keep every N-th file before the even spacing (the reference: 2 on 5-fps "
         "folders)"),
    flag("--extract_fps", type=positive_float, default=5.0, help="rate the frame folders were extracted at"),
    flag("--temporal_layers", type=positive_int, default=4,
         help="CLIP2Video temporal transformer blocks (the reference's cross_num_hidden_layers)"),
    flag("--tab_centers", type=positive_int, default=5, help="CLIP2Video's TAB centres"),
    flag("--center_weight", type=fraction, default=0.5, help="weight of the main score against TAB"),
    flag("--save_embeddings", type=int, default=0, choices=(0, 1),
         help="write the embeddings as .npy to output_dir"),
)
METRICS = group(
    "metrics",
    flag("--v2t_candidates", default="videos", choices=("videos", "captions"),
         help="multi-caption video->text: videos (the reference: rank V caption groups by their best "
         "caption) or captions (rank all captions)"),
    flag("--dsl_temperature", type=positive_float, default=0.01),
)


def _em_flags() -> Group:
    """The EMCL flags at the reference's inference setting; ``--K`` (the reference's name here) is another
    name of ``--centerK``, the number of bases."""
    em = em_group(centerK=7, stage_num=10, beta=4.0, lamd=0.1).without("use_emcl", "momentum")
    return replace(em, flags=tuple(replace(f, names=(*f.names, "--K")) if f.dest == "centerK" else f
                                   for f in em.flags))


SOURCES = {"text_emb": "files", "checkpoint": "clip2video", "init_model": "clip2video",
           "emcl_net_checkpoint": "emcl_net"}
# what an inference run writes: --overwrite removes these, and only these (never a trainer's checkpoints)
RESULT_FILES = ("metrics.json", "config.yaml", "inference.log", "results.md", "sweep.csv", "sweep.png",
                "*_emb.npy", "caption_video.npy", "frame_mask.npy", ".*.tmp")


class InferenceTask(EvalOnlyTask):
    """Retrieval metrics of one set of embeddings without and with EMCL (and, with ``--sweep``, around
    the setting)."""

    name = "inference"
    module = "video_retrieval.inference_module.main_task_inference"
    groups = (FILES, CHECKPOINTS, data_group().defaults(workers=2),
              frame_group(max_words=32, max_frames=12, video_framerate=2.5).without("image_size"),
              _em_flags(), METRICS, SWEEP)
    evaluation = evaluation_group(
        64, ("paper", "query"),
        "paper: EM per block of texts x videos, as the reference; query: EM per text over all videos",
    ).without("eval_split", "select_on_test")
    log_name = "inference.log"
    result_files = RESULT_FILES

    @classmethod
    def check_flags(cls, cfg: argparse.Namespace) -> None:
        """Exactly one source of embeddings; ``cfg.source`` says which."""
        given = [key for key in SOURCES if getattr(cfg, key)]
        if len(given) != 1:
            raise UserError(
                "give exactly one source: --text_emb/--video_emb, --checkpoint (with --model_num), "
                f"--init_model or --emcl_net_checkpoint (got {given or 'none'})"
            )
        cfg.source = SOURCES[given[0]]

    def embeddings(self) -> Embeddings:
        cfg, device = self.cfg, self.info.device
        if cfg.source == "files":
            return prepare(from_files(cfg), bool(cfg.normalize), device, temp=cfg.temp)
        if cfg.source == "clip2video":
            return prepare(from_clip2video(cfg, self.info), False, device)
        return prepare(from_emcl_net(cfg, self.info), False, device)

    def evaluate(self, model: Any, split: str) -> dict[str, Any]:
        """Score the embeddings without and with EMCL; ``results.md`` (and the embeddings) on rank 0;
        with ``--sweep`` ``metrics.json`` is written first, so that a failed sweep keeps the result."""
        cfg, info, out = self.cfg, self.info, self.out
        start = time.perf_counter()
        emb = self.embeddings()
        log.info("%s: %d texts x %d videos, %s video vectors, on %s", emb.info.get("source"), emb.num_texts,
                 emb.num_videos, emb.pooling, info.device)
        em = EMSettings.of(cfg)
        settings = settings_of(cfg, em, emb)
        scored = evaluate_settings(emb, {"without_emcl": None, "with_emcl": em}, cfg, info)
        without, with_ = scored["without_emcl"], scored["with_emcl"]
        log.info("%s\n%s", settings_line(settings), format_results(without, with_))
        result: dict[str, Any] = {
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
            write_results_md(settings, without, with_, out)
            if cfg.save_embeddings:
                result["embedding_files"] = save_embeddings(emb, out)
        if cfg.sweep:
            self.write_metrics(self.metrics(result))
            result["sweep"] = run_sweep(cfg, emb, em, without, info, out)
            result["seconds_with_sweep"] = round(time.perf_counter() - start, 3)
        return result


TASK = InferenceTask


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse, load the embeddings, score without and with EMCL, write ``metrics.json`` (and the sweep).

    The run loop (:func:`emcl.train.runner.run`) holds the output folder's lock for the whole run, refuses
    a folder holding another run's results unless ``--overwrite``, and tears the process group down however
    the run ends."""
    return run(InferenceTask, argv, __doc__)


if __name__ == "__main__":
    cli_main(main)
