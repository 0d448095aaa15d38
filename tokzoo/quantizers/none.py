"""The identity 'quantizer' for continuous baselines (CLIP, factorized-but-continuous models in the roadmap)."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from tokzoo.checks import positive_int
from tokzoo.quantizers.base import QUANTIZERS, Quantizer, QuantizerOutput


@QUANTIZERS.register("none", example=dict(dim=8))
class IdentityQuantizer(Quantizer):
    name = "none"
    continuous = True  # no indices, no finite vocabulary: bits_per_token is inf

    def __init__(self, dim: int = 64):
        super().__init__()
        positive_int("none", dim=dim)
        self.dim = dim
        self.codebook_sizes = []

    def forward(self, z: Tensor) -> QuantizerOutput:
        # The base class checks the shape and round-trips through fp32; the identity must be exact in every dtype
        # (an fp64 input would otherwise lose precision), so hand back the input itself.
        return replace(super().forward(z), z_q=z)

    def quantize(self, z: Tensor) -> QuantizerOutput:
        b, n, _ = z.shape
        return QuantizerOutput(
            z_q=z, indices=torch.zeros(b, n, 0, dtype=torch.long, device=z.device), loss=z.new_zeros(())
        )

    def decode(self, indices: Tensor) -> Tensor:
        raise ValueError("quantizer 'none' is continuous: there are no indices to decode")
