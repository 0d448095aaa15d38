"""Lookup-free quantization (MAGVIT-v2): each of the `dim` channels maps to {-scale, +scale} by its sign.

The bits are split into `num_codebooks` contiguous groups of g = dim / num_codebooks bits; each group is one
sub-codebook of 2^g implicit codes. Bit order: within a group, the FIRST channel is the MOST significant bit,
index = sum_j [z_j > 0] * 2^(g - 1 - j).

Loss = entropy_weight * (mean per-token entropy - entropy of the batch-mean distribution)
       + commitment_weight * ||z - sg(z_q)||^2,
with soft assignments p = softmax(-||z - c||^2 * inv_temperature) over the 2^g codes of each group, averaged over
groups. Grouping keeps the softmax at O(N * num_codebooks * 2^g) instead of O(N * 2^dim).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from tokzoo.checks import positive_int
from tokzoo.errors import ConfigError
from tokzoo.quantizers.base import QUANTIZERS, Quantizer, QuantizerOutput, UsageTracker, entropy

MAX_GROUP_BITS = 16


@QUANTIZERS.register("lfq", example=dict(dim=8, num_codebooks=2))
class LookupFreeQuantizer(Quantizer):
    name = "lfq"

    def __init__(
        self,
        dim: int = 16,
        num_codebooks: int = 2,
        scale: float = 1.0,
        entropy_weight: float = 0.1,
        inv_temperature: float = 100.0,
        commitment_weight: float = 0.25,
        stats_window: int = 100,
    ):
        super().__init__()
        positive_int("lfq", dim=dim, num_codebooks=num_codebooks)
        if dim % num_codebooks:
            raise ConfigError(
                f"lfq: dim={dim} (number of bits) is not divisible by num_codebooks={num_codebooks}; "
                f"choose num_codebooks dividing dim"
            )
        group_bits = dim // num_codebooks
        if group_bits > MAX_GROUP_BITS:
            raise ConfigError(
                f"lfq: {group_bits} bits per group means a softmax over 2^{group_bits} codes per token; "
                f"raise num_codebooks so that dim / num_codebooks <= {MAX_GROUP_BITS}"
            )
        self.dim, self.num_codebooks, self.group_bits = dim, num_codebooks, group_bits
        self.codebook_sizes = [2**group_bits] * num_codebooks
        self.scale, self.entropy_weight = scale, entropy_weight
        self.inv_temperature, self.commitment_weight = inv_temperature, commitment_weight
        powers = 2 ** torch.arange(group_bits - 1, -1, -1)  # MSB first
        self.register_buffer("powers", powers, persistent=False)
        # All 2^g codes of a group as +-1 rows, in index order.
        bits = (torch.arange(2**group_bits).unsqueeze(-1) // powers) % 2
        self.register_buffer("code_signs", bits.float() * 2 - 1, persistent=False)
        self.tracker = UsageTracker(num_codebooks, 2**group_bits, stats_window)

    def quantize(self, z: Tensor) -> QuantizerOutput:
        # z: (B, N, dim) fp32 -> x: (B*N, G, g)
        b = z.shape[0]
        x = rearrange(z, "b t (g j) -> (b t) g j", g=self.num_codebooks)
        positive = x > 0
        q = torch.where(positive, self.scale, -self.scale)
        indices = (positive.long() * self.powers).sum(-1)  # (M, G)

        loss = self.commitment_weight * (x - q).pow(2).mean()
        if self.entropy_weight > 0 and self.training:
            loss = loss + self.entropy_weight * self.entropy_loss(x)
        if self.training:
            self.tracker.record(indices)

        x_q = x + (q - x).detach()
        return QuantizerOutput(
            z_q=rearrange(x_q, "(b t) g j -> b t (g j)", b=b),
            indices=rearrange(indices, "(b t) g -> b t g", b=b),
            loss=loss,
            stats=self.tracker.stats(),
        )

    def entropy_loss(self, x: Tensor) -> Tensor:
        """Mean per-token entropy minus entropy of the mean assignment, averaged over groups. x: (M, G, g)."""
        # -||x - c||^2 = 2 x.c - ||x||^2 - ||c||^2; the last two terms are the same for every code of a token.
        logits = 2 * self.scale * torch.einsum("mgj,kj->mgk", x, self.code_signs) * self.inv_temperature
        probs = logits.softmax(-1)  # (M, G, 2^g)
        per_token = entropy(probs).mean(0)  # (G,)
        batch = entropy(probs.mean(0))  # (G,)
        return (per_token - batch).mean()

    def decode(self, indices: Tensor) -> Tensor:
        # indices: (B, N, G) -> (B, N, dim)
        bits = (indices.unsqueeze(-1) // self.powers) % 2
        return rearrange((bits.float() * 2 - 1) * self.scale, "b t g j -> b t (g j)")
