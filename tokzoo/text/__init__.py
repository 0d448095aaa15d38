"""Text side of the contrastive head: tokenizers and text towers, by registry name.

    tok = build_tokenizer("clip_bpe", context_length=32)
    ids = tok(["a photo of a cat"])                                   # (B, 32) int64
    tower = build_text_tower("transformer", vocab_size=tok.vocab_size, context_length=32,
                             width=128, depth=2, heads=4, embed_dim=128)
    emb = tower(ids)                                                  # (B, 128), not normalised

Names: tokenizer `clip_bpe`; towers `transformer` (all sizes explicit) and `transformer_unitok`
(UniTok's text tower: 12 layers, width 768, 12 heads, context 77, embed_dim 768; any argument overrides), and
`open_clip` (the text tower of an open_clip model with that model's tokenizer; `pretrained: path | tag`).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from tokzoo.backbones.pretrained import write_tiny_open_clip_config
from tokzoo.registry import Registry
from tokzoo.text.open_clip_text import OpenClipText, OpenClipTokenizer
from tokzoo.text.tokenizer import ClipBPETokenizer
from tokzoo.text.tower import TextTransformer

TOKENIZERS = Registry("tokenizer")
TEXT_TOWERS = Registry("text tower")

__all__ = [
    "TEXT_TOWERS",
    "TOKENIZERS",
    "ClipBPETokenizer",
    "OpenClipText",
    "OpenClipTokenizer",
    "TextTransformer",
    "build_text_tower",
    "build_tokenizer",
    "list_text_towers",
    "list_tokenizers",
]


def build_tokenizer(name: str, **kwargs: Any) -> ClipBPETokenizer:
    """Build a registered tokenizer; unknown names or arguments raise ConfigError."""
    return TOKENIZERS.build(name, **kwargs)


def build_text_tower(name: str, **kwargs: Any) -> TextTransformer:
    """Build a registered text tower; unknown names, unknown or missing arguments raise ConfigError."""
    return TEXT_TOWERS.build(name, **kwargs)


def list_tokenizers() -> list[str]:
    return TOKENIZERS.names()


def list_text_towers() -> list[str]:
    return TEXT_TOWERS.names()


UNITOK_TEXT = {"vocab_size": 49408, "context_length": 77, "width": 768, "depth": 12, "heads": 12, "embed_dim": 768}
# Examples (tests/test_contracts.py): one narrow block over a short context and a small vocabulary.
SMALL_TEXT = {"vocab_size": 64, "context_length": 8, "width": 16, "depth": 1, "heads": 2, "embed_dim": 12}

TOKENIZERS.register("clip_bpe", example=dict(context_length=8))(ClipBPETokenizer)
TEXT_TOWERS.register("transformer", example=SMALL_TEXT)(TextTransformer)
# A preset: the same class with UniTok's sizes as defaults (any argument overrides).
TEXT_TOWERS.register("transformer_unitok", example=SMALL_TEXT)(partial(TextTransformer, **UNITOK_TEXT))
TEXT_TOWERS.register("open_clip", example=lambda folder: dict(model=str(write_tiny_open_clip_config(folder))))(
    OpenClipText
)
