"""Time EMCL-Net's real training step and evaluation with random weights and synthetic tensors.

    python scripts/benchmark.py --device cuda --backbone ViT-B/32 --batch 128 --frames 12 --json bench.json
    python scripts/benchmark.py --device cuda --e2e --json e2e.json     # also the real CLI, end to end
    python scripts/benchmark.py --device cpu --tiny --e2e --json out.json    # seconds, used by the tests

Reports train clips/s (forward, backward, optimiser step), peak memory, evaluation feature-extraction
clips/s (on device-resident frames, and from pinned host memory through ``prefetch_to_device``), the
1k x 1k similarity time under ``--eval_block paper`` (batched blocks) and ``query``, and the fast path's
numerical parity with the plain fp32 path on the same inputs. Timings are medians of repeated,
device-synchronised runs after warm-up. Switches turn each optimisation off to measure it.

``--compile auto`` (the default) compiles the CLIP towers on CUDA, as the training CLI does; a failing
compile falls back to eager with one warning (``compile`` in the report is then false).

``--e2e`` then runs the real CLI (``video_retrieval.emcl_net.main_task_retrieval``, in this process) for
``--max_steps`` steps on synthetic clips of the model's image size, cached on the spot into an HDF5 frame
cache, and reports its steady-state rate (after ``--e2e_warmup`` steps, timed at the optimiser steps)
as ``e2e_clips_per_s`` beside the bare step's ``train_clips_per_s``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from emcl.amp import autocast
from emcl.batches import prefetch_to_device
from emcl.clip import build_clip
from emcl.clip.memory import CHECKPOINT_LEVELS
from emcl.fileio import save_json, save_yaml
from emcl.scoring import score_matrix
from emcl.train.compile import (
    compile_modules,
    is_compiled,
    release_compile_workers,
    set_activation_memory_budget,
)
from emcl.train.optim import build_optimizer, param_groups
from video_retrieval.emcl_net.model import EMCLNet, emcl_scores

BACKBONES = {
    "ViT-B/32": dict(
        embed_dim=512,
        image_size=224,
        patch_size=32,
        vision_width=768,
        vision_layers=12,
        text_width=512,
        text_layers=12,
        quick_gelu=True,
    ),
    "ViT-B/16": dict(
        embed_dim=512,
        image_size=224,
        patch_size=16,
        vision_width=768,
        vision_layers=12,
        text_width=512,
        text_layers=12,
        quick_gelu=True,
    ),
    "ViT-L/14": dict(
        embed_dim=768,
        image_size=224,
        patch_size=14,
        vision_width=1024,
        vision_layers=24,
        text_width=768,
        text_layers=12,
        quick_gelu=True,
    ),
    "tiny": dict(
        embed_dim=64,
        image_size=32,
        patch_size=8,
        vision_width=64,
        vision_layers=2,
        text_width=64,
        text_layers=2,
    ),
}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda")
    )
    p.add_argument("--tiny", action="store_true", help="tiny model and sizes: runs in seconds on a CPU")
    p.add_argument("--backbone", default="ViT-B/32", choices=[k for k in BACKBONES if k != "tiny"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--words", type=int, default=32)
    p.add_argument("--eval_videos", type=int, default=1000, help="size of the similarity benchmark (A = V)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--no_fused_optim", action="store_true", help="for-each AdamW instead of fused")
    p.add_argument(
        "--grad_checkpointing",
        nargs="?",
        const="blocks",
        default="none",
        choices=CHECKPOINT_LEVELS,
        help="recompute whole blocks (the bare flag), only LayerNorm+MLP ('mlp') or LayerNorm+attention "
        "('attn') of each tower's first --checkpoint_layers blocks",
    )
    p.add_argument("--checkpoint_layers", type=int, default=None, help="checkpoint the first N blocks")
    p.add_argument(
        "--lean_activations", action="store_true", help="QuickGELU/LayerNorm keep fewer saved tensors"
    )
    p.add_argument(
        "--memory_budget",
        type=float,
        default=None,
        help="compiled path: torch._functorch.config.activation_memory_budget (0..1, 1 = keep all)",
    )
    p.add_argument(
        "--compile",
        default="auto",
        choices=("auto", "0", "1"),
        help="torch.compile the CLIP towers: auto = on CUDA (the default), 1 = always, 0 = never",
    )
    p.add_argument(
        "--compile_mode",
        default="default",
        choices=("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"),
        help="torch.compile mode (benchmark only)",
    )
    p.add_argument("--e2e", action="store_true", help="also time the real CLI on a frame cache")
    p.add_argument("--max_steps", type=int, default=60, help="--e2e: CLI training steps")
    p.add_argument("--e2e_warmup", type=int, default=15, help="--e2e: steps left out of the rate")
    p.add_argument("--e2e_workers", type=int, default=None, help="--e2e: loader workers (default: cores-2)")
    p.add_argument("--e2e_dir", default=None, help="--e2e: work folder (default: a temporary one)")
    p.add_argument(
        "--paper_loop", action="store_true", help="also time a per-block Python loop for paper mode"
    )
    p.add_argument("--skip_train", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.tiny:
        args.batch, args.frames, args.eval_videos = (
            min(args.batch, 8),
            min(args.frames, 4),
            min(args.eval_videos, 64),
        )
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
        args.max_steps, args.e2e_warmup = min(args.max_steps, 4), min(args.e2e_warmup, 1)
    if args.e2e and args.max_steps <= args.e2e_warmup:
        p.error(f"--max_steps {args.max_steps} must exceed --e2e_warmup {args.e2e_warmup}")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Wall seconds of ``fn`` per call, after ``warmup`` untimed calls, device-synchronised."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def make_model(args, device: torch.device) -> EMCLNet:
    torch.manual_seed(0)
    cfg = BACKBONES["tiny" if args.tiny else args.backbone]
    clip = build_clip(**cfg)
    model = EMCLNet(clip, agg_module="seqTransf", agg_layers=min(4, cfg["text_layers"])).to(device)
    # memory options after EMCLNet is built: its frame transformer copies text blocks, and stays as is
    model.clip.set_grad_checkpointing(args.grad_checkpointing, args.checkpoint_layers)
    if args.lean_activations:
        model.clip.set_lean_activations(True)
    set_activation_memory_budget(args.memory_budget)
    extra = {} if args.compile_mode == "default" else {"mode": args.compile_mode}
    args.compiled = compile_modules(
        [model.clip.visual, model.clip.transformer], args.compile, device, names=["visual", "text"], **extra
    )
    return model


def fake_batch(args, model: EMCLNet, device: torch.device, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = model.clip.image_size
    frames = torch.randint(0, 256, (n, args.frames, 3, s, s), dtype=torch.uint8, generator=g).to(device)
    fmask = torch.ones(n, args.frames, dtype=torch.long)
    fmask[n // 2 :, args.frames // 2 :] = 0  # half the clips are short: masking is exercised
    ids = torch.randint(1, 49405, (n, args.words), generator=g)
    lengths = torch.randint(3, args.words, (n,), generator=g)
    tmask = (torch.arange(args.words)[None] < lengths[:, None]).long()
    ids = ids * tmask
    ids[:, 0] = 49406
    ids[torch.arange(n), lengths - 1] = 49407
    return ids.to(device), tmask.to(device), frames, fmask.to(device)


def bench_train(args, model: EMCLNet, device: torch.device) -> dict:
    model.train()
    groups = param_groups(model, 1e-4, 1e-3, 0.2)
    if args.no_fused_optim:
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-6, foreach=True)
    else:
        opt = build_optimizer(groups, faithful=False)
    batch = fake_batch(args, model, device, args.batch)

    def step():
        with autocast(device, args.precision):
            loss = model(*batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.clamp_logit_scale()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = timed(step, device, args.steps, args.warmup)
    med = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return {"train_clips_per_s": args.batch / med, "train_step_s": med, "peak_mem_gb": peak}


@torch.no_grad()
def bench_eval(args, model: EMCLNet, device: torch.device) -> dict:
    model.eval()
    ids, tmask, frames, fmask = fake_batch(args, model, device, args.batch, seed=1)

    def extract():
        with autocast(device, args.precision):
            model.encode_video(frames, fmask)
            model.encode_text(ids, tmask)

    med = statistics.median(timed(extract, device, max(3, args.steps // 2), args.warmup))
    out = {"eval_clips_per_s": args.batch / med}
    # the CLI's way: uint8 frames from pinned host memory, copied ahead on a side stream
    pin = device.type == "cuda"
    host = [
        {k: v.cpu().pin_memory() if pin else v.cpu() for k, v in zip(("ids", "tm", "fr", "fm"), b)}
        for b in (fake_batch(args, model, torch.device("cpu"), args.batch, seed=s) for s in (4, 5))
    ]
    rounds = max(3, args.steps // 2)

    def extract_from_host():
        for b in prefetch_to_device(host * rounds, device):
            with autocast(device, args.precision):
                model.encode_video(b["fr"], b["fm"])
                model.encode_text(b["ids"], b["tm"])

    med = statistics.median(timed(extract_from_host, device, 3, 1))
    out["eval_host_clips_per_s"] = args.batch * len(host) * rounds / med
    # the full similarity on cached features: A texts x V videos
    g = torch.Generator().manual_seed(2)
    n, d = args.eval_videos, model.clip.embed_dim
    t = torch.randn(n, d, generator=g).to(device)
    f = torch.randn(n, args.frames, d, generator=g).to(device)
    m = torch.ones(n, args.frames, dtype=torch.long, device=device)

    def score_fn(tb, fb, mb):
        with autocast(device, args.precision):
            return model.scores(tb, fb, mb)

    for mode in ("paper", "query"):
        secs = timed(lambda mode=mode: score_matrix(score_fn, t, f, m, mode=mode), device, 3, 1)
        out[f"similarity_{mode}_s" if mode != "paper" else "similarity_s"] = statistics.median(secs)
    if args.paper_loop:  # the reference's way: one EM call per 32 x 32 block from Python

        def loop():
            for i in range(0, n, 32):
                for j in range(0, n, 32):
                    score_fn(t[i : i + 32], f[j : j + 32], m[j : j + 32])

        out["similarity_paper_loop_s"] = statistics.median(timed(loop, device, 2, 1))
    return out


@torch.no_grad()
def parity(args, model: EMCLNet, device: torch.device) -> dict:
    """Loss and similarity of the fast path (bf16 autocast) vs plain fp32 on the same inputs."""
    model.eval()
    ids, tmask, frames, fmask = fake_batch(args, model, device, min(args.batch, 32), seed=3)
    out = {}
    for name, prec in (("fp32", "fp32"), ("fast", "bf16")):
        with autocast(device, prec):
            t = model.encode_text(ids, tmask).float()
            f = model.encode_video(frames, fmask).float()
            s = model.scores(t, f, fmask)
            loss = model.loss_from_features(t, f, fmask)
        out[name] = (float(loss), s.float())
    ref_loss, ref_s = out["fp32"]
    fast_loss, fast_s = out["fast"]
    return {
        "parity_loss_fp32": ref_loss,
        "parity_loss_fast": fast_loss,
        "parity_loss_rel_diff": abs(fast_loss - ref_loss) / max(abs(ref_loss), 1e-12),
        "parity_similarity_max_abs_diff": float((fast_s - ref_s).abs().max()),
        "parity_no_emcl_ok": bool(torch.isfinite(emcl_scores(t, f, fmask, None, model.temp)).all()),
    }


CLI_MODULE = "video_retrieval.emcl_net.main_task_retrieval"


def make_e2e_data(args, work: Path) -> dict:
    """Synthetic MSR-VTT-layout clips at the model's image size, and their frame cache."""
    from emcl.data.cache import build_cache
    from emcl.data.synthetic import make_synthetic

    size = BACKBONES["tiny" if args.tiny else args.backbone]["image_size"]
    captions = 20  # training samples are captions: few videos cover max_steps batches in one epoch
    n_train = math.ceil(args.max_steps * args.batch / captions) + 1
    n_test = 8 if args.tiny else 32
    data = work / "data"
    make_synthetic(
        data,
        n_train + n_test,
        seed=0,
        format="msrvtt",
        split_sizes=(n_train, 0, n_test),
        frames=args.frames,
        fps=1,
        size=size,
        captions_per_video=captions,
    )
    cache = work / f"frames_{args.frames}x1fps_{size}px.h5"
    build_cache(
        data / "videos",
        cache,
        max_frames=args.frames,
        framerate=1.0,
        size=size,
        workers=min(8, max(0, (os.cpu_count() or 1) - 1)) if not args.tiny else 0,
        progress=False,
    )
    return {"anno": data / "annotations", "videos": data / "videos", "cache": cache, "size": size}


