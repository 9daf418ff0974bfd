"""Config files and flags (emcl.train.config): values converted and range-checked like flags, errors that
name the file and the key, the shipped configs, nested config sections."""

from __future__ import annotations

from pathlib import Path

import pytest

from emcl.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _config_parser():
    import argparse

    from emcl.train.config import fraction, nonneg_float, positive_float, positive_int

    p = argparse.ArgumentParser()
    p.add_argument("--config")
    p.add_argument("--epochs", type=positive_int, default=5)
    p.add_argument("--max_steps", type=int, default=0)
    p.add_argument("--lr", type=positive_float, default=1e-4)
    p.add_argument("--lamd", type=positive_float, default=1.0)
    p.add_argument("--weight_decay", type=nonneg_float, default=0.2)
    p.add_argument("--max_skip_fraction", type=fraction, default=0.05)
    p.add_argument("--temp", type=float, default=3.0)
    p.add_argument("--eval_block", default="query", choices=("paper", "query", "none"))
    p.add_argument("--ids", nargs="+", type=int, default=None)
    p.add_argument("--skip_bad_videos", action="store_true")
    p.add_argument("--init_model", default=None)
    p.add_argument("--output_dir", default="runs/x")
    return p


def _parse_yaml(tmp_path, text: str, *argv: str):
    from emcl.train.config import parse_args

    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    return parse_args(_config_parser(), ["--config", str(cfg), *argv], extra_keys=["clip_config"])


def test_config_values_are_converted_like_flags(tmp_path):
    a = _parse_yaml(tmp_path, "epochs: 3\nlr: 1e-3\ntemp: 3\nskip_bad_videos: true\ninit_model: null\n"
                    "output_dir: 2024\nids: [1, 2]\nmax_skip_fraction: 0\neval_block: paper\n")
    assert (a.epochs, a.lr, a.temp, a.skip_bad_videos, a.init_model) == (3, 1e-3, 3.0, True, None)
    assert isinstance(a.lr, float) and isinstance(a.temp, float) and a.output_dir == "2024"
    assert a.ids == [1, 2] and a.max_skip_fraction == 0.0 and a.eval_block == "paper"
    assert _parse_yaml(tmp_path, "epochs: 3\n", "--epochs", "4").epochs == 4  # flags override


@pytest.mark.parametrize(
    "text, expected",
    [
        ("epochs: 1.5", r"epochs: .*1\.5.*not an integer"),
        ("epochs: 0", r"epochs: 0 is out of range \(an integer >= 1\)"),
        ("max_steps: 2.5", r"max_steps: invalid int value: 2\.5"),
        ("lr: -0.1", r"lr: -0\.1 is out of range \(a number > 0\)"),
        ("lr: .nan", r"lr: .*not a finite number"),
        ("lamd: 0", r"lamd: 0 is out of range"),
        ("weight_decay: -1", r"weight_decay: -1 is out of range \(a number >= 0\)"),
        ("max_skip_fraction: 1.5", r"max_skip_fraction: 1\.5 is out of range \(a number from 0 to 1\)"),
        ("temp: fast", r"temp: invalid float value: 'fast'"),
        ("eval_block: Paper", r"eval_block: invalid choice: 'Paper' \(choose from 'paper', 'query', 'none"),
        ("skip_bad_videos: 1", r"skip_bad_videos: expected true or false, got 1"),
        ("epochs: true", r"epochs: expected a positive_int, got true"),
        ("max_steps: false", r"max_steps: expected a int, got false \(use 1 or 0\)"),
        ("epochs: null", r"epochs: null is not allowed"),
        ("epochs: [1]", r"epochs: expected a single value, got a list"),
        ("ids: [1, x]", r"ids: invalid int value: 'x'"),
        ("epoch: 3", r"unknown option\(s\) 'epoch' \(did you mean 'epochs'\?\)"),
        ("lr: [", r"not valid YAML \(line 2"),
        ("- 1", r"expected a mapping"),
    ],
)
def test_bad_config_values_name_the_file_and_key(tmp_path, text, expected):
    with pytest.raises(UserError, match=r"config .*c\.yaml: " + expected) as e:
        _parse_yaml(tmp_path, text + "\n")
    assert isinstance(e.value, ValueError)  # older `except ValueError` callers still catch it


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--epochs", "0"], "argument --epochs: 0 is out of range (an integer >= 1)"),
        (["--lr=-1e-4"], "argument --lr: -1e-4 is out of range (a number > 0)"),
        (["--lamd", "0"], "argument --lamd: 0 is out of range (a number > 0)"),
        (["--lr", "inf"], "argument --lr: 'inf' is not a finite number (a number > 0)"),
        (["--epochs", "2.0"], "argument --epochs: '2.0' is not an integer (an integer >= 1)"),
        (["--lam", "0.5"], "unrecognized arguments: --lam 0.5"),  # no abbreviations
        (["--max_skip", "0.5"], "unrecognized arguments: --max_skip 0.5"),
    ],
)
def test_flags_are_range_checked_and_not_abbreviated(argv, expected, capsys):
    from emcl.train.config import parse_args

    parser = _config_parser()
    parser.allow_abbrev = True  # parse_args turns it off whatever the parser says
    with pytest.raises(SystemExit) as e:
        parse_args(parser, argv)
    assert e.value.code == 2 and expected in capsys.readouterr().err


