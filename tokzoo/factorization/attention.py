"""UniTok's attention projection: compress or expand channels with a modified multi-head attention block.

Pre-LayerNorm block with a linear shortcut that changes the width:
    y = Linear(LN(x)) + Attn(LN(x));  y = y + MLP(LN(y))
Compression C -> c (C > c): h = C / c heads of width c; the head outputs are AVERAGED to width c (no output
projection), so the block can attend across tokens while it compresses.
Expansion c -> C (c < C): h = C / c heads of width c; the head outputs are concatenated to width C and projected.
Equal widths use one head of full width. Attention is bidirectional by default, causal as an option.
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from tokzoo.errors import ConfigError
from tokzoo.factorization.base import FACTORIZATIONS, check_dims


class ChannelChangingAttention(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, causal: bool = False):
        super().__init__()
        self.compress = out_dim < in_dim
        self.head_dim = min(in_dim, out_dim)
        self.heads = max(in_dim, out_dim) // self.head_dim
        self.causal = causal
        self.qkv = nn.Linear(in_dim, 3 * self.heads * self.head_dim)
        # Expansion (and equal widths) concatenates heads and projects; compression averages heads instead.
        self.proj = None if self.compress else nn.Linear(self.heads * self.head_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, N, in_dim) -> (B, N, out_dim)
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        heads = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, h, N, d)
        if self.compress:
            return heads.mean(dim=1)
        return self.proj(rearrange(heads, "b h n d -> b n (h d)"))


@FACTORIZATIONS.register("attention", example=dict(in_dim=32, out_dim=8))
class AttentionFactorization(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, mlp_ratio: float = 4.0, causal: bool = False):
        super().__init__()
        check_dims("attention", in_dim, out_dim)
        wide, narrow = max(in_dim, out_dim), min(in_dim, out_dim)
        if wide % narrow:
            raise ConfigError(
                f"factorization 'attention': {wide} is not divisible by {narrow} (in_dim={in_dim}, out_dim={out_dim}); "
                f"the attention projection uses {wide}/{narrow} heads of width {narrow}, so pick dims that divide"
            )
        self.in_dim, self.out_dim = in_dim, out_dim
        self.norm_in = nn.LayerNorm(in_dim)
        self.shortcut = nn.Linear(in_dim, out_dim)
        self.attn = ChannelChangingAttention(in_dim, out_dim, causal=causal)
        self.norm_mlp = nn.LayerNorm(out_dim)
        hidden = max(1, int(out_dim * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(out_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, N, in_dim) -> (B, N, out_dim)
        h = self.norm_in(x)
        y = self.shortcut(h) + self.attn(h)
        return y + self.mlp(self.norm_mlp(y))
