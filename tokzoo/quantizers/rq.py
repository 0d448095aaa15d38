"""Residual quantization (RQ-VAE / VILA-U): depth D, r_0 = z, k_d = nearest(r_{d-1}), r_d = r_{d-1} - e_d(k_d),
z_hat = sum_d e_d(k_d). Full-width residuals, Euclidean distance, no l2-normalisation (normalised codes cannot
follow shrinking residual norms). Effective vocabulary K^D, so bits per token = D * log2(K).

Defaults follow VILA-U: EMA codebooks (decay 0.99) with dead-code restarts, one codebook per depth
(`shared_codebook=True` uses one for all depths). Code 0 of every codebook is pinned to zero (`zero_code`), so a
depth that cannot shrink the residual leaves it unchanged: the quantization error never grows with depth.

Options, both off by default (then the output is bit-identical to the plain quantizer):
- rotation_trick: the gradient reaches z through the rotation and rescaling that maps z onto the cumulative
  reconstruction z_hat (the vector the decoder sees; rotation.py), instead of the identity straight-through.
- entropy_weight > 0: adds entropy_weight * the MAGVIT-v2-style entropy term of each depth's residual against
  that depth's codebook (codebook_entropy.py), averaged over depths, to the training loss.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from einops import rearrange
from torch import Tensor, nn

from tokzoo.checks import positive_int
from tokzoo.quantizers.base import (
    QUANTIZERS,
    CodebookSet,
    LazyStats,
    Quantizer,
    QuantizerOutput,
    check_codebook_options,
)
from tokzoo.quantizers.codebook_entropy import codebook_entropy_loss
from tokzoo.quantizers.rotation import straight_through


@QUANTIZERS.register("rq", example=dict(dim=8, depth=3, codebook_size=16))
class ResidualQuantizer(Quantizer):
    name = "rq"

    def __init__(
        self,
        dim: int = 64,
        depth: int = 8,
        codebook_size: int = 4096,
        shared_codebook: bool = False,
        update: str = "ema",
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        ema_decay: float = 0.99,
        kmeans_init: bool = False,
        restart_dead_after: int = 100,
        stats_window: int = 100,
        zero_code: bool = True,
        rotation_trick: bool = False,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 0.01,
    ):
        super().__init__()
        positive_int("rq", dim=dim, depth=depth, codebook_size=codebook_size)
        check_codebook_options("rq", rotation_trick, entropy_weight, entropy_temperature)
        self.dim, self.depth, self.shared_codebook = dim, depth, shared_codebook
        self.codebook_sizes = [codebook_size] * depth
        self.commitment_weight, self.codebook_weight, self.update_rule = commitment_weight, codebook_weight, update
        self.rotation_trick = rotation_trick
        self.entropy_weight, self.entropy_temperature = entropy_weight, entropy_temperature
        self.codebooks = nn.ModuleList(
            CodebookSet(
                1,
                codebook_size,
                dim,
                normalize=False,
                update=update,
                ema_decay=ema_decay,
                kmeans_init=kmeans_init,
                restart_dead_after=restart_dead_after,
                stats_window=stats_window,
                zero_code=zero_code,
            )
            for _ in range(1 if shared_codebook else depth)
        )

    def _codebook(self, d: int) -> CodebookSet:
        return self.codebooks[0 if self.shared_codebook else d]

    def quantize(self, z: Tensor) -> QuantizerOutput:
        # z: (B, N, dim) fp32 -> x: (B*N, 1, dim); one (M, 1) index per depth
        b = z.shape[0]
        x = rearrange(z, "b t c -> (b t) 1 c")
        residual, z_hat = x, torch.zeros_like(x)
        residuals, indices, codebook_terms, entropy_terms = [], [], [], []
        entropy_on = self.entropy_weight > 0 and self.training
        for d in range(self.depth):
            book = self._codebook(d)
            book.maybe_init(residual)
            codes = book.codes()
            idx = book.nearest(residual, codes)  # (M, 1)
            e = book.lookup(idx, codes)  # (M, 1, dim)
            codebook_terms.append((e - residual.detach()).pow(2).mean())
            if entropy_on:
                entropy_terms.append(codebook_entropy_loss(residual, codes, self.entropy_temperature))
            residuals.append(residual)
            indices.append(idx)
            z_hat = z_hat + e
            residual = residual - e.detach()

        # Commitment on the cumulative sum; codebook term on each depth's residual (gradient codebooks only).
        loss = self.commitment_weight * (x - z_hat.detach()).pow(2).mean()
        if self.update_rule == "grad":
            loss = loss + self.codebook_weight * torch.stack(codebook_terms).mean()
        if entropy_on:
            loss = loss + self.entropy_weight * torch.stack(entropy_terms).mean()

        if self.shared_codebook:
            self.codebooks[0].update(torch.cat(residuals), torch.cat(indices))
        else:
            for book, r, idx in zip(self.codebooks, residuals, indices):
                book.update(r, idx)

        z_q = straight_through(x, z_hat, self.rotation_trick)
        return QuantizerOutput(
            z_q=rearrange(z_q, "(b t) 1 c -> b t c", b=b),
            indices=rearrange(torch.cat(indices, dim=1), "(b t) d -> b t d", b=b),
            loss=loss,
            stats=self._stats(),
        )

    def _stats(self) -> Mapping[str, Tensor]:
        if self.shared_codebook:
            return self.codebooks[0].tracker.stats()
        per_depth = [book.tracker.stats() for book in self.codebooks]
        return LazyStats(lambda: self._combine(per_depth))

    def _combine(self, per_depth: list[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        keys = ("usage", "perplexity", "dead_codes")
        out = {key: torch.stack([s[key] for s in per_depth]).mean() for key in keys}
        if self.depth > 1:
            for d, s in enumerate(per_depth):
                for key in keys:
                    out[f"{key}/{d}"] = s[key]
        return out

    def decode(self, indices: Tensor) -> Tensor:
        # indices: (B, N, D) -> (B, N, dim)
        b = indices.shape[0]
        flat = rearrange(indices, "b t d -> (b t) d")
        z_hat = sum(self._codebook(d).lookup(flat[:, d : d + 1]) for d in range(self.depth))
        return rearrange(z_hat, "(b t) 1 c -> b t c", b=b)

    def partial_reconstructions(self, z: Tensor) -> list[Tensor]:
        """The running sums z_hat_1..z_hat_D for z (B, N, dim), in eval mode: for error-vs-depth analyses."""
        out = self(z)
        flat = rearrange(out.indices, "b t d -> (b t) d")
        running, sums = 0, []
        for d in range(self.depth):
            running = running + self._codebook(d).lookup(flat[:, d : d + 1])
            sums.append(rearrange(running, "(b t) 1 c -> b t c", b=z.shape[0]))
        return sums