def cli_argv(args, work: Path, data: dict, workers: int) -> list[str]:
    """The CLI's flags for the same model, batch and settings as the bare step."""
    clip_cfg = dict(BACKBONES["tiny" if args.tiny else args.backbone])
    config = {
        "datatype": "msrvtt",
        "clip_config": clip_cfg,
        "agg_module": "seqTransf",
        "agg_layers": min(4, clip_cfg["text_layers"]),
        "max_words": args.words,
        "max_frames": args.frames,
        "video_framerate": 1,
        "image_size": data["size"],
    }
    save_yaml(config, work / "e2e.yaml")
    argv = [
        "--config", str(work / "e2e.yaml"), "--do_train", "1", "--anno_path", str(data["anno"]),
        "--video_path", str(data["videos"]), "--frame_cache", str(data["cache"]),
        "--output_dir", str(work / f"run_{os.getpid()}_{int(time.time())}"),
        "--device", args.device, "--precision", args.precision, "--batch_size", str(args.batch),
        "--batch_size_val", str(args.batch), "--epochs", "1", "--max_steps", str(args.max_steps),
        "--workers", str(workers), "--n_display", str(args.max_steps), "--seed", "0",
    ]  # fmt: skip
    if args.compile != "auto":  # auto is the CLI's default too
        argv += ["--compile", args.compile]
    if args.grad_checkpointing != "none":
        argv += ["--grad_checkpointing"]
        if args.grad_checkpointing != "blocks" or args.checkpoint_layers is not None:
            argv += [args.grad_checkpointing]
            if args.checkpoint_layers is not None:
                argv += ["--checkpoint_layers", str(args.checkpoint_layers)]
    if args.lean_activations:
        argv += ["--lean_activations", "1"]
    return argv


