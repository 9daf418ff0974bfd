"""The Task class and its flag groups: kinds declared once, and a new task built from an existing one runs
end to end on the shared run loop (docs/extending.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from emcl.loss import hinge_topk
from emcl.train.config import nonneg_float
from emcl.train.flags import add_groups, em_group, flag, group
from emcl.train.runner import build_parser, run
from video_retrieval.emcl_net.main_task_retrieval import EMCLNetTask

from ._run_fixtures import REPO, make_data


def test_emcl_net_setting_kinds_are_declared_with_the_flags():
    assert set(EMCLNetTask.arch_keys()) == {
        "clip_config", "clip_path", "agg_module", "agg_layers", "use_emcl", "centerK",
    }  # fmt: skip
    assert set(EMCLNetTask.score_keys()) == {
        "temp", "stage_num", "lamd", "beta", "em_init", "agg_module", "max_words", "max_frames",
        "video_framerate", "image_size", "eval_block", "eval_block_size",
    }  # fmt: skip
    assert set(EMCLNetTask.experiment_keys()) == {
        "anno_path", "video_path", "batch_size", "lr", "coef_lr", "weight_decay", "warmup_proportion",
        "max_grad_norm", "faithful", "seed", "multi_positive", "freeze_patch_embed", "datatype",
        "msrvtt_train", "augment", "momentum", "max_words", "max_frames", "video_framerate", "image_size",
        "stage_num", "lamd", "beta", "em_init",
    }  # fmt: skip


def test_groups_refuse_a_flag_declared_twice_and_unknown_defaults():
    p = argparse.ArgumentParser()
    with pytest.raises(ValueError, match="--lamd declared twice"):
        add_groups(p, [em_group(8, 3, 1.0), group("mine", flag("--lamd", type=float))])
    with pytest.raises(KeyError, match="no flag temperature"):
        em_group(8, 3, 1.0).defaults(temperature=2)
    with pytest.raises(ValueError, match="kinds"):
        flag("--x", kind="weights")


def test_task_defaults_reach_the_parser():
    cfg = build_parser(EMCLNetTask).parse_args([])
    assert (cfg.centerK, cfg.stage_num, cfg.beta, cfg.eval_block_size) == (32, 9, 3.0, 32)
    with pytest.raises(SystemExit):  # the shared EM group's range checks hold in every task
        build_parser(EMCLNetTask).parse_args(["--lamd", "0"])


class HingeTask(EMCLNetTask):
    """A new task the way docs/extending.md writes one: a flag of its own and another loss."""

    name = "emcl_net_hinge"
    module = __name__
    groups = (
        *EMCLNetTask.groups,
        group("hinge loss", flag("--margin", kind="experiment", type=nonneg_float, default=0.2)),
    )

    def build_model(self):
        model = super().build_model()

        def hinge(t, f, mask, video_ids=None):  # the hardest negative of each row and column
            return hinge_topk(model.scores(t, f, mask, update=model.training), self.cfg.margin, 1)

        model.loss_from_features = hinge
        return model


def test_a_new_task_runs_end_to_end_on_the_run_loop(tmp_path):
    data = make_data(tmp_path, num_videos=12)
    out = tmp_path / "run"
    metrics = run(HingeTask, [
        "--config", str(REPO / "configs/synthetic.yaml"), "--datatype", "msvd",
        "--anno_path", str(data / "annotations"), "--video_path", str(data / "videos"),
        "--output_dir", str(out), "--batch_size", "4", "--batch_size_val", "8", "--epochs", "1",
        "--workers", "0", "--max_frames", "4", "--device", "cpu", "--margin", "0.1",
    ])  # fmt: skip
    saved = json.loads(Path(out / "metrics.json").read_text())
    assert saved["finished"] and saved["task"] == "emcl_net_hinge"
    assert set(saved["test"]["policies"]) == {"paper", "query", "none"}
    assert saved["test"]["t2v"] == metrics["test"]["t2v"]
    ck = torch.load(out / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert ck["config"]["margin"] == 0.1 and ck["config"]["task"] == "emcl_net_hinge"
    assert "margin" in HingeTask.experiment_keys() and "margin" not in HingeTask.score_keys()
    # the task's model trains with its own loss
    task = HingeTask(argparse.Namespace(**ck["config"]), None)
    model = task.build_model().eval()
    t, f, mask = torch.randn(4, 64), torch.randn(4, 4, 64), torch.ones(4, 4, dtype=torch.long)
    want = hinge_topk(model.scores(t, f, mask), 0.1, 1)
    assert torch.equal(model.loss_from_features(t, f, mask), want)
