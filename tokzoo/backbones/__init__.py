"""Image encoders and decoders, by registry name.

    enc = build_encoder("vit_tiny")                      # preset defaults
    enc = build_encoder("vit_tiny", depth=1)             # keyword args override a preset
    enc = build_encoder("vit", image_size=32, patch_size=4, width=128, depth=2, heads=4)
    dec = build_decoder("vit_large_unitok")

Names: `vit` (geometry given explicitly), `vit_tiny` (CPU-sized default), `vit_large_unitok` (UniTok-like:
ViTamin-L-style conv stem + 24 blocks of width 1024 at 256 px / patch 16; the decoder mirrors it, no stem).
Encoders only: `timm` (any timm model by name, e.g. `vit_base_patch16_clip_224.openai`, `pretrained: path | true`) and
`open_clip` (the image tower of an open_clip model, `pretrained: path | tag`); see backbones/pretrained.py.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import nn

from tokzoo.backbones.pretrained import OpenClipEncoder, TimmEncoder, write_tiny_open_clip_config
from tokzoo.backbones.vit import ConvStem, ViTDecoder, ViTEncoder
from tokzoo.registry import Registry

ENCODERS = Registry("encoder")
DECODERS = Registry("decoder")

__all__ = [
    "DECODERS",
    "ENCODERS",
    "ConvStem",
    "OpenClipEncoder",
    "TimmEncoder",
    "ViTDecoder",
    "ViTEncoder",
    "build_decoder",
    "build_encoder",
    "list_decoders",
    "list_encoders",
]


def build_encoder(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered encoder; unknown names, unknown or missing arguments raise ConfigError."""
    return ENCODERS.build(name, **kwargs)


def build_decoder(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered decoder; unknown names, unknown or missing arguments raise ConfigError."""
    return DECODERS.build(name, **kwargs)


def list_encoders() -> list[str]:
    return ENCODERS.names()


def list_decoders() -> list[str]:
    return DECODERS.names()


# A preset is the plain `vit` class with different defaults (functools.partial keeps the signature, so the
# registry's argument check and per-key overrides work the same for presets and for `vit`).
TINY = {"image_size": 32, "patch_size": 4, "width": 128, "depth": 2, "heads": 4}
LARGE_UNITOK = {"image_size": 256, "patch_size": 16, "width": 1024, "depth": 24, "heads": 16}
# Examples (tests/test_contracts.py): one block, narrow, small images; the presets keep their own patch size.
SMALL = {"image_size": 16, "patch_size": 4, "width": 32, "depth": 1, "heads": 2}
SMALL_UNITOK = {"image_size": 32, "width": 32, "depth": 1, "heads": 2}

ENCODERS.register("vit", example=SMALL)(ViTEncoder)
ENCODERS.register("vit_tiny", example=dict(width=32, depth=1))(partial(ViTEncoder, **TINY))
ENCODERS.register("vit_large_unitok", example=SMALL_UNITOK)(partial(ViTEncoder, **LARGE_UNITOK, conv_stem=True))
DECODERS.register("vit", example=SMALL)(ViTDecoder)
DECODERS.register("vit_tiny", example=dict(width=32, depth=1))(partial(ViTDecoder, **TINY))
DECODERS.register("vit_large_unitok", example=SMALL_UNITOK)(partial(ViTDecoder, **LARGE_UNITOK))

# Pretrained towers; examples are one narrow block (timm: a CLIP ViT's layout; open_clip: a model config it writes).
TIMM_SMALL = dict(
    image_size=16,
    model="vit_base_patch16_clip_224",
    model_kwargs=dict(embed_dim=32, depth=1, num_heads=2, patch_size=4),
)
ENCODERS.register("timm", example=TIMM_SMALL)(TimmEncoder)
ENCODERS.register(
    "open_clip", example=lambda folder: dict(image_size=16, model=str(write_tiny_open_clip_config(folder)))
)(OpenClipEncoder)
