"""Caption tokenisation for CLIP text towers.

Wraps open_clip's byte-level BPE tokenizer and lays captions out the way EMCL-Net (and CLIP4Clip) feed
them: ``SOT + up to max_words - 2 BPE tokens + EOT``, zero-padded to ``max_words``, with a mask that is 1
on the real tokens. The EOT token has the largest id in the vocabulary, so the text tower can find it
with ``argmax``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
from open_clip.tokenizer import SimpleTokenizer

SOT_TOKEN = 49406
EOT_TOKEN = 49407


@lru_cache(maxsize=1)
def get_tokenizer() -> SimpleTokenizer:
    """The shared open_clip BPE tokenizer (built once per process; reading the merges takes ~1 s)."""
    tokenizer = SimpleTokenizer()
    if (tokenizer.sot_token_id, tokenizer.eot_token_id) != (SOT_TOKEN, EOT_TOKEN):
        raise RuntimeError(
            f"open_clip tokenizer has SOT/EOT ids {tokenizer.sot_token_id}/{tokenizer.eot_token_id}, "
            f"expected {SOT_TOKEN}/{EOT_TOKEN}"
        )
    return tokenizer


def tokenize(texts: Sequence[str] | str, max_words: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise captions into ``(ids, mask)``, both ``LongTensor[B, max_words]``.

    Each row is ``SOT, t_1 .. t_n, EOT, 0 ..`` with ``n <= max_words - 2`` (longer captions are cut, as
    the reference does); ``mask`` is 1 from SOT to EOT inclusive. A single string gives ``B = 1``.
    An empty or whitespace-only caption raises ``ValueError`` naming its position in ``texts``.
    """
    if max_words < 3:
        raise ValueError(f"max_words must be at least 3 (SOT, one token, EOT), got {max_words}")
    if isinstance(texts, str):
        texts = [texts]
    tokenizer = get_tokenizer()
    ids = torch.zeros(len(texts), max_words, dtype=torch.long)
    mask = torch.zeros(len(texts), max_words, dtype=torch.long)
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"caption {row} is a {type(text).__name__}, not a string: {text!r}")
        tokens = tokenizer.encode(text)[: max_words - 2]
        if not tokens:
            raise ValueError(f"caption {row} is empty (no BPE tokens): {text!r}")
        tokens = [SOT_TOKEN, *tokens, EOT_TOKEN]
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, : len(tokens)] = 1
    return ids, mask
