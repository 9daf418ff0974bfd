"""MSRVTT-QA data for EMCL-QA: the parsed splits, the answer vocabulary and the tokenised questions
(each read once per process), and the torch datasets of training and evaluation.

- :class:`QATrainDataset`: one item per training question whose answer is in the vocabulary: its tokens,
  its label and its video's frames.
- :class:`QuestionDataset`: every question of a split, tokenised, with the index of its video (the
  videos themselves are encoded once with :class:`~emcl.data.datasets.VideoDataset`).

Bad input (a missing file, a bad line) raises :class:`~emcl.errors.UserError` naming the file and line.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset

from emcl.data.annotations import QA_FILES, QA_VOCAB_FILE, QASplit, load_ans2label, load_qa_split
from emcl.data.datasets import Skipped
from emcl.errors import UserError

if TYPE_CHECKING:
    from emcl.data.sources import ClipSource

__all__ = ["QATrainDataset", "QuestionDataset", "ans2label", "check_vocab", "has_qa_split", "majority_answer",
           "qa_split", "qa_tokens", "qa_vocab"]

log = logging.getLogger("emcl.data")


def _user_error(fn, *args):
    """Parser errors (bad lines, missing files) as one-line user errors naming file and line."""
    try:
        return fn(*args)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from e


@lru_cache(maxsize=8)
def qa_split(anno_path: str, split: str) -> QASplit:
    """One split's records, parsed once per process."""
    return _user_error(load_qa_split, anno_path, split)


@lru_cache(maxsize=2)
def qa_vocab(anno_path: str) -> tuple[str, ...]:
    """The answers of ``train_ans2label.json`` ordered by id."""
    answer_ids = _user_error(load_ans2label, anno_path)
    return tuple(sorted(answer_ids, key=answer_ids.__getitem__))


def ans2label(anno_path: str) -> dict[str, int]:
    """``{answer: id}`` of the vocabulary."""
    return {a: i for i, a in enumerate(qa_vocab(anno_path))}


@lru_cache(maxsize=8)
def qa_tokens(anno_path: str, split: str, max_words: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every question of a split tokenised once per process: ``(ids, mask)``."""
    from emcl.clip import tokenize

    qa = qa_split(anno_path, split)
    try:
        return tokenize([r.question for r in qa.records], max_words)
    except ValueError as e:
        raise UserError(f"{qa.file}: {e}") from e


@lru_cache(maxsize=2)
def majority_answer(anno_path: str) -> tuple[str, int]:
    """The most frequent in-vocabulary training answer (ties: alphabetical) and how often it occurs."""
    vocab = set(qa_vocab(anno_path))
    counts = Counter(r.answer for r in qa_split(anno_path, "train").records if r.answer in vocab)
    answer, n = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return answer, n


def check_vocab(anno_path: str, answers: list[str] | tuple[str, ...]) -> None:
    """A model's answers (its classes in id order) must be the vocabulary it is evaluated against."""
    vocab = qa_vocab(anno_path)
    if tuple(answers) != vocab:
        raise UserError(f"the model's {len(answers)}-answer vocabulary differs from "
                        f"{Path(anno_path) / QA_VOCAB_FILE} ({len(vocab)} answers)")


def has_qa_split(anno_path: str | None, split: str) -> bool:
    """train and test always (a missing file is an error naming it); val when ``val.jsonl`` exists."""
    if split != "val":
        return True
    return anno_path is not None and (Path(anno_path) / QA_FILES["val"]).is_file()


class QATrainDataset(Dataset):
    """Training questions whose answer is in the vocabulary: tokens, label and the video's frames.

    ``text_ids`` / ``text_mask`` are the tokens of every record of ``split``; ``vocab`` maps answers to
    labels. Questions with an out-of-vocabulary answer cannot be learned by a classifier over the
    vocabulary: they are left out and counted (``num_oov``), not an error. An unreadable video raises, or
    with ``skip_bad_videos`` gives a :class:`Skipped` marker that the collate function drops and counts.
    """

    def __init__(self, split: QASplit, source: ClipSource, text_ids: torch.Tensor, text_mask: torch.Tensor,
                 vocab: Mapping[str, int], skip_bad_videos: bool = False) -> None:
        keep = [i for i, r in enumerate(split.records) if r.answer in vocab]
        self.num_oov = len(split.records) - len(keep)
        if self.num_oov:
            log.warning(
                "%s: %d of %d training questions have an answer outside %s; they are left out of training",
                split.file,
                self.num_oov,
                len(split.records),
                Path(split.file).with_name(QA_VOCAB_FILE),
            )
        if not keep:
            raise UserError(f"{split.file}: no training question has an answer in the vocabulary")
        self.split = split
        self.index = torch.tensor(keep, dtype=torch.long)
        self.text_ids, self.text_mask = text_ids[self.index], text_mask[self.index]
        self.labels = torch.tensor([vocab[split.records[i].answer] for i in keep], dtype=torch.long)
        self.source = source
        self.skip_bad_videos = skip_bad_videos

    @property
    def num_videos(self) -> int:
        """Videos behind the questions (the base of ``--max_skip_fraction``)."""
        return len(self.split.video_ids)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict | Skipped:
        from emcl.data.video import VideoError

        record = self.split.records[int(self.index[i])]
        try:
            frames, frame_mask = self.source.load(record.video_id)
        except VideoError as e:
            if not self.skip_bad_videos:
                raise
            log.warning("skipping question on line %d of %s: %s", record.line, self.split.file, e)
            return Skipped(record.video_id, str(e))
        return {
            "text_ids": self.text_ids[i],
            "text_mask": self.text_mask[i],
            "frames": frames,
            "frame_mask": frame_mask,
            "label": self.labels[i],
        }


class QuestionDataset(Dataset):
    """Every question of a split: dict(text_ids, text_mask, video_index, index)."""

    def __init__(self, split: QASplit, text_ids: torch.Tensor, text_mask: torch.Tensor) -> None:
        self.ids, self.mask = text_ids, text_mask
        self.video = torch.tensor(split.record_video, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.video)

    def __getitem__(self, i: int) -> dict:
        return {"text_ids": self.ids[i], "text_mask": self.mask[i], "video_index": self.video[i], "index": i}
