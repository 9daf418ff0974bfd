"""Run scripts/benchmark.py once per setting (a fresh process each, so every peak is its own) and write the
speed-memory table of docs/performance.md as Markdown.

    python scripts/perf_sweep.py --out perf/                    # all settings below, ~40 min on one H100
    python scripts/perf_sweep.py --out perf/ --only default eager lean_mlp4
    python scripts/perf_sweep.py --out perf/ --table_only       # rebuild perf/table.md from the JSON files

Each setting writes ``OUT/NAME.json``; ``OUT/table.md`` gets one row per setting: train clips/s, peak GB,
evaluation clips/s (device-resident and from pinned host memory), the 1k x 1k similarity seconds, and
whether the compiled path stayed compiled. A setting that fails is recorded with its exit status and the
sweep goes on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name: (benchmark flags, what it is)
SETTINGS: dict[str, tuple[list[str], str]] = {
    "default": ([], "B/32, compile auto (on CUDA), bf16"),
    "eager": (["--compile", "0"], "B/32 eager bf16 (the old default)"),
    "eager_lean": (["--compile", "0", "--lean_activations"], "eager, lean QuickGELU/LayerNorm"),
    "eager_mlp6": (
        ["--compile", "0", "--grad_checkpointing", "mlp", "--checkpoint_layers", "6"],
        "eager, MLP ckpt 6",
    ),
    "eager_blocks": (["--compile", "0", "--grad_checkpointing"], "eager, whole-block ckpt (all)"),
    "lean": (["--lean_activations"], "compiled, lean activations"),
    "budget0.7": (["--memory_budget", "0.7"], "compiled, activation memory budget 0.7"),
    "budget0.5": (["--memory_budget", "0.5"], "compiled, activation memory budget 0.5"),
    "mlp2": (["--grad_checkpointing", "mlp", "--checkpoint_layers", "2"], "compiled, MLP ckpt first 2"),
    "mlp4": (["--grad_checkpointing", "mlp", "--checkpoint_layers", "4"], "compiled, MLP ckpt first 4"),
    "mlp8": (["--grad_checkpointing", "mlp", "--checkpoint_layers", "8"], "compiled, MLP ckpt first 8"),
    "attn12": (["--grad_checkpointing", "attn"], "compiled, attention ckpt all"),
    "blocks": (["--grad_checkpointing"], "compiled, whole-block ckpt all"),
    "lean_mlp4": (
        ["--lean_activations", "--grad_checkpointing", "mlp", "--checkpoint_layers", "4"],
        "compiled, lean + MLP ckpt first 4",
    ),
    "autotune": (["--compile_mode", "max-autotune-no-cudagraphs"], "compiled, max-autotune (no CUDA graphs)"),
    "b16_blocks": (["--backbone", "ViT-B/16", "--grad_checkpointing"], "B/16, compiled, whole-block ckpt"),
    "b16_mlp": (["--backbone", "ViT-B/16", "--grad_checkpointing", "mlp"], "B/16, compiled, MLP ckpt all"),
    "b16_budget0.5": (["--backbone", "ViT-B/16", "--memory_budget", "0.5"], "B/16, compiled, budget 0.5"),
    "e2e": (["--e2e"], "B/32 default + the real CLI for --max_steps steps from a 224-px frame cache"),
}


def fmt(v, digits: int = 0) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:,.{digits}f}"


def table(out: Path, names: list[str]) -> str:
    rows = [
        "| setting | what | train clips/s | peak GB | eval clips/s | eval from host | 1k×1k paper s "
        "| compiled | e2e clips/s (vs bare) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    device = torch_version = None
    for name in names:
        path = out / f"{name}.json"
        what = SETTINGS[name][1]
        if not path.is_file():
            err = out / f"{name}.err"
            status = err.read_text().strip().splitlines()[-1][:80] if err.is_file() else "not run"
            rows.append(f"| {name} | {what} | {status} | | | | | | |")
            continue
        r = json.loads(path.read_text())
        device, torch_version = r.get("device"), r.get("torch")
        e2e = "–"
        if "e2e_clips_per_s" in r:
            e2e = f"{r['e2e_clips_per_s']:,.0f} ({r.get('e2e_vs_bare', 0):.0%})"
        rows.append(
            f"| {name} | {what} | {fmt(r.get('train_clips_per_s'))} | {fmt(r.get('peak_mem_gb'), 1)} "
            f"| {fmt(r.get('eval_clips_per_s'))} | {fmt(r.get('eval_host_clips_per_s'))} "
            f"| {fmt(r.get('similarity_s'), 3)} | {fmt(r.get('compile'))} | {e2e} |"
        )
    head = f"Measured on {device}, torch {torch_version} (scripts/perf_sweep.py).\n\n" if device else ""
    return head + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="perf")
    p.add_argument("--only", nargs="+", choices=list(SETTINGS), default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per setting")
    p.add_argument("--table_only", action="store_true")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: flags for every benchmark run")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.only or list(SETTINGS)
    extra = [a for a in args.extra if a != "--"]
    if not args.table_only:
        for name in names:
            cmd = [sys.executable, str(ROOT / "scripts/benchmark.py"), "--device", args.device]
            cmd += [*SETTINGS[name][0], *extra, "--json", str(out / f"{name}.json")]
            print("$", " ".join(cmd), flush=True)
            try:
                proc = subprocess.run(cmd, cwd=ROOT, timeout=args.timeout, capture_output=True, text=True)
                rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-4000:]
            except subprocess.TimeoutExpired:
                rc, tail = "timeout", f"timed out after {args.timeout} s"
            if rc != 0:
                (out / f"{name}.err").write_text(f"{tail}\nexit status {rc}\n")
                print(f"  {name}: failed ({rc})", flush=True)
    md = table(out, names)
    (out / "table.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
