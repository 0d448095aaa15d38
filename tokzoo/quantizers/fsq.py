"""Finite scalar quantization (Mentzer et al.): bound each channel to L levels and round.

Per channel with L levels: half = (L - 1)(1 + eps) / 2, offset = 0.5 if L is even else 0,
shift = atanh(offset / half), z_hat = round_ste(tanh(z + shift) * half - offset) / (L // 2).
So L = 5 gives {-1, -0.5, 0, 0.5, 1} and L = 8 gives {-1, -0.75, ..., 0.75}.

`levels` describes one sub-codebook; `num_codebooks` repeats it over contiguous channel groups, so
dim = len(levels) * num_codebooks. Index of a group = sum_i digit_i * prod_{j<i} L_j with digit_i in [0, L_i),
computed in int64 (float32 is exact only up to 2^24). No auxiliary loss.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor

from tokzoo.checks import is_int, positive_int
from tokzoo.errors import ConfigError
from tokzoo.quantizers.base import QUANTIZERS, Quantizer, QuantizerOutput, UsageTracker

EPS = 1e-3


@QUANTIZERS.register("fsq", example=dict(levels=[8, 5, 5], num_codebooks=2))
class FiniteScalarQuantizer(Quantizer):
    name = "fsq"

    def __init__(
        self,
        levels: list[int] | tuple[int, ...] = (8, 8, 8, 5, 5, 5),
        num_codebooks: int = 1,
        dim: int | None = None,
        stats_window: int = 100,
    ):
        super().__init__()
        levels = list(levels)
        positive_int("fsq", num_codebooks=num_codebooks)
        if not levels or any(not is_int(v) or v < 2 for v in levels):
            raise ConfigError(f"fsq: levels={levels} must be a non-empty list of integers >= 2, e.g. [8, 5, 5, 5]")
        expected = len(levels) * num_codebooks
        if dim is not None and dim != expected:
            raise ConfigError(
                f"fsq: dim={dim} does not fit levels={levels} x num_codebooks={num_codebooks} "
                f"(needs dim = len(levels) * num_codebooks = {expected}); change dim or the level list"
            )
        self.levels, self.num_codebooks, self.dim = levels, num_codebooks, expected
        vocab = math.prod(levels)
        self.codebook_sizes = [vocab] * num_codebooks
        lv = torch.tensor(levels, dtype=torch.float64)
        half = (lv - 1) * (1 + EPS) / 2
        offset = torch.where(lv % 2 == 0, 0.5, 0.0)
        self.register_buffer("half_range", half.float(), persistent=False)
        self.register_buffer("offset", offset.float(), persistent=False)
        self.register_buffer("shift", torch.atanh(offset / half).float(), persistent=False)
        self.register_buffer("half_width", (lv // 2).float(), persistent=False)
        self.register_buffer("levels_int", torch.tensor(levels, dtype=torch.long), persistent=False)
        basis = torch.cumprod(torch.tensor([1] + levels[:-1], dtype=torch.long), 0)
        self.register_buffer("basis", basis, persistent=False)
        # While every index fits below 2^24, float32 products and sums of these small integers are exact, so the
        # training path can compute indices with one matrix-vector product (see _indices_from_steps).
        self.float_exact_indices = vocab <= 1 << 24
        self.register_buffer("basis_float", basis.float(), persistent=False)
        # Python integers, not tensor reads: the pre-flight check builds every model on the meta device.
        self.index_offset = sum((lv_ // 2) * math.prod(levels[:i]) for i, lv_ in enumerate(levels))
        self.tracker = UsageTracker(num_codebooks, vocab, stats_window)

    def bound(self, x: Tensor) -> Tensor:
        return torch.tanh(x + self.shift) * self.half_range - self.offset

    def quantize(self, z: Tensor) -> QuantizerOutput:
        # z: (B, N, dim) fp32 -> x: (B*N, G, len(levels)). Plain reshapes: at this size einops' per-call cost
        # is a visible share of the step.
        b, t, _ = z.shape
        x = z.reshape(b * t, self.num_codebooks, len(self.levels))
        bounded = self.bound(x)
        steps = bounded.detach().round()  # integer grid steps, in [-(L // 2), L - 1 - L // 2]
        # round_ste(bounded) / half_width, with the rounding shared with the index computation below.
        z_hat = (bounded + (steps - bounded).detach()) / self.half_width
        indices = self._indices_from_steps(steps)  # (B*N, G)
        if self.training:
            self.tracker.record(indices)
        return QuantizerOutput(
            z_q=z_hat.view(b, t, self.dim),
            indices=indices.view(b, t, self.num_codebooks),
            loss=z.new_zeros(()),
            stats=self.tracker.stats(),
        )

    def _indices_from_steps(self, steps: Tensor) -> Tensor:
        """Rounded steps (M, G, len(levels)) -> (M, G) int64; equals codes_to_indices(steps / half_width)."""
        if not self.float_exact_indices:
            return ((steps.long() + self.levels_int // 2) * self.basis).sum(-1)
        # All values are integers below 2^24: float32 arithmetic is exact, in any summation order.
        m, g, n_levels = steps.shape
        return (steps.view(m * g, n_levels).mv(self.basis_float) + self.index_offset).long().view(m, g)

    def codes_to_indices(self, z_hat: Tensor) -> Tensor:
        """(..., len(levels)) grid values -> (...) int64 indices, in integer arithmetic."""
        digits = torch.round(z_hat * self.half_width).long() + self.levels_int // 2
        return (digits * self.basis).sum(-1)

    def decode(self, indices: Tensor) -> Tensor:
        # indices: (B, N, G) -> (B, N, dim)
        digits = (indices.unsqueeze(-1) // self.basis) % self.levels_int
        z_hat = (digits - self.levels_int // 2).float() / self.half_width
        return rearrange(z_hat, "b t g l -> b t (g l)")
