"""The scores of the inference module: one EMCL setting, the score matrix with it or without, its metrics.

Scoring runs through :func:`emcl.evaluation.evaluate_policies`: each named setting (``without_emcl``,
``with_emcl``, a sweep point) gives this rank's rows of the (texts, videos) score matrix, which are
gathered, fused with a TAB pair when there is one, and ranked.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from emcl import dist
from emcl.em import EMCL
from emcl.evaluation import evaluate_policies
from emcl.metrics import evaluate_similarity
from emcl.scoring import pooled_emcl_scores, score_matrix

from .embeddings import Embeddings


@dataclass(frozen=True)
class EMSettings:
    """One EMCL setting: K bases, T iterations, lambda, beta, and the mu draw (init, seed)."""

    K: int  # noqa: N815 - the paper's symbol, as in metrics.json and sweep.csv
    T: int  # noqa: N815
    lamd: float
    beta: float
    init: str
    seed: int

    @classmethod
    def of(cls, cfg: argparse.Namespace) -> EMSettings:
        """The run's setting: ``--centerK`` (``--K``), ``--stage_num``, ``--lamd``, ``--beta``, ``--em_init``,
        ``--seed``."""
        return cls(cfg.centerK, cfg.stage_num, cfg.lamd, cfg.beta, cfg.em_init, cfg.seed)

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


def score_rows(
    emb: Embeddings, em: EMSettings | None, policy: str, block: int, info: dist.DistInfo
) -> torch.Tensor:
    """This rank's rows of the (A, V) float32 score matrix on the cosine scale (no logit scale), with EMCL
    ``em`` or without.

    ``pooled``: EMCL on [video rows; text rows] of each block, ``t . v`` on Y (not renormalised).
    ``text``: EMCL-Net's scores (text-conditioned frame pooling, EMCL on [pair vectors; texts], cosine).
    """
    device = emb.text.device
    if emb.pooling == "text":
        from video_retrieval.emcl_net.model import emcl_scores

        layer = em.layer().to(device) if em is not None else None

        def fn(t, f, m):
            return emcl_scores(t, f, m, layer, emb.temp)

        mask = emb.frame_mask
    else:
        fn = partial(pooled_emcl_scores, mu=None)
        if em is not None:
            fn = partial(
                pooled_emcl_scores, mu=em.layer().mu.to(device), stage_num=em.T, lamd=em.lamd, beta=em.beta
            )
        mask = None
    return score_matrix(
        fn, emb.text, emb.video, mask, mode=policy, block=block, rank=info.rank, world_size=info.world_size
    )


def fuse_tab(sim: torch.Tensor, emb: Embeddings) -> torch.Tensor:
    """A TAB pair is added as ``w * main + (1 - w) * g_t . g_v``; it does not depend on the blocking."""
    if emb.tab_text is None:
        return sim
    w = emb.center_weight
    with torch.autocast(sim.device.type, enabled=False):
        return w * sim + (1.0 - w) * (emb.tab_text.float() @ emb.tab_video.float().t())


def rank(sim: torch.Tensor, emb: Embeddings, cfg: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Raw and DSL metrics of both directions of one gathered score matrix."""
    return evaluate_similarity(
        sim, emb.caption_video, temperature=cfg.dsl_temperature, v2t_candidates=cfg.v2t_candidates
    )


def evaluate_settings(
    emb: Embeddings, settings: dict[str, EMSettings | None], cfg: argparse.Namespace, info: dist.DistInfo
) -> dict[str, Any]:
    """The metrics of every named setting (None: without EMCL) under ``--eval_block``."""
    results, _ = evaluate_policies(
        lambda name: score_rows(emb, settings[name], cfg.eval_block, cfg.eval_block_size, info),
        list(settings),
        lambda sim: rank(fuse_tab(sim, emb), emb, cfg),
    )
    return results
