"""SimVQ. Zhu, Li, Zhang, Wang and Ouyang 2024, "Addressing Representation Collapse in Vector Quantized Models
with One Linear Layer" (arXiv 2411.02038).

A codebook C (K x d) drawn once at random and frozen, and a learned linear map W (d x d); the codes actually used
are the rows of C W (paper Eq. 6-8; stored here as an nn.Linear without bias, so a code is W c_k). Nearest code by
Euclidean distance to the rows of C W, then the VQ loss of the paper (its legacy=False form):

    loss = commitment_weight * ||z - sg(e)||^2 + codebook_weight * ||e - sg(z)||^2,     e = (C W)[k],

with beta = 0.25 and codebook weight 1. The codebook term reaches C only through W, so every step moves the whole
basis (all K codes at once) instead of the few codes that were hit: the paper's fix for collapse at large K.

C ~ N(0, 1/d) (std d^-1/2, as the paper's code), drawn from its own generator seeded with `codebook_seed`, so it
does not depend on the training seed and is identical on every DDP rank; it is a buffer (saved, never optimised).
W starts from nn.Linear's default initialisation. `normalize=True` (off in the paper; UniTok's convention) searches
by cosine on l2-normalised inputs and l2-normalised rows of C W.

The search runs in token blocks of at most SEARCH_BLOCK_ELEMENTS scores (64 MiB), so 65,536 codes x 65,536
tokens needs one (K, d) code matrix and one score block, not a (65,536 x 65,536) matrix. `blocked_search` (also
ibq's) is base.nearest_in_blocks with one codebook: the search of vq, mcq and rq.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from tokzoo.checks import is_int, positive_int
from tokzoo.errors import ConfigError
from tokzoo.quantizers.base import QUANTIZERS, Quantizer, QuantizerOutput, UsageTracker, nearest_in_blocks

METRICS = ("l2", "dot")


@torch.no_grad()
def blocked_search(x: Tensor, codes: Tensor, metric: str, block_elements: int | None = None) -> Tensor:
    """x (M, c), codes (K, c) -> (M,) int64: argmin ||x - e||^2 ("l2") or argmax x.e ("dot"), in token blocks
    of at most `block_elements` scores (the codebook quantizers' search, with one codebook)."""
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}; allowed: {', '.join(METRICS)}")
    return nearest_in_blocks(x[:, None], codes[None], cosine=metric == "dot", block_elements=block_elements)[:, 0]


@QUANTIZERS.register("simvq", example=dict(dim=8, codebook_size=16))
class SimVQ(Quantizer):
    name = "simvq"

    def __init__(
        self,
        dim: int = 64,
        codebook_size: int = 65536,
        normalize: bool = False,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        codebook_seed: int = 0,
        stats_window: int = 100,
    ):
        super().__init__()
        positive_int(self.name, dim=dim, codebook_size=codebook_size, stats_window=stats_window)
        if not is_int(codebook_seed) or codebook_seed < 0:
            raise ConfigError(f"{self.name}: codebook_seed={codebook_seed!r} must be an integer >= 0")
        if not isinstance(normalize, bool):
            raise ConfigError(f"{self.name}: normalize={normalize!r} must be true or false")
        self.dim, self.normalize = dim, normalize
        self.codebook_sizes = [codebook_size]
        self.commitment_weight, self.codebook_weight = commitment_weight, codebook_weight
        generator = torch.Generator().manual_seed(codebook_seed)
        self.register_buffer("frozen_codes", torch.randn(codebook_size, dim, generator=generator) * dim**-0.5)
        self.proj = nn.Linear(dim, dim, bias=False)  # W: the only learned part of the codebook
        self.tracker = UsageTracker(1, codebook_size, stats_window)

    def codebook_parameters(self) -> list[nn.Parameter]:
        return [self.proj.weight]  # what decode reads and the codebook loss trains; C is a buffer

    def codes(self) -> Tensor:
        """(K, d) effective codes C W (l2-normalised rows when normalize=True)."""
        return self._project(self.frozen_codes)

    def _project(self, c: Tensor) -> Tensor:
        e = F.linear(c.float(), self.proj.weight.float())
        return F.normalize(e, dim=-1) if self.normalize else e

    def quantize(self, z: Tensor) -> QuantizerOutput:
        # z: (B, N, d) fp32 -> x: (B*N, d); indices (B*N,)
        b = z.shape[0]
        x = rearrange(z, "b t c -> (b t) c")
        if self.normalize:
            x = F.normalize(x, dim=-1)
        with torch.no_grad():
            codes = self.codes()  # (K, d), no graph: only the chosen rows need one
        indices = blocked_search(x, codes, "dot" if self.normalize else "l2")
        # Only the M chosen rows go through W with a graph: the gradient to W is the same as through all K.
        e = self._project(self.frozen_codes[indices])  # (M, d)

        loss = self.commitment_weight * (x - e.detach()).pow(2).mean()
        loss = loss + self.codebook_weight * (e - x.detach()).pow(2).mean()
        if self.training:
            self.tracker.record(indices.unsqueeze(-1))

        x_q = x + (e - x).detach()  # straight-through
        return QuantizerOutput(
            z_q=rearrange(x_q, "(b t) c -> b t c", b=b),
            indices=rearrange(indices, "(b t) -> b t 1", b=b),
            loss=loss,
            stats=self.tracker.stats(),
        )

    def decode(self, indices: Tensor) -> Tensor:
        # indices: (B, N, 1) -> (B, N, d)
        return self._project(self.frozen_codes[indices[..., 0]])
