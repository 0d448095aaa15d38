"""CLIP's byte-level BPE tokenizer (open_clip ships the vocabulary file, so this works offline)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
from open_clip.tokenizer import SimpleTokenizer

from tokzoo.checks import int_at_least
from tokzoo.errors import DataError


@lru_cache(maxsize=1)
def _shared_bpe() -> SimpleTokenizer:
    # Reading and parsing the merges file takes a moment; every tokenizer instance can share one.
    return SimpleTokenizer()


# Cleaning (ftfy, html, whitespace) and BPE in Python cost ~80 us per caption, paid every step for every caption
# of the batch; a caption's ids never change, so they are memoised. Bounded: a web-scale caption stream evicts.
CAPTION_CACHE_SIZE = 1 << 17


@lru_cache(maxsize=CAPTION_CACHE_SIZE)
def _bpe_ids(text: str) -> tuple[int, ...]:
    return tuple(_shared_bpe().encode(text))


class ClipBPETokenizer:
    """list[str] -> LongTensor (B, context_length): [SOT] bpe tokens [EOT] then zero padding.

    Captions longer than the context are truncated and the last position is set back to EOT, so every row
    holds exactly one EOT. EOT has the highest id of the vocabulary, which the text tower relies on to find
    the pooling position with an argmax.
    """

    pad_id = 0

    def __init__(self, context_length: int = 77):
        int_at_least(2, "clip_bpe tokenizer (room for SOT and EOT)", context_length=context_length)
        self.context_length = context_length
        self._bpe = _shared_bpe()
        self.vocab_size: int = self._bpe.vocab_size
        self.sot_id: int = self._bpe.sot_token_id
        self.eot_id: int = self._bpe.eot_token_id

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        # texts: B strings -> (B, context_length) int64
        if isinstance(texts, str):
            texts = [texts]
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            kind = type(texts[bad[0]]).__name__
            raise DataError(
                f"clip_bpe tokenizer: captions must be strings; item {bad[0]} is a {kind}; check the captions"
            )
        n = self.context_length
        rows = []
        for text in texts:
            ids = (self.sot_id, *_bpe_ids(text), self.eot_id)
            if len(ids) > n:  # truncate, keeping EOT last so the tower still pools at EOT
                ids = (*ids[: n - 1], self.eot_id)
            rows.append(ids + (self.pad_id,) * (n - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), n)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Text of one row of ids: what lies between SOT and the first EOT (for logs and debugging)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if ids and ids[0] == self.sot_id:
            ids = ids[1:]
        if self.eot_id in ids:
            ids = ids[: ids.index(self.eot_id)]
        return self._bpe.decode(ids).strip()

    def __repr__(self) -> str:
        return f"ClipBPETokenizer(context_length={self.context_length}, vocab_size={self.vocab_size})"
