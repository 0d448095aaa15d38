"""ViT encoder and decoder built from timm layers (PatchEmbed, vision_transformer.Block).

The encoder maps images to a grid of tokens, the decoder maps that grid back to pixels. Both use a learned
positional embedding, so they are tied to one image size. `conv_stem=True` swaps the patch embedding for a
small strided convolution stack (ViTamin-like) that yields the same token grid.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from einops import rearrange
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from tokzoo.checks import divides, positive_int, positive_number
from tokzoo.errors import ConfigError


def run_blocks(
    blocks: Iterable[nn.Module], x: torch.Tensor, use_checkpoint: bool, **block_kwargs: object
) -> torch.Tensor:
    """Apply blocks in order; with `use_checkpoint`, recompute each block's activations in backward."""
    for blk in blocks:
        if use_checkpoint:
            x = checkpoint(blk, x, use_reentrant=False, **block_kwargs)
        else:
            x = blk(x, **block_kwargs)
    return x


def init_vit_weights(module: nn.Module) -> None:
    """ViT-style init: truncated normal (std 0.02) for Linear weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _stem_strides(patch_size: int) -> list[int]:
    """Split the patch size into stride-2 stages plus at most one odd stage (16 -> 2,2,2,2; 14 -> 2,7)."""
    strides, rest = [], patch_size
    while rest % 2 == 0:
        strides.append(2)
        rest //= 2
    if rest > 1:
        strides.append(rest)
    return strides


class ConvStem(nn.Module):
    """Strided conv stages (Conv -> GroupNorm -> GELU), then a 1x1 conv to the token width.

    Channels double per stage and reach `width` at the last stage. GroupNorm rather than BatchNorm so the
    stem behaves the same in train and eval and needs no cross-rank statistics under DDP.
    """

    def __init__(self, patch_size: int, width: int, in_chans: int = 3):
        super().__init__()
        strides = _stem_strides(patch_size)
        layers: list[nn.Module] = []
        c_in = in_chans
        for i, stride in enumerate(strides):
            c_out = max(width // 2 ** (len(strides) - 1 - i), 16)
            kernel, pad = (3, 1) if stride == 2 else (stride, 0)
            layers += [
                nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=pad, bias=False),
                nn.GroupNorm(math.gcd(32, c_out), c_out),
                nn.GELU(),
            ]
            c_in = c_out
        self.stages = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c_in, width, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W) -> (B, H/p * W/p, width)
        x = self.proj(self.stages(x))
        return rearrange(x, "b c h w -> b (h w) c")


class ViTTrunk(nn.Module):
    """What the encoder and the decoder share: the checked geometry, a learned positional embedding, timm blocks
    and a final LayerNorm over a (B, N, width) token grid. Subclasses add their input or output layer between
    `_check_geometry` and `_add_trunk` (so parameters keep the order patch_embed, pos_embed, blocks, norm, head)."""

    def _check_geometry(
        self,
        what: str,
        image_size: int,
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        grad_checkpointing: bool,
    ) -> None:
        positive_int(what, image_size=image_size, patch_size=patch_size, width=width, depth=depth, heads=heads)
        divides(what, "image_size", image_size, "patch_size", patch_size)
        divides(what, "width", width, "heads", heads)
        positive_number(what, mlp_ratio=mlp_ratio)
        self.image_size, self.patch_size, self.width = image_size, patch_size, width
        self.grid_size = image_size // patch_size
        self.num_tokens = self.grid_size**2
        self.grad_checkpointing = grad_checkpointing

    def _add_trunk(self, depth: int, heads: int, mlp_ratio: float) -> None:
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, self.width))
        self.blocks = nn.ModuleList(
            [Block(dim=self.width, num_heads=heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(self.width)

    def _init_weights(self) -> None:
        self.apply(init_vit_weights)
        trunc_normal_(self.pos_embed, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _run_trunk(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, N, width) -> (B, N, width): positions, blocks (recomputed in backward if asked), LayerNorm
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        return self.norm(run_blocks(self.blocks, x + self.pos_embed, use_ckpt))


class ViTEncoder(ViTTrunk):
    """Images (B, 3, H, W) -> tokens (B, N, width), N = (image_size / patch_size)^2, final LayerNorm."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        conv_stem: bool = False,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        self._check_geometry("vit encoder", image_size, patch_size, width, depth, heads, mlp_ratio, grad_checkpointing)
        if conv_stem:
            self.patch_embed: nn.Module = ConvStem(patch_size, width)
        else:
            self.patch_embed = PatchEmbed(image_size, patch_size, in_chans=3, embed_dim=width)
        self._add_trunk(depth, heads, mlp_ratio)
        self._init_weights()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # images: (B, 3, H, W) -> tokens: (B, N, width)
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
            raise ConfigError(
                f"vit encoder expects images of shape (B, 3, {self.image_size}, {self.image_size}), got "
                f"{tuple(images.shape)}; set the encoder's image_size to the data's image size"
            )
        return self._run_trunk(self.patch_embed(images))


class ViTDecoder(ViTTrunk):
    """Tokens (B, N, width) -> images (B, 3, H, W); output unbounded (trained against targets in [-1, 1])."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        self._check_geometry("vit decoder", image_size, patch_size, width, depth, heads, mlp_ratio, grad_checkpointing)
        self._add_trunk(depth, heads, mlp_ratio)
        self.head = nn.Linear(width, patch_size * patch_size * 3)
        self._init_weights()

    @property
    def last_layer_weight(self) -> nn.Parameter:
        """Weight of the final pixel projection; the GAN adaptive weight compares gradients w.r.t. it."""
        return self.head.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: (B, N, width) -> images: (B, 3, H, W)
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != (self.num_tokens, self.width):
            raise ConfigError(
                f"vit decoder expects tokens of shape (B, {self.num_tokens}, {self.width}), got "
                f"{tuple(tokens.shape)}; match the decoder's image_size/patch_size/width to the encoder's"
            )
        x = self.head(self._run_trunk(tokens))
        g, p = self.grid_size, self.patch_size
        return rearrange(x, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=g, w=g, p1=p, p2=p, c=3)
