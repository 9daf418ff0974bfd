"""What the retrieval tasks (EMCL-Net, joint training) share: encode a split once, score it under every
evaluation policy (``paper``, ``query``, ``none``), report the headline policy, select on text-to-video R@1.

A retrieval task supplies ``load_split(name)`` (a :class:`~emcl.data.annotations.RetrievalSplit`),
``encode(model, split)`` and ``score_rows(model, features, policy)``; it may override ``rank`` (the
metrics of one score matrix) and ``policies(model, split)``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

import torch
from torch import nn

from emcl.evaluation import evaluate_policies
from emcl.metrics import CAPTION_DIRECTIONS, DIRECTIONS, evaluate_similarity, format_table
from emcl.train.flags import EVAL_POLICIES, Group, evaluation_group
from emcl.train.sources import check_skip_fraction
from emcl.train.task import Task

log = logging.getLogger("emcl.retrieval")

RANK_COLUMNS = ("R1", "R5", "R10", "R50", "MdR", "MnR")


class RetrievalTask(Task):
    """Text-video retrieval: every policy scored from one set of features."""

    evaluation: ClassVar[Group] = evaluation_group(32, EVAL_POLICIES)
    policy_note: ClassVar[str] = ""  # a line under the policy table saying what each policy does

    def load_split(self, name: str) -> Any:
        raise NotImplementedError

    def score_rows(self, model: nn.Module, features: Any, policy: str) -> torch.Tensor:
        """This rank's rows of the (texts, videos) score matrix under ``policy``."""
        raise NotImplementedError

    def rank(self, sim: torch.Tensor, caption_video: torch.Tensor) -> dict[str, Any]:
        """The retrieval metrics of one gathered score matrix."""
        return evaluate_similarity(sim, caption_video)

    def policies(self, model: nn.Module, split: Any) -> tuple[str, ...]:
        """A model without an EMCL layer scores the same under every policy: only ``none`` is scored."""
        if getattr(model, "emcl", None) is None:
            log.info("the model has no EMCL layer: only policy 'none' is scored")
            return ("none",)
        return EVAL_POLICIES

    def usable(self, split: Any, features: Any) -> tuple[Any, torch.Tensor, dict[str, Any]]:
        """The features and caption-to-video map to score, and what to report about them (a task whose
        videos can be skipped leaves them out here)."""
        return features, torch.tensor(split.caption_video), {}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, Any]:
        """Encode ``split`` once, then score it under every policy; the headline rows (``t2v``, ``v2t``,
        ...) follow ``--eval_block``, every policy is kept under ``policies``."""
        model.eval()
        start = time.perf_counter()
        data = self.load_split(split)
        features = self.encode(model, data)
        features, caption_video, report = self.usable(data, features)
        caption_video = caption_video.to(self.info.device)
        encode_s = time.perf_counter() - start
        policies, seconds = evaluate_policies(
            lambda policy: self.score_rows(model, features, policy),
            self.policies(model, data),
            lambda sim: self.rank(sim, caption_video),
        )
        headline = self.cfg.eval_block if self.cfg.eval_block in policies else next(iter(policies))
        results: dict[str, Any] = dict(policies[headline])
        results.update(
            eval_block=headline,
            policies=policies,
            **report,
            seconds={"features": round(encode_s, 2), **seconds},
        )
        return results

    def format_results(self, res: dict[str, Any]) -> str:
        """The headline table, then one line per policy and direction: the policies side by side."""
        lines = [
            f"headline policy: {res['eval_block']} ({res['num_texts']} texts x {res['num_videos']} videos)"
        ]
        lines.append(format_table({k: v for k, v in res.items() if k in (*DIRECTIONS, *CAPTION_DIRECTIONS)}))
        keys = [k for k in RANK_COLUMNS if k in next(iter(res["policies"].values()))["t2v"]]
        lines.append(f"{'policy':<7} {'direction':<17}" + "".join(f"{k:>8}" for k in keys))
        for policy, rows in res["policies"].items():
            for direction, row in rows.items():
                lines.append(f"{policy:<7} {direction:<17}" + "".join(f"{row[k]:>8.1f}" for k in keys))
        if self.policy_note:
            lines.append(self.policy_note)
        return "\n".join(lines)

    def select_key(self, results: dict[str, Any]) -> tuple[float, float, float]:
        """Text-to-video R@1, then R@5 and R@10 as tie-breakers, of the headline policy."""
        r = results["t2v"]
        return r["R1"], r["R5"], r["R10"]


def drop_unreadable(split: Any, t: torch.Tensor, video: tuple[torch.Tensor, ...], ok: torch.Tensor,
                    cfg: Any) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, int]:
    """Videos that could not be read (only with ``--skip_bad_videos``) leave the gallery, and their
    captions the queries; logged and held against ``--max_skip_fraction``. Returns ((t, *video), the
    caption-to-video map, the number left out)."""
    caption_video = torch.tensor(split.caption_video, device=t.device)
    num_bad = int((~ok).sum())
    if num_bad:
        bad_ids = [split.video_ids[i] for i in (~ok).nonzero().flatten().tolist()]
        what = f"{split.datatype}/{split.split}"
        log.warning("%s: %d unreadable video(s) left out of evaluation: %s", what, num_bad,
                    ", ".join(bad_ids[:20]))
        check_skip_fraction(bad_ids, len(split.video_ids), what, cfg)
        keep_v = ok.nonzero().flatten()
        new_index = torch.full_like(ok, -1, dtype=torch.long)
        new_index[keep_v] = torch.arange(len(keep_v), device=t.device)
        keep_t = ok[caption_video]
        t, caption_video = t[keep_t], new_index[caption_video[keep_t]]
        video = tuple(x[keep_v] for x in video)
    return (t, *video), caption_video, num_bad
