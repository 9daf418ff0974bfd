"""Datasets over MMT expert features: caption tokenisation, the per-expert token selection of the
reference, and batching (docs/reference.md, 'Joint training (MMT)').

Per expert and video: the max-pool over all its features (the AGG token), up to ``max_tokens``
temporal features (a random sorted subset in training, a fixed one - ``RandomState(0)`` - in evaluation,
as the reference), their positions (centre time + 2 s; 1 for padding and unknown times) and a token mask.
A missing expert becomes zeros with mask 0 and position 1.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch.utils.data import Dataset

from emcl.data.annotations import RetrievalSplit
from emcl.data.experts import ExpertStore, VideoExperts


def load_tokenizer(path: str, faithful: bool):
    """BERT's WordPiece tokenizer from a local folder (``vocab.txt``); nothing is downloaded.

    ``faithful``: lower-case as the reference does (bert-base-cased loaded with ``do_lower_case=True``);
    otherwise the folder's own setting.
    """
    from transformers import BertTokenizer

    kwargs = {"do_lower_case": True} if faithful else {}
    return BertTokenizer.from_pretrained(path, local_files_only=True, **kwargs)


def tokenize_caption(tokenizer, caption: str, max_words: int, faithful: bool) -> list[int]:
    """Token ids ``[CLS] ... [SEP]`` of at most ``max_words`` tokens.

    ``faithful`` reproduces the reference: the caption is cut to ``max_words`` words, a trailing period
    is added, ``str.capitalize`` is applied (which lower-cases everything after the first letter), and
    after cutting to ``max_words`` tokens the last one is forced to [SEP]. Otherwise the tokenizer's own
    truncation (which also ends in [SEP]) on the caption as written.
    """
    words = caption.split()
    if not words:
        raise ValueError("empty caption")
    if not faithful:
        return tokenizer(" ".join(words), truncation=True, max_length=max_words)["input_ids"]
    text = " ".join(words[:max_words]).strip()
    if text[-1] not in ".?!":
        text += "."
    text = text.capitalize()
    tokens = [tokenizer.cls_token, *tokenizer.tokenize(text), tokenizer.sep_token][:max_words]
    tokens[-1] = tokenizer.sep_token
    return tokenizer.convert_tokens_to_ids(tokens)


def pad_ids(ids: list[list[int]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded (B, length) ids and mask."""
    out = torch.zeros(len(ids), length, dtype=torch.long)
    mask = torch.zeros(len(ids), length, dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, : len(x)] = torch.tensor(x[:length])
        mask[i, : len(x)] = 1
    return out, mask


def expert_tokens(
    rec: VideoExperts, experts: Mapping[str, int], max_tokens: int, rng: np.random.Generator | None
) -> dict[str, dict[str, np.ndarray]]:
    """Per expert: ``features`` (max_tokens, D), ``positions`` (max_tokens,), ``mask`` (max_tokens,) and
    ``maxpool`` (D,). ``rng`` None: evaluation (the reference's fixed ``RandomState(0)`` choice)."""
    out = {}
    for e, dim in experts.items():
        feats = np.zeros((max_tokens, dim), np.float32)
        pos = np.ones(max_tokens, np.float32)
        mask = np.zeros(max_tokens, np.float32)
        pool = np.zeros(dim, np.float32)
        x = rec.features.get(e)
        if x is not None:
            n = x.shape[0]
            keep = min(n, max_tokens)
            if rng is None:
                pick = np.random.RandomState(0).choice(n, size=keep, replace=False)
            else:
                pick = rng.choice(n, size=keep, replace=False)
            pick = np.sort(pick)
            feats[:keep] = x[pick]
            pos[:keep] = rec.times[e][pick] + 2.0  # the reference starts temporal positions at 2 s
            mask[:keep] = 1
            pool = x.max(axis=0)
        out[e] = {"features": feats, "positions": pos, "mask": mask, "maxpool": pool}
    return out


def collate_experts(items: list[dict]) -> dict:
    """Stack samples: tensors stack, per-expert dicts stack per key, ``ids`` lists of token ids pad."""
    batch: dict = {"batch_size": len(items)}
    first = items[0]
    for k, v in first.items():
        if k == "experts":
            batch[k] = {
                e: {kk: torch.from_numpy(np.stack([it[k][e][kk] for it in items])) for kk in v[e]} for e in v
            }
        elif k == "ids":
            batch["text_ids"], batch["text_mask"] = pad_ids([it["ids"] for it in items], first["max_words"])
        elif k == "max_words":
            continue
        else:
            batch[k] = torch.tensor([it[k] for it in items])
    return batch


class ExpertTrainDataset(Dataset):
    """Training samples: one per (video, draw). Keys are ``(epoch, index)`` (see ``EpochKeyedSampler``),
    so the caption and feature draws depend only on (seed, epoch, index).

    ``length``: samples per epoch (the reference's 1000 iterations x 32); index ``i`` reads video
    ``i mod V``. Each sample takes one random caption of its video (MSR-VTT); LSMDC and ActivityNet
    splits already hold one concatenated caption per video.
    """

    def __init__(
        self,
        split: RetrievalSplit,
        store: ExpertStore,
        tokenizer,
        max_words: int,
        max_tokens: int,
        faithful: bool,
        seed: int,
        length: int | None = None,
    ) -> None:
        self.split, self.store, self.tokenizer = split, store, tokenizer
        self.max_words, self.max_tokens, self.faithful, self.seed = max_words, max_tokens, faithful, seed
        self.groups = split.video_captions()
        self.length = length or len(split.video_ids)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        rng = np.random.default_rng([self.seed, epoch, index])
        v = index % len(self.split.video_ids)
        caps = self.groups[v]
        c = caps[int(rng.integers(len(caps)))]
        rec = self.store.get(self.split.video_ids[v])
        ids = tokenize_caption(self.tokenizer, self.split.captions[c], self.max_words, self.faithful)
        return {
            "ids": ids,
            "max_words": self.max_words,
            "video_index": v,
            "caption_index": c,
            "experts": expert_tokens(rec, self.store.experts, self.max_tokens, rng),
        }


class ExpertVideoDataset(Dataset):
    """Evaluation videos of a split, in list order, with the reference's fixed token choice."""

    def __init__(self, split: RetrievalSplit, store: ExpertStore, max_tokens: int) -> None:
        self.split, self.store, self.max_tokens = split, store, max_tokens

    def __len__(self) -> int:
        return len(self.split.video_ids)

    def __getitem__(self, index: int) -> dict:
        rec = self.store.get(self.split.video_ids[index])
        return {
            "video_index": index,
            "experts": expert_tokens(rec, self.store.experts, self.max_tokens, None),
        }


class CaptionDataset(Dataset):
    """Evaluation captions of a split, tokenised."""

    def __init__(self, split: RetrievalSplit, tokenizer, max_words: int, faithful: bool) -> None:
        self.split, self.tokenizer, self.max_words, self.faithful = split, tokenizer, max_words, faithful

    def __len__(self) -> int:
        return len(self.split.captions)

    def __getitem__(self, index: int) -> dict:
        ids = tokenize_caption(self.tokenizer, self.split.captions[index], self.max_words, self.faithful)
        return {"ids": ids, "max_words": self.max_words, "caption_index": index}