def bench_e2e(args, device: torch.device) -> dict:
    """Run the real CLI in this process and time its optimiser steps after ``--e2e_warmup`` steps.

    A global optimiser post-step hook stamps each step; the device is synchronised only at the first
    and last timed step, so the loop's own (lack of) host syncs is what is measured.
    """
    import runpy

    from torch.optim.optimizer import register_optimizer_step_post_hook

    work = Path(args.e2e_dir) if args.e2e_dir else Path(tempfile.mkdtemp(prefix="emcl_e2e_"))
    work.mkdir(parents=True, exist_ok=True)
    workers = args.e2e_workers
    if workers is None:
        workers = 0 if args.tiny else max(1, min(16, (os.cpu_count() or 2) - 2))
    t0 = time.perf_counter()
    data = make_e2e_data(args, work)
    prep_s = time.perf_counter() - t0
    stamps: list[float] = []

    def stamp(optimizer, *_):
        k = len(stamps) + 1  # this step's number
        if k in (args.e2e_warmup, args.max_steps):
            sync(device)
        stamps.append(time.perf_counter())

    from torch._dynamo.utils import counters

    graphs_before = counters["stats"]["unique_graphs"]
    handle = register_optimizer_step_post_hook(stamp)
    argv = cli_argv(args, work, data, workers)
    old_argv = sys.argv
    sys.argv = [CLI_MODULE, *argv]
    try:
        runpy.run_module(CLI_MODULE, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"the CLI exited with {exc.code}: {' '.join(argv)}") from exc
    finally:
        sys.argv = old_argv
        handle.remove()
    if len(stamps) != args.max_steps:
        raise RuntimeError(
            f"the CLI made {len(stamps)} optimiser steps, expected --max_steps {args.max_steps}"
        )
    secs = stamps[-1] - stamps[args.e2e_warmup - 1]
    timed_steps = args.max_steps - args.e2e_warmup
    out = {
        "e2e_clips_per_s": timed_steps * args.batch / secs,
        "e2e_steps_per_s": timed_steps / secs,
        "e2e_timed_steps": timed_steps,
        "e2e_workers": workers,
        "e2e_data_prep_s": prep_s,
        # graphs dynamo compiled during the CLI run: 0 means the CLI ran eagerly
        "e2e_compiled_graphs": counters["stats"]["unique_graphs"] - graphs_before,
    }
    if not args.e2e_dir:
        shutil.rmtree(work, ignore_errors=True)
    return out


