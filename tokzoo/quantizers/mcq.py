"""Multi-codebook quantization (UniTok): split the latent into n contiguous channel chunks, quantize chunk i with
its own codebook of K codes, concatenate. Effective vocabulary K^n, so bits per token = n * log2(K).

`codebook_size` is the size of EACH sub-codebook (UniTok's code divides a total vocabulary by n instead:
32768 total = 8 x 4096; here you would write num_codebooks=8, codebook_size=4096).

Options, both off by default (then the output is bit-identical to the plain quantizer):
- rotation_trick: the gradient reaches each chunk through the rotation and rescaling that maps it onto its code
  (Fifty et al. 2024; rotation.py) instead of the identity straight-through; the forward value is unchanged.
- entropy_weight > 0: adds entropy_weight * (mean per-token entropy - entropy of the batch-mean assignment) of
  softmax(-||x - e_k||^2 / entropy_temperature) per codebook, averaged over codebooks, to the training loss
  (MAGVIT-v2's LFQ term on a learned codebook; codebook_entropy.py, which also states its memory cost).
"""

from __future__ import annotations

from einops import rearrange
from torch import Tensor

from tokzoo.checks import positive_int
from tokzoo.errors import ConfigError
from tokzoo.quantizers.base import QUANTIZERS, CodebookSet, Quantizer, QuantizerOutput, check_codebook_options
from tokzoo.quantizers.codebook_entropy import codebook_entropy_loss
from tokzoo.quantizers.rotation import straight_through


@QUANTIZERS.register("mcq", example=dict(dim=8, num_codebooks=2, codebook_size=16))
class MultiCodebookQuantizer(Quantizer):
    name = "mcq"

    def __init__(
        self,
        dim: int = 64,
        num_codebooks: int = 8,
        codebook_size: int = 4096,
        normalize: bool = True,
        update: str = "grad",
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        ema_decay: float = 0.99,
        kmeans_init: bool = False,
        restart_dead_after: int = 0,
        stats_window: int = 100,
        rotation_trick: bool = False,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 0.01,
    ):
        super().__init__()
        positive_int(self.name, dim=dim, num_codebooks=num_codebooks, codebook_size=codebook_size)
        check_codebook_options(self.name, rotation_trick, entropy_weight, entropy_temperature)
        if dim % num_codebooks:
            raise ConfigError(
                f"{self.name}: dim={dim} is not divisible by num_codebooks={num_codebooks}; "
                f"choose a dim that is a multiple of num_codebooks"
            )
        self.dim, self.num_codebooks = dim, num_codebooks
        self.codebook_sizes = [codebook_size] * num_codebooks
        self.commitment_weight, self.codebook_weight = commitment_weight, codebook_weight
        self.rotation_trick = rotation_trick
        self.entropy_weight, self.entropy_temperature = entropy_weight, entropy_temperature
        self.codebooks = CodebookSet(
            num_codebooks,
            codebook_size,
            dim // num_codebooks,
            normalize=normalize,
            update=update,
            ema_decay=ema_decay,
            kmeans_init=kmeans_init,
            restart_dead_after=restart_dead_after,
            stats_window=stats_window,
        )

    def quantize(self, z: Tensor) -> QuantizerOutput:
        # z: (B, N, dim) fp32 -> chunks x: (B*N, n, c)
        b = z.shape[0]
        x = rearrange(z, "b t (n c) -> (b t) n c", n=self.num_codebooks)
        self.codebooks.maybe_init(x)
        x = self.codebooks.prepare_input(x)  # l2-normalised per chunk when normalize=True
        codes = self.codebooks.codes()
        indices = self.codebooks.nearest(x, codes)  # (B*N, n)
        e = self.codebooks.lookup(indices, codes)  # (B*N, n, c)

        # Per-codebook mean squared errors, then averaged over codebooks.
        commitment = (x - e.detach()).pow(2).mean()
        loss = self.commitment_weight * commitment
        if self.codebooks.update_rule == "grad":
            loss = loss + self.codebook_weight * (e - x.detach()).pow(2).mean()
        if self.entropy_weight > 0 and self.training:
            loss = loss + self.entropy_weight * codebook_entropy_loss(x, codes, self.entropy_temperature)
        self.codebooks.update(x, indices)

        x_q = straight_through(x, e, self.rotation_trick)
        return QuantizerOutput(
            z_q=rearrange(x_q, "(b t) n c -> b t (n c)", b=b),
            indices=rearrange(indices, "(b t) n -> b t n", b=b),
            loss=loss,
            stats=self.codebooks.tracker.stats(),
        )

    def decode(self, indices: Tensor) -> Tensor:
        # indices: (B, N, n) -> (B, N, dim)
        b = indices.shape[0]
        e = self.codebooks.lookup(rearrange(indices, "b t n -> (b t) n"))
        return rearrange(e, "(b t) n c -> b t (n c)", b=b)
