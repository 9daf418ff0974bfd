"""Time EMCL-Net's real training step and evaluation with random weights and synthetic tensors.

    python scripts/benchmark.py --device cuda --backbone ViT-B/32 --batch 128 --frames 12 --json bench.json
    python scripts/benchmark.py --device cpu --tiny --json out.json          # seconds, used by the tests

Reports train clips/s (forward, backward, optimiser step), peak memory, evaluation feature-extraction
clips/s, the 1k x 1k similarity time under ``--eval_block paper`` (batched blocks) and ``query``, and the
fast path's numerical parity with the plain fp32 path on the same inputs. Timings are medians of
repeated, device-synchronised runs after warm-up. Switches turn each optimisation off to measure it.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emcl.clip import build_clip  # noqa: E402
from emcl.fileio import save_json  # noqa: E402
from emcl.scoring import score_matrix  # noqa: E402
from emcl.train.amp import autocast  # noqa: E402
from emcl.train.optim import build_optimizer, param_groups  # noqa: E402
from video_retrieval.emcl_net.model import EMCLNet, emcl_scores  # noqa: E402

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
    p.add_argument("--grad_checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the CLIP towers")
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
    if args.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    model = EMCLNet(clip, agg_module="seqTransf", agg_layers=min(4, cfg["text_layers"])).to(device)
    if args.compile:
        model.clip.visual.compile()
        model.clip.transformer.compile()
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


def main(argv=None) -> dict:
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
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
        "compile": args.compile,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if not args.skip_train:
        res.update(bench_train(args, model, device))
    res.update(bench_eval(args, model, device))
    res.update(parity(args, model, device))
    rows = [(k, v) for k, v in res.items()]
    width = max(len(k) for k, _ in rows)
    print(
        "\n".join(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in rows)
    )
    if args.json:
        save_json(res, args.json)
    return res


if __name__ == "__main__":
    main()
