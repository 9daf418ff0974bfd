"""Torch datasets for retrieval training and evaluation.

- :class:`TrainDataset`: one item per caption, with its video's frames (contrastive training).
- :class:`TextDataset` / :class:`VideoDataset`: captions and videos separately, for caching features
  once at evaluation time.

A video that cannot be read raises :class:`~emcl.data.video.VideoError` (naming file and record). With
``skip_bad_videos=True`` it is logged and flagged instead, never silently replaced by zeros:
the training item becomes a :class:`Skipped` marker that :func:`collate_skip` drops and counts, and the
evaluation item gets ``valid=False``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset, default_collate

from emcl.data.annotations import DATATYPES, RetrievalSplit, has_split, load_split

if TYPE_CHECKING:
    from emcl.data.sources import ClipSource

__all__ = ["DATATYPES", "RetrievalSplit", "Skipped", "TextDataset", "TrainDataset", "VideoDataset",
           "collate_skip", "has_split", "load_split"]

log = logging.getLogger("emcl.data")


@dataclass(frozen=True)
class Skipped:
    """Marker returned instead of an item whose video could not be read (falsy, like ``None``)."""

    video_id: str
    reason: str = ""

    def __bool__(self) -> bool:
        return False


def tokenize_split(split: RetrievalSplit, max_words: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every caption of ``split`` tokenised once, up front (errors surface before training starts)."""
    from emcl.clip import tokenize

    try:
        return tokenize(split.captions, max_words)
    except ValueError as e:
        from emcl.errors import UserValueError

        raise UserValueError(f"{split.datatype}/{split.split}: {e}") from e


def _load_video(split: RetrievalSplit, source: ClipSource, video_index: int):
    vid = split.video_ids[video_index]
    start, end = (split.windows or {}).get(vid, (None, None))
    return source.load(vid, start, end)


class TrainDataset(Dataset):
    """One item per caption: its tokens and its video's uint8 frames.

    Items: ``text_ids``, ``text_mask``, ``frames``, ``frame_mask``, ``video_index`` (the video's index in
    the split: items with the same ``video_index`` show the same video, which the multi-positive loss
    uses; collated to a LongTensor aligned with the batch, skipped items removed) and ``caption_index``.

    ``augment`` (e.g. :class:`~emcl.data.augment.ClipRandAugment`) is applied to the real frames only,
    never to the zero padding.
    """

    def __init__(self, split: RetrievalSplit, source: ClipSource, max_words: int,
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 skip_bad_videos: bool = False, seed: int = 0) -> None:
        self.split = split
        self.source = source
        self.max_words = max_words
        self.augment = augment
        self.skip_bad_videos = skip_bad_videos
        self.seed = int(seed)
        self.text_ids, self.text_mask = tokenize_split(split, max_words)

    @property
    def num_videos(self) -> int:
        """Videos behind the captions (the base of ``--max_skip_fraction``)."""
        return len(self.split.video_ids)

    def __len__(self) -> int:
        return len(self.split.captions)

    def __getitem__(self, key: int | tuple[int, int]) -> dict | Skipped:
        """``key`` is an index, or ``(epoch, index)`` from an :class:`~emcl.data.loader.EpochKeyedSampler`:
        then the augmentation is seeded from (seed, epoch, index) and repeats exactly, e.g. on resume."""
        from emcl.data.video import VideoError

        epoch, index = key if isinstance(key, tuple) else (None, key)
        v = self.split.caption_video[index]
        try:
            frames, frame_mask = _load_video(self.split, self.source, v)
        except VideoError as e:
            if not self.skip_bad_videos:
                raise
            log.warning("skipping caption %d of %s/%s: %s", index, self.split.datatype, self.split.split, e)
            return Skipped(self.split.video_ids[v], str(e))
        if self.augment is not None:
            n = int(frame_mask.sum())
            if n > 0:
                frames = frames.clone()
                if epoch is None:
                    frames[:n] = self.augment(frames[:n])
                else:
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(hash((self.seed, epoch, index)) % 2**63)
                        frames[:n] = self.augment(frames[:n])
        return {"text_ids": self.text_ids[index], "text_mask": self.text_mask[index], "frames": frames,
                "frame_mask": frame_mask,
                "video_index": v, "caption_index": index}


class TextDataset(Dataset):
    """Every caption of a split, tokenised: dict(text_ids, text_mask, caption_index)."""

    def __init__(self, split: RetrievalSplit, max_words: int) -> None:
        self.split = split
        self.max_words = max_words
        self.text_ids, self.text_mask = tokenize_split(split, max_words)

    def __len__(self) -> int:
        return len(self.split.captions)

    def __getitem__(self, index: int) -> dict:
        return {"text_ids": self.text_ids[index], "text_mask": self.text_mask[index], "caption_index": index}


class VideoDataset(Dataset):
    """Every video of a split: dict(frames, frame_mask, video_index, valid).

    With ``skip_bad_videos`` an unreadable video gives zero frames, a zero mask and ``valid=False``; the
    evaluator must drop it (and its captions) and report how many were dropped.
    """

    def __init__(self, split: RetrievalSplit, source: ClipSource, skip_bad_videos: bool = False) -> None:
        self.split = split
        self.source = source
        self.skip_bad_videos = skip_bad_videos

    def __len__(self) -> int:
        return len(self.split.video_ids)

    def _empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        t, s = int(self.source.max_frames), int(self.source.size)
        return torch.zeros(t, 3, s, s, dtype=torch.uint8), torch.zeros(t, dtype=torch.long)

    def __getitem__(self, index: int) -> dict:
        from emcl.data.video import VideoError

        try:
            frames, frame_mask = _load_video(self.split, self.source, index)
            valid = True
        except VideoError as e:
            if not self.skip_bad_videos:
                raise
            log.warning("video %d of %s/%s marked invalid: %s", index, self.split.datatype,
                        self.split.split, e)
            frames, frame_mask = self._empty()
            valid = False
        return {"frames": frames, "frame_mask": frame_mask, "video_index": index, "valid": valid}


def collate_skip(batch: Sequence[dict | Skipped | None]) -> dict:
    """Collate a batch, dropping skipped items.

    Adds ``num_skipped`` (int) and ``skipped_ids`` (video ids of the dropped items; a plain ``None`` item
    counts but has no id) and ``batch_size`` (items kept). If every item was skipped the result holds
    only those keys and ``empty: True``, which the run loop skips.
    """
    kept = [b for b in batch if b is not None and not isinstance(b, Skipped)]
    skipped_ids = [b.video_id for b in batch if isinstance(b, Skipped)]
    out = dict(default_collate(kept)) if kept else {"empty": True}
    out["num_skipped"] = len(batch) - len(kept)
    out["skipped_ids"] = skipped_ids
    out["batch_size"] = len(kept)
    return out
