"""Windowed code-usage statistics shared by every quantizer, identical on every DDP rank.

usage = fraction of codes hit in the last `window` training steps, dead_codes = 1 - usage, perplexity = exp of the
entropy of an exponentially averaged code histogram; per codebook ("usage/0", ...) when there are several.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from tokzoo.distributed import all_reduce_sum, world_size

NEVER = -(1 << 40)


def entropy(probs: Tensor, dim: int = -1) -> Tensor:
    return -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim)


class UsageTracker(nn.Module):
    """Per-code usage over a window of training steps, for n codebooks of K codes.

    usage = fraction of codes hit in the last `window` steps; dead_codes = 1 - usage; perplexity = exp(entropy)
    of an exponentially averaged code histogram (decay 1 - 1/window). Counts are all-reduced before they are
    used, so every rank holds identical statistics. All tensors stay on device: reading them is the caller's sync.
    """

    def __init__(self, num_codebooks: int, codebook_size: int, window: int = 100):
        super().__init__()
        self.window = window
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        # "Never used" is a step far in the past, so unused codes count as idle from the start.
        self.register_buffer("last_used", torch.full((num_codebooks, codebook_size), NEVER, dtype=torch.long))
        self.register_buffer("histogram", torch.zeros(num_codebooks, codebook_size))

    @torch.no_grad()
    def update(self, counts: Tensor, hits: Tensor | None = None) -> None:
        """counts: (n, K) code hits of one training step, already summed over ranks.

        hits (optional): this rank's flat code indices (codebook * K + code, see `flat_codes`). In a single
        process they mark the used codes in O(tokens) instead of a pass over all n * K codes; under DDP other
        ranks' hits only show in the reduced counts, so those decide.
        """
        self.step += 1
        if hits is not None and world_size() == 1:
            # scatter_ of the step tensor: no host sync (index_fill_ would read the value with .item())
            hits = hits.reshape(-1)
            self.last_used.view(-1).scatter_(0, hits, self.step.expand(hits.shape))
        else:
            self.last_used.copy_(torch.where(counts > 0, self.step, self.last_used))
        decay = 1.0 - 1.0 / self.window
        self.histogram.mul_(decay).add_(counts.float(), alpha=1.0 - decay)

    @torch.no_grad()
    def record(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """One training step's codes, indices (M, n): counted, summed over ranks and recorded.
        Returns (flat codes, reduced counts (n, K)) for callers that also update codebooks from them."""
        n, k = self.last_used.shape
        flat = flat_codes(indices, n, k)
        counts = all_reduce_sum(code_counts(indices, n, k, flat))
        self.update(counts, flat)
        return flat, counts

    def idle_steps(self) -> Tensor:
        return self.step - self.last_used  # (n, K)

    def stats(self) -> LazyStats:
        """Usage statistics as of now. The buffers are copied (cheap) and the reductions run only when the
        result is read, which the training loop does once per logging interval, not every step."""
        step, last_used, histogram = self.step.clone(), self.last_used.clone(), self.histogram.clone()
        return LazyStats(lambda: usage_stats(step, last_used, histogram, self.window))


def usage_stats(step: Tensor, last_used: Tensor, histogram: Tensor, window: int) -> dict[str, Tensor]:
    # idle < window  <=>  last_used > step - window: one comparison pass over the codes instead of three.
    live = (last_used > step - window).sum(-1, dtype=torch.int32)  # (n,), exact below 2^31
    usage = live.float() / last_used.shape[-1]  # (n,)
    probs = histogram / histogram.sum(-1, keepdim=True).clamp_min(1e-12)
    perplexity = torch.exp(entropy(probs))  # (n,)
    mean_usage = usage.mean()
    out = {"usage": mean_usage, "perplexity": perplexity.mean(), "dead_codes": 1.0 - mean_usage}
    if usage.numel() > 1:
        for i in range(usage.numel()):
            out[f"usage/{i}"] = usage[i]
            out[f"perplexity/{i}"] = perplexity[i]
            out[f"dead_codes/{i}"] = 1.0 - usage[i]
    return out


class LazyStats(Mapping):
    """A read-only dict of statistics computed on first access (then cached)."""

    def __init__(self, compute: Callable[[], dict[str, Tensor]]):
        self._compute = compute
        self._values: dict[str, Tensor] | None = None

    def _resolved(self) -> dict[str, Tensor]:
        if self._values is None:
            self._values = self._compute()
        return self._values

    def __getitem__(self, key: str) -> Tensor:
        return self._resolved()[key]

    def __iter__(self):
        return iter(self._resolved())

    def __len__(self) -> int:
        return len(self._resolved())

    def __repr__(self) -> str:
        return repr(self._resolved())


def flat_codes(indices: Tensor, num_codebooks: int, codebook_size: int) -> Tensor:
    """indices (M, n) -> (M * n,) indices into the n * K codes of all codebooks (codebook i at offset i * K)."""
    if num_codebooks == 1:
        return indices.reshape(-1)
    offsets = torch.arange(num_codebooks, device=indices.device) * codebook_size
    return (indices + offsets).reshape(-1)


def code_counts(indices: Tensor, num_codebooks: int, codebook_size: int, flat: Tensor | None = None) -> Tensor:
    """indices (M, n) -> float32 hit counts (n, K) (`flat`: the flat_codes of indices, if already computed).

    One scatter-add of ones over the offset indices: float32 holds every count exactly (far fewer than 2^24
    tokens per step), it is the dtype the EMA and the all-reduce want, and unlike torch.bincount it needs no
    host sync on CUDA.
    """
    flat = flat_codes(indices, num_codebooks, codebook_size) if flat is None else flat
    counts = torch.zeros(num_codebooks * codebook_size, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones(flat.shape, device=flat.device))
    return counts.view(num_codebooks, codebook_size)
