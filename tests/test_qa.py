"""EMCL-QA: accuracy accounting, the MSRVTT-QA parser, synthetic QA data, masked pooling, and runs of the
entry point on a tiny synthetic set (one process, two processes under torchrun/gloo, eval-only)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from emcl.clip import build_clip, tokenize
from emcl.data.annotations import load_ans2label, load_qa_split
from emcl.data.synthetic import make_questions, make_synthetic, sample_attributes
from emcl.metrics import qa_accuracy

ROOT = Path(__file__).resolve().parents[1]
MODULE = "video_question_answering.main_task_qa"


# ------------------------------------------------------------------------------------------- accuracy
def test_accuracy_counts_out_of_vocabulary_answers_as_wrong_and_reports_the_filtered_number() -> None:
    vocab = {"couch": 0, "man": 1, "sit": 2, "talk": 3}
    rows = [  # (prediction, answer, type)
        (0, "couch", "what"),  # right
        (1, "sit", "what"),  # wrong
        (0, "coversation", "what"),  # out of vocabulary: wrong whatever is predicted
        (1, "man", "who"),  # right
        (3, "talk", "how"),  # right
        (3, "mumble", "how"),  # out of vocabulary
        (2, "nowhere-land", "where"),  # out of vocabulary
    ]
    preds, answers, types = zip(*rows)
    r = qa_accuracy(torch.tensor(preds), answers, types, vocab)
    assert r["num_questions"] == 7 and r["oov_count"] == 3 and r["correct"] == 3
    assert r["accuracy"] == pytest.approx(100 * 3 / 7)
    assert r["accuracy_filtered"] == pytest.approx(100 * 3 / 4)
    assert list(r["per_type"]) == ["what", "who", "how", "where"]  # MSRVTT-QA's order
    what, who, how, where = (r["per_type"][t] for t in ("what", "who", "how", "where"))
    assert (what["num_questions"], what["oov_count"], what["correct"]) == (3, 1, 1)
    assert what["accuracy"] == pytest.approx(100 / 3) and what["accuracy_filtered"] == pytest.approx(50.0)
    assert who["accuracy"] == who["accuracy_filtered"] == 100.0
    assert how["accuracy"] == 50.0 and how["accuracy_filtered"] == 100.0
    assert where["accuracy"] == 0.0 and where["accuracy_filtered"] is None  # nothing left after filtering
    json.dumps(r, allow_nan=False)  # strict JSON
    with pytest.raises(ValueError, match="predictions"):
        qa_accuracy([0], ["couch", "man"], ["what", "who"], vocab)


# --------------------------------------------------------------------------------------------- parser
def _write(folder: Path, name: str, lines: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(line + "\n" for line in lines))
    return folder / name


GOOD = json.dumps(
    {"answer": "guitar", "question": "what is the man playing?", "video_id": "video7", "answer_type": "what"}
)


def test_parser_reads_the_real_layout_and_names_file_and_line_on_bad_input(tmp_path: Path) -> None:
    d = tmp_path / "anno"
    _write(d, "val.jsonl", [GOOD, "", GOOD.replace("video7", "video9").replace("guitar", "drum")])
    _write(d, "train_ans2label.json", ['{', '"drum": 0,', '"guitar": 1', '}'])
    qa = load_qa_split(d, "val")
    assert [r.video_id for r in qa.records] == ["video7", "video9"] and qa.video_ids == ["video7", "video9"]
    assert qa.records[1].line == 3 and qa.records[0].answer_type == "what"
    assert load_ans2label(d) == {"drum": 0, "guitar": 1}

    bad_lines = {
        '{"answer": "x", "question": "what?", "video_id": "v1", "answer_type": "what"': "not valid JSON",
        '{"question": "what?", "video_id": "v1", "answer_type": "what"}': "lacks 'answer'",
        '{"answer": 3, "question": "what?", "video_id": "v1"}': "'answer' is int",
        '{"answer": "x", "question": "  ", "video_id": "v1"}': "'question' is empty",
        '["x", "what?", "v1"]': "expected a JSON object",
    }
    for line, what in bad_lines.items():
        path = _write(d, "test.jsonl", [GOOD, GOOD, line])
        with pytest.raises(ValueError, match=rf"{path}: line 3: .*{what}"):
            load_qa_split(d, "test")
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        load_qa_split(d, "train")
    _write(d, "train_ans2label.json", ['{"drum": 0, "guitar": 0}'])
    with pytest.raises(ValueError, match="train_ans2label.json: answers 'drum' and 'guitar' share id 0"):
        load_ans2label(d)
    _write(d, "train_ans2label.json", ['{"drum": 0, "guitar": 2}'])
    with pytest.raises(ValueError, match="'guitar' has id 2"):
        load_ans2label(d)


# ------------------------------------------------------------------------------------------ synthetic
def test_synthetic_qa_writes_the_real_format_with_out_of_vocabulary_answers(tmp_path: Path) -> None:
    kw = dict(num_videos=40, seed=4, format="msrvtt_qa", split_sizes=(28, 4, 8), frames=8, fps=4, size=32)
    anno = make_synthetic(tmp_path / "a", **kw)
    assert sorted(p.name for p in anno.iterdir()) == ["test.jsonl", "train.jsonl", "train_ans2label.json",
                                                        "val.jsonl"]
    first = json.loads((anno / "train.jsonl").read_text().splitlines()[0])
    assert list(first) == ["answer", "question", "video_id", "answer_type"]  # the real key order
    vocab = load_ans2label(anno)
    assert sorted(vocab) == list(vocab) and list(vocab.values()) == list(range(len(vocab)))  # alphabetical
    records = [r for s in ("train", "val", "test") for r in load_qa_split(anno, s).records]
    assert len(records) == 5 * 40 and {r.answer_type for r in records} == {"what", "how", "where"}
    assert any(r.answer not in vocab for r in records)  # rare paraphrases fall outside the vocabulary
    assert all(r.answer not in r.question.split() for r in records)
    again = make_synthetic(tmp_path / "b", **kw)
    assert all((anno / f).read_bytes() == (again / f).read_bytes() for f in os.listdir(anno))
    # every attribute is asked about once per clip, answers follow the attributes
    a = sample_attributes(random.Random(1))
    qs = make_questions(a, random.Random(2))
    assert len(qs) == 5
    counts = {1: "one", 2: "two", 3: "three"}
    assert {q["answer"] for q in qs if q["answer_type"] == "how"} == {counts[a.count]}


# ------------------------------------------------------------------------------------------- pooling
def _tiny_model(**kw):
    from video_question_answering.model import EMCLQA

    torch.manual_seed(0)
    clip = build_clip(32, image_size=16, patch_size=8, vision_width=32, vision_layers=1, text_width=32,
                      text_layers=1)
    return EMCLQA(clip, ["a", "b", "c"], temporal_layers=1, proj_dim=16, hidden_dim=24, **kw).eval()


def test_masked_pooling_does_not_depend_on_the_padding() -> None:
    from video_question_answering.model import AttentionPool

    torch.manual_seed(0)
    pool = AttentionPool(8)
    x = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    ref = pool(x, mask)
    longer = torch.cat([x, torch.full((3, 4, 8), float("inf"))], dim=1)  # even non-finite padding
    longer[:, :5][mask == 0] = float("nan")
    out = pool(longer, torch.cat([mask, torch.zeros(3, 4, dtype=torch.long)], dim=1))
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)
    assert torch.equal(pool(x, torch.zeros_like(mask)), torch.zeros(3, 8))  # nothing to pool

    # the whole model: questions padded to 12 or 20 tokens, clips of 3 frames padded to 4 or 7 slots
    model = _tiny_model()
    q = ["what is the man playing?", "who sings?"]
    (i12, m12), (i20, m20) = tokenize(q, 12), tokenize(q, 20)
    with torch.no_grad():
        assert torch.allclose(model.encode_question(i12, m12), model.encode_question(i20, m20), atol=1e-5)
        frames = torch.randint(0, 256, (2, 7, 3, 16, 16), dtype=torch.uint8)  # padding slots hold noise
        mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0]])
        v4, v7 = model.encode_video(frames[:, :4], mask[:, :4]), model.encode_video(frames, mask)
        assert torch.allclose(v4, v7, atol=1e-5)
        # and the mask matters: unmasking the padding changes the result
        assert not torch.allclose(v7, model.encode_video(frames, torch.ones_like(mask)), atol=1e-3)


def test_loss_is_float32_and_evaluation_logits_ignore_emcl() -> None:
    model = _tiny_model(dropout=0.0).train()
    ids, mask = tokenize(["what is it?"] * 4, 12)
    frames = torch.randint(0, 256, (4, 3, 3, 16, 16), dtype=torch.uint8)
    fmask = torch.ones(4, 3, dtype=torch.long)
    mu0 = model.emcl.mu.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, ce, nce = model(ids, mask, frames, fmask, torch.tensor([0, 1, 2, 0]))
    assert loss.dtype == ce.dtype == nce.dtype == torch.float32
    assert loss.item() == pytest.approx(ce.item() + 0.5 * nce.item(), rel=1e-6)
    assert not torch.equal(model.emcl.mu, mu0)  # mu follows its momentum update in training
    loss.backward()
    model.eval()
    with torch.no_grad():
        v, q = model.encode_video(frames, fmask), model.encode_question(ids, mask)
        before = model.answer_logits(v, q)
        model.emcl.mu.mul_(-3.0)
        assert torch.equal(model.answer_logits(v, q), before)


# ------------------------------------------------------------------------------------------------ runs
@pytest.fixture(scope="module")
def qa_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syn_qa")
    # a small vocabulary: some training answers fall outside it too
    make_synthetic(out, 24, seed=5, format="msrvtt_qa", split_sizes=(14, 4, 6), frames=8, fps=4, size=32,
                   vocab_size=16)
    return out


def flags(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config", str(ROOT / "configs/synthetic_qa.yaml"), "--anno_path", str(data / "annotations"),
        "--video_path", str(data / "videos"), "--output_dir", str(out), "--batch_size", "8",
        "--batch_size_val", "16", "--workers", "0", "--epochs", "1", "--n_display", "1", "--device", "cpu",
        "--dropout", "0", *extra,
    ]  # fmt: skip


def run(args: list[str], nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*(launcher if nproc > 1 else [sys.executable]), "-m", MODULE, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_run_metrics_two_processes_and_eval_only_reproduction(qa_data: Path, tmp_path: Path) -> None:
    one, two, ev = tmp_path / "one", tmp_path / "two", tmp_path / "eval"
    proc = run(flags(qa_data, one, "--max_steps", "2"))
    assert "training questions have an answer outside" in proc.stdout  # skipped and counted, no crash
    m = json.loads((one / "metrics.json").read_text())
    test = m["test"]
    assert {"accuracy", "accuracy_filtered", "per_type", "oov_count", "majority_baseline"} <= set(test)
    assert test["num_questions"] == 6 * 5 and set(test["per_type"]) == {"what", "how", "where"}
    vocab = load_ans2label(qa_data / "annotations")
    oov = sum(r.answer not in vocab for r in load_qa_split(qa_data / "annotations", "test").records)
    assert test["oov_count"] == oov
    assert m["train"]["selected_on"] == "val" and "val" in m["train"]["history"][0]
    ck = load(one / "checkpoint_best.pt")
    assert "emcl.mu" in ck["model"] and ck["model"]["_extra_state"]["answers"] == list(vocab)

    # two processes on the same global batch (dropout 0; mu's update is averaged over ranks)
    run(flags(qa_data, two, "--max_steps", "2"), nproc=2)
    a, b = load(one / "checkpoint_last.pt"), load(two / "checkpoint_last.pt")
    assert a["step"] == b["step"] == 2
    loss_a, loss_b = a["best"]["history"][0]["loss"], b["best"]["history"][0]["loss"]
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    for k, va in a["model"].items():
        if torch.is_tensor(va) and va.is_floating_point():
            assert torch.allclose(va, b["model"][k], atol=2e-5, rtol=1e-4), k
    assert not torch.equal(a["model"]["emcl.mu"], torch.sign(a["model"]["emcl.mu"]))  # mu moved
    m2 = json.loads((two / "metrics.json").read_text())
    assert m2["test"]["accuracy"] == test["accuracy"] and m2["test"]["per_type"] == test["per_type"]

    # evaluating the saved checkpoint alone reproduces the run's test numbers exactly
    run(flags(qa_data, ev, "--do_eval", "1", "--init_model", str(one / "checkpoint_best.pt")))
    e = json.loads((ev / "metrics.json").read_text())
    for key in ("accuracy", "accuracy_filtered", "per_type", "oov_count", "majority_baseline"):
        assert e["test"][key] == test[key], key


# ------------------------------------------------------------------------------------ task and data
def test_settings_kinds_are_declared_with_the_flags() -> None:
    from video_question_answering.main_task_qa import QATask

    assert set(QATask.arch_keys()) == {"centerK", "clip_config", "clip_path", "hidden_dim", "proj_dim",
                                       "temporal_layers", "use_emcl"}
    assert set(QATask.score_keys()) == {"image_size", "max_frames", "max_words", "video_framerate"}
    assert set(QATask.experiment_keys()) == {
        "anno_path", "batch_size", "beta", "coef_lr", "dropout", "em_init", "faithful",
        "freeze_clip_embeddings", "image_size", "lamd", "lr", "max_frames", "max_grad_norm", "max_words",
        "momentum", "nce_weight", "optimizer", "per_tensor_clip", "seed", "stage_num", "video_framerate",
        "video_path", "warmup_proportion", "weight_decay"}  # fmt: skip


def test_datasets_leave_out_of_vocabulary_questions_and_check_data_names_missing_videos(
    qa_data: Path, tmp_path: Path, caplog
) -> None:
    import logging
    import shutil

    from emcl.data.qa_datasets import QATrainDataset, QuestionDataset, ans2label, qa_split, qa_tokens
    from emcl.data.sources import VideoSource
    from emcl.train.runner import parse
    from video_question_answering.main_task_qa import QATask

    anno = str(qa_data / "annotations")
    qa, vocab = qa_split(anno, "train"), ans2label(anno)
    ids, mask = qa_tokens(anno, "train", 16)
    source = VideoSource(str(qa_data / "videos"), framerate=2.0, max_frames=4, size=32)
    with caplog.at_level(logging.WARNING, logger="emcl.data"):
        ds = QATrainDataset(qa, source, ids, mask, vocab)
    assert ds.num_oov == sum(r.answer not in vocab for r in qa.records) > 0
    assert len(ds) + ds.num_oov == len(qa.records) and "left out of training" in caplog.text
    item, first = ds[0], int(ds.index[0])
    assert int(item["label"]) == vocab[qa.records[first].answer] and torch.equal(item["text_ids"], ids[first])
    assert item["frames"].shape == (4, 3, 32, 32)
    questions = QuestionDataset(qa, ids, mask)
    assert len(questions) == len(qa.records) and int(questions[7]["video_index"]) == qa.record_video[7]

    videos = tmp_path / "videos"  # one test video missing
    shutil.copytree(qa_data / "videos", videos)
    gone = qa_split(anno, "test").video_ids[0]
    (videos / f"{gone}.mp4").unlink()
    cfg = parse(QATask, flags(qa_data, tmp_path / "run", "--video_path", str(videos), "--skip_bad_videos",
                              "--max_skip_fraction", "0.5"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="emcl.data"):
        QATask(cfg, None).check_data(["test"])
    assert f"msrvtt_qa/test: 1 missing or empty video(s) whose questions are skipped in training and count " \
           f"as wrong in evaluation: {gone}" in caplog.text