def _task_of(config: Path):
    """The entry point a shipped config belongs to, by its name."""
    import importlib

    if config.name.startswith("inference"):
        module = "video_retrieval.inference_module.main_task_inference"
    elif config.name.startswith("mmt_"):
        module = "video_retrieval.joint_training.main_task_joint"
    elif "qa" in config.stem.split("_"):
        module = "video_question_answering.main_task_qa"
    else:
        module = "video_retrieval.emcl_net.main_task_retrieval"
    return importlib.import_module(module).TASK


def test_shipped_configs_pass_validation():
    from emcl.train.config import parse_args
    from emcl.train.runner import build_parser

    checked = 0
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        task = _task_of(path)
        if task is not None:
            parse_args(build_parser(task), ["--config", str(path), "--output_dir", "out"], task.config_blocks)
            checked += 1
    assert checked >= 10


def test_config_keys_may_use_an_options_other_name(tmp_path):
    """A key may be any long name of an option (as on the command line); two names of one option are an
    error naming both."""
    import argparse

    from emcl.train.config import parse_args

    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--centerK", "--K", type=int, default=7)
    path = tmp_path / "c.yaml"
    path.write_text("K: 3\n")
    args = parse_args(parser, ["--config", str(path)])
    assert args.centerK == 3 and args._config_keys == {"centerK"} and not hasattr(args, "K")
    assert parse_args(parser, ["--config", str(path), "--centerK", "4"]).centerK == 4
    path.write_text("centerK: 5\nK: 3\n")
    with pytest.raises(UserError, match=r"'centerK' and 'K' both set --centerK \(they name the same"):
        parse_args(parser, ["--config", str(path)])


def test_check_keys_for_nested_config_sections():
    from emcl.train.config import check_keys

    allowed = ["num_videos", "seed", "frames", "out"]
    assert check_keys({"num_videos": 3, "seed": 0}, allowed, "c.yaml: synthetic", ["num_videos"]) == {
        "num_videos": 3, "seed": 0}
    expected = (r"c.yaml: synthetic: unknown key\(s\) 'frame' \(did you mean 'frames'\?\); "
                r"allowed keys: num_videos, seed, frames, out")
    with pytest.raises(UserError, match=expected):
        check_keys({"frame": 3}, allowed, "c.yaml: synthetic")
    with pytest.raises(UserError, match=r"missing required key\(s\) seed"):
        check_keys({"num_videos": 3}, allowed, "s", ["num_videos", "seed"])
    with pytest.raises(UserError, match="s: expected a mapping, got list"):
        check_keys([1], allowed, "s")
