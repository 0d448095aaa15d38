"""Text side of the contrastive head: tokenizers and text towers, by registry name.

    tok = build_tokenizer("clip_bpe", context_length=32)
    ids = tok(["a photo of a cat"])                                   # (B, 32) int64
    tower = build_text_tower("transformer", vocab_size=tok.vocab_size, context_length=32,
                             width=128, depth=2, heads=4, embed_dim=128)
    emb = tower(ids)                                                  # (B, 128), not normalised

Names: tokenizer `clip_bpe`; towers `transformer` (all sizes explicit) and `transformer_unitok`
(UniTok's text tower: 12 layers, width 768, 12 heads, context 77, embed_dim 768; any argument overrides).
"""

from __future__ import annotations

from typing import Any

from tokzoo.backbones.vit import build_checked
from tokzoo.registry import Registry
from tokzoo.text.tokenizer import ClipBPETokenizer
from tokzoo.text.tower import TextTransformer

TOKENIZERS = Registry("tokenizer")
TEXT_TOWERS = Registry("text tower")

__all__ = [
    "TEXT_TOWERS",
    "TOKENIZERS",
    "ClipBPETokenizer",
    "TextTransformer",
    "build_text_tower",
    "build_tokenizer",
    "list_text_towers",
    "list_tokenizers",
]


def build_tokenizer(name: str, **kwargs: Any) -> ClipBPETokenizer:
    """Build a registered tokenizer; unknown names or arguments raise ConfigError."""
    return build_checked(TOKENIZERS, name, kwargs)


def build_text_tower(name: str, **kwargs: Any) -> TextTransformer:
    """Build a registered text tower; unknown names, unknown or missing arguments raise ConfigError."""
    return build_checked(TEXT_TOWERS, name, kwargs)


def list_tokenizers() -> list[str]:
    return TOKENIZERS.names()


def list_text_towers() -> list[str]:
    return TEXT_TOWERS.names()


@TOKENIZERS.register("clip_bpe")
def clip_bpe(context_length: int = 77) -> ClipBPETokenizer:
    return ClipBPETokenizer(context_length)


@TEXT_TOWERS.register("transformer")
def transformer(
    vocab_size: int,
    context_length: int,
    width: int,
    depth: int,
    heads: int,
    embed_dim: int,
    mlp_ratio: float = 4.0,
    grad_checkpointing: bool = False,
) -> TextTransformer:
    return TextTransformer(
        vocab_size, context_length, width, depth, heads, embed_dim, mlp_ratio, grad_checkpointing
    )


@TEXT_TOWERS.register("transformer_unitok")
def transformer_unitok(
    vocab_size: int = 49408,
    context_length: int = 77,
    width: int = 768,
    depth: int = 12,
    heads: int = 12,
    embed_dim: int = 768,
    mlp_ratio: float = 4.0,
    grad_checkpointing: bool = False,
) -> TextTransformer:
    return TextTransformer(
        vocab_size, context_length, width, depth, heads, embed_dim, mlp_ratio, grad_checkpointing
    )
