"""What an inference run reports: the settings it scored with, the table without and with EMCL (log and
``results.md``) and the change EMCL makes."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from emcl.fileio import save_bytes
from emcl.metrics import RANK_KEYS

from .embeddings import Embeddings
from .scores import EMSettings

DIRECTIONS = ("t2v", "v2t", "t2v_dsl", "v2t_dsl")
TABLE_KEYS = ("R1", "R5", "R10", "MdR", "MnR")
_TABLE_NAMES = ("R@1", "R@5", "R@10", "MdR", "MnR")


def _rows(without: dict, with_: dict) -> list[tuple[str, str, list[str]]]:
    rows = []
    for kind, suffix in (("raw", ""), ("DSL", "_dsl")):
        for label, res in (("without EMCL", without), ("with EMCL", with_)):
            cells = [f"{res['t2v' + suffix][k]:.1f}" for k in TABLE_KEYS] + [
                f"{res['v2t' + suffix][k]:.1f}" for k in TABLE_KEYS
            ]
            rows.append((kind, label, cells))
    return rows


def format_results(without: dict, with_: dict, markdown: bool = False) -> str:
    """One table: raw and DSL rows, without and with EMCL, both directions (R@1/5/10, MdR, MnR)."""
    rows = _rows(without, with_)
    if markdown:
        head = (
            "| scores | | "
            + " | ".join(f"t2v {n}" for n in _TABLE_NAMES)
            + " | "
            + " | ".join(f"v2t {n}" for n in _TABLE_NAMES)
            + " |"
        )
        lines = [head, "|" + "---|" * (2 + 2 * len(TABLE_KEYS))]
        lines += [f"| {k} | {label} | " + " | ".join(c) + " |" for k, label, c in rows]
        return "\n".join(lines)
    head = (
        f"{'scores':<7}{'':<14}| "
        + "".join(f"{'t2v ' + n:>9}" for n in _TABLE_NAMES)
        + " | "
        + "".join(f"{'v2t ' + n:>9}" for n in _TABLE_NAMES)
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


def _score_description(cfg: argparse.Namespace, emb: Embeddings) -> str:
    desc = {
        "pooled": "EMCL on [block videos; block texts] (pooled vectors), Y not renormalised, score t.v on Y",
        "text": "EMCL-Net: text-conditioned frame pooling, EMCL on [pair vectors; texts], cosine on Y",
    }[emb.pooling]
    if emb.tab_text is not None:
        desc += f"; fused {emb.center_weight:g} * main + {1 - emb.center_weight:g} * TAB (g_t.g_v)"
    if emb.info.get("source") == "files" and emb.pooling == "pooled":
        desc += "; inputs L2-normalised first (cosine)" if cfg.normalize else "; inputs as given (dot)"
    return desc


def settings_of(cfg: argparse.Namespace, em: EMSettings, emb: Embeddings) -> dict[str, Any]:
    """The ``settings`` of ``metrics.json``: the EM setting, the policy and how the scores are formed."""
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
        "score": _score_description(cfg, emb),
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


def write_results_md(settings: dict[str, Any], without: dict, with_: dict, out: Path) -> None:
    """``results.md``: the settings line and the markdown table (atomic)."""
    text = f"{settings_line(settings)}\n\n{format_results(without, with_, markdown=True)}\n"
    save_bytes(text.encode(), out / "results.md")