def main(argv=None) -> dict:
    args = parse(argv)
    device = torch.device(args.device)
    # no TF32: the scoring after the encoders is float32 by policy (docs/reference.md, 'Precision'),
    # as in the CLI
    try:
        model = make_model(args, device)
        res: dict = {
            "device": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
            "backbone": "tiny" if args.tiny else args.backbone,
            "batch": args.batch,
            "frames": args.frames,
            "words": args.words,
            "precision": args.precision,
            "fused_optim": device.type == "cuda" and not args.no_fused_optim,
            "grad_checkpointing": args.grad_checkpointing,
            "checkpoint_layers": args.checkpoint_layers,
            "lean_activations": args.lean_activations,
            "memory_budget": args.memory_budget,
            "compile_mode": args.compile,
            "compile_options": args.compile_mode,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
        if not args.skip_train:
            res.update(bench_train(args, model, device))
        res.update(bench_eval(args, model, device))
        res.update(parity(args, model, device))
        # compiled, and still compiled after every call (false after a fallback to eager)
        res["compile"] = bool(
            args.compiled and is_compiled(model.clip.visual) and is_compiled(model.clip.transformer)
        )
        if args.e2e:
            del model
            # the CLI compiles its own towers: start from empty dynamo caches so that its graphs do not
            # count against the recompile limit of the code objects compiled here (they would run eagerly)
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            res.update(bench_e2e(args, device))
            if "train_clips_per_s" in res:
                res["e2e_vs_bare"] = res["e2e_clips_per_s"] / res["train_clips_per_s"]
    finally:
        # inductor's compile workers: shut them down now instead of in torch's atexit handler, which
        # waits for a wedged worker sidecar for minutes (what kept the compiled benchmark alive after it
        # had printed its results; see emcl/train/compile.py)
        release_compile_workers()
    rows = [(k, v) for k, v in res.items()]
    width = max(len(k) for k, _ in rows)
    print(
        "\n".join(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in rows)
    )
    if args.json:
        save_json(res, args.json)
    return res


def _exit_guard(seconds: float) -> None:
    """Last resort: end the process if interpreter shutdown (atexit handlers) hangs past ``seconds``.

    A daemon thread keeps running while atexit handlers run; the results are already printed and saved.
    """

    def stop() -> None:
        time.sleep(seconds)
        sys.stderr.write(f"benchmark: shutdown took more than {seconds:.0f} s; exiting\n")
        sys.stderr.flush()
        os._exit(0)

    threading.Thread(target=stop, name="benchmark-exit-guard", daemon=True).start()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    _exit_guard(60.0)
