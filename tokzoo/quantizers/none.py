"""The identity 'quantizer' for continuous baselines (CLIP, factorized-but-continuous models in the roadmap)."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from tokzoo.quantizers.base import QUANTIZERS, Quantizer, QuantizerOutput, check_positive


@QUANTIZERS.register("none")
class IdentityQuantizer(Quantizer):
    name = "none"

    def __init__(self, dim: int = 64):
        super().__init__()
        check_positive(dim=dim)
        self.dim = dim
        self.codebook_sizes = []

    @property
    def bits_per_token(self) -> float:
        return float("inf")  # continuous: no finite vocabulary

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
