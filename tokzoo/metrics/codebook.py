"""Codebook statistics over a whole validation set (or any window between resets), per sub-codebook."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor
from torchmetrics import Metric


class CodebookUsage(Metric):
    """Histogram of code indices per sub-codebook, summed across ranks.

    update(indices): (B, N, C) integer codes, C == len(codebook_sizes) (any leading dims work).
    compute() -> {"codebook_usage", "perplexity", "dead_codes"} averaged over sub-codebooks, plus
    "codebook_usage/i", "perplexity/i", "dead_codes/i" per sub-codebook i:
      usage      fraction of the codebook's entries hit at least once in the window
      perplexity exp(entropy of the code histogram), in codes (1 = collapse, K = uniform); 0 if nothing seen
      dead_codes fraction never hit, or (dead_after_steps=T) not hit during the last T update() calls
    One flat count vector holds all sub-codebooks, so 8 x 2^16 entries cost 4 MB.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, codebook_sizes: Sequence[int], dead_after_steps: int | None = None, **kwargs):
        super().__init__(**kwargs)
        sizes = [int(s) for s in codebook_sizes]
        if not sizes or min(sizes) < 1:
            raise ValueError(f"codebook_sizes must be a non-empty list of positive sizes, got {list(codebook_sizes)}")
        if dead_after_steps is not None and dead_after_steps < 1:
            raise ValueError(f"dead_after_steps must be >= 1 or None, got {dead_after_steps}")
        self.codebook_sizes = sizes
        self.dead_after_steps = dead_after_steps
        total = sum(sizes)
        self.register_buffer("offsets", torch.tensor([0] + sizes[:-1]).cumsum(0), persistent=False)
        self.register_buffer("sizes_t", torch.tensor(sizes), persistent=False)
        self.add_state("counts", torch.zeros(total, dtype=torch.long), dist_reduce_fx="sum")
        if dead_after_steps is not None:
            # update() call (1-based) at which each code was last hit; 0 = never; max over ranks = latest
            self.add_state("last_hit", torch.zeros(total, dtype=torch.long), dist_reduce_fx="max")
            self.add_state("steps", torch.zeros((), dtype=torch.long), dist_reduce_fx="max")

    def update(self, indices: Tensor) -> None:
        # indices: (..., C) int -> histogram over sum(codebook_sizes) bins
        num_books = len(self.codebook_sizes)
        if indices.shape[-1] != num_books:
            raise ValueError(
                f"indices have {indices.shape[-1]} codes per token (last dim) but CodebookUsage was built "
                f"for {num_books} sub-codebooks"
            )
        flat = rearrange(indices.long(), "... c -> (...) c")
        if flat.numel() and (flat.min() < 0 or (flat >= self.sizes_t).any()):
            raise ValueError(f"code indices out of range for codebook sizes {self.codebook_sizes}")
        batch_counts = torch.bincount((flat + self.offsets).flatten(), minlength=self.counts.numel())
        self.counts += batch_counts
        if self.dead_after_steps is not None:
            self.steps += 1
            self.last_hit[batch_counts > 0] = self.steps

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        usage, perplexity, dead = [], [], []
        for i, (start, size) in enumerate(zip(self.offsets.tolist(), self.codebook_sizes, strict=True)):
            counts = self.counts[start : start + size].double()
            total = counts.sum()
            hit = counts > 0
            if total > 0:
                p = counts[hit] / total
                ppl = float(torch.exp(-(p * p.log()).sum()))
            else:
                ppl = 0.0
            if self.dead_after_steps is None:
                dead_mask = ~hit
            else:
                last = self.last_hit[start : start + size]
                dead_mask = (last == 0) | (self.steps - last >= self.dead_after_steps)
            usage.append(float(hit.double().mean()))
            perplexity.append(ppl)
            dead.append(float(dead_mask.double().mean()))
            out[f"codebook_usage/{i}"], out[f"perplexity/{i}"], out[f"dead_codes/{i}"] = (
                usage[-1],
                ppl,
                dead[-1],
            )
        out["codebook_usage"] = sum(usage) / len(usage)
        out["perplexity"] = sum(perplexity) / len(perplexity)
        out["dead_codes"] = sum(dead) / len(dead)
        return out
