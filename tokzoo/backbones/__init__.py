"""Image encoders and decoders, by registry name.

    enc = build_encoder("vit_tiny")                      # preset defaults
    enc = build_encoder("vit_tiny", depth=1)             # keyword args override a preset
    enc = build_encoder("vit", image_size=32, patch_size=4, width=128, depth=2, heads=4)
    dec = build_decoder("vit_large_unitok")

Names: `vit` (geometry given explicitly), `vit_tiny` (CPU-sized default), `vit_large_unitok` (UniTok-like:
ViTamin-L-style conv stem + 24 blocks of width 1024 at 256 px / patch 16; the decoder mirrors it, no stem).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import nn

from tokzoo.backbones.vit import ConvStem, ViTDecoder, ViTEncoder, build_checked
from tokzoo.registry import Registry

ENCODERS = Registry("encoder")
DECODERS = Registry("decoder")

__all__ = [
    "DECODERS",
    "ENCODERS",
    "ConvStem",
    "ViTDecoder",
    "ViTEncoder",
    "build_decoder",
    "build_encoder",
    "list_decoders",
    "list_encoders",
]


def build_encoder(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered encoder; unknown names, unknown or missing arguments raise ConfigError."""
    return build_checked(ENCODERS, name, kwargs)


def build_decoder(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered decoder; unknown names, unknown or missing arguments raise ConfigError."""
    return build_checked(DECODERS, name, kwargs)


def list_encoders() -> list[str]:
    return ENCODERS.names()


def list_decoders() -> list[str]:
    return DECODERS.names()


# A preset is the plain `vit` factory with different defaults (functools.partial keeps the signature, so the
# registry's argument check and per-key overrides work the same for presets and for `vit`).
TINY = {"image_size": 32, "patch_size": 4, "width": 128, "depth": 2, "heads": 4}
LARGE_UNITOK = {"image_size": 256, "patch_size": 16, "width": 1024, "depth": 24, "heads": 16}


@ENCODERS.register("vit")
def vit_encoder(
    image_size: int,
    patch_size: int,
    width: int,
    depth: int,
    heads: int,
    mlp_ratio: float = 4.0,
    conv_stem: bool = False,
    grad_checkpointing: bool = False,
) -> ViTEncoder:
    return ViTEncoder(image_size, patch_size, width, depth, heads, mlp_ratio, conv_stem, grad_checkpointing)


@DECODERS.register("vit")
def vit_decoder(
    image_size: int,
    patch_size: int,
    width: int,
    depth: int,
    heads: int,
    mlp_ratio: float = 4.0,
    grad_checkpointing: bool = False,
) -> ViTDecoder:
    return ViTDecoder(image_size, patch_size, width, depth, heads, mlp_ratio, grad_checkpointing)


ENCODERS.register("vit_tiny")(partial(vit_encoder, **TINY))
ENCODERS.register("vit_large_unitok")(partial(vit_encoder, **LARGE_UNITOK, conv_stem=True))
DECODERS.register("vit_tiny")(partial(vit_decoder, **TINY))
DECODERS.register("vit_large_unitok")(partial(vit_decoder, **LARGE_UNITOK))
