"""What every quantizer shares: the output type, the registry, codebooks with blocked nearest-code search, and
windowed usage statistics that agree across DDP ranks.

Conventions (see ../shared/docs/QUANTIZERS.md):
- input z is (B, N, dim); indices are (B, N, C) int64 with C codes per token; `codebook_sizes` lists the size of
  each of the C codebooks; `bits_per_token` = log2 of the effective vocabulary.
- all arithmetic runs in fp32 even under autocast; z_q comes back in the input's dtype.
- training-time side effects (EMA updates, usage tracking, k-means init, dead-code restarts) happen only when
  `self.training` is true, so validation and Lightning's sanity check never move a codebook.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from tokzoo.errors import ConfigError
from tokzoo.registry import Registry

QUANTIZERS = Registry("quantizer")

# Upper bound on the (tokens x codes) score block of the nearest-code search: 2^24 floats = 64 MiB.
SEARCH_BLOCK_ELEMENTS = 1 << 24
UPDATE_CHOICES = ("grad", "ema")
NEVER = -(1 << 40)


@dataclass
class QuantizerOutput:
    z_q: Tensor  # (B, N, dim), straight-through to z
    indices: Tensor  # (B, N, C) int64
    loss: Tensor  # scalar
    stats: Mapping[str, Tensor] = field(default_factory=dict)  # computed when first read (LazyStats)


def world_size() -> int:
    """Decided at call time: the module is usually built before the process group exists."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_sum(t: Tensor) -> Tensor:
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_from_rank0(t: Tensor) -> Tensor:
    if world_size() > 1:
        dist.broadcast(t, src=0)
    return t


def round_ste(x: Tensor) -> Tensor:
    """Round with a straight-through (identity) gradient."""
    return x + (x.round() - x).detach()


def check_positive(**values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"quantizer argument {key}={value!r} must be a positive integer")


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


def _restore_update_count(module: nn.Module, incompatible_keys: object) -> None:
    """Load hook: tracker.step (saved) counts the same updates, so a resumed run keeps the restart schedule."""
    module._updates = int(module.tracker.step)


class CodebookSet(nn.Module):
    """n independent codebooks of K codes of width c, searched together.

    update="grad": codes are an nn.Parameter learned through the codebook loss.
    update="ema": codes follow an exponential moving average of their assigned inputs (Laplace-smoothed counts);
    they are buffers, all-reduced across ranks, and the caller drops the codebook loss term.
    zero_code=True pins code 0 of every codebook to the zero vector (used by RQ so a depth can always leave the
    residual as it is, which makes the error non-increasing with depth).
    """

    def __init__(
        self,
        num_codebooks: int,
        codebook_size: int,
        code_dim: int,
        *,
        normalize: bool,
        update: str = "grad",
        ema_decay: float = 0.99,
        ema_epsilon: float = 1e-5,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        restart_dead_after: int = 0,
        stats_window: int = 100,
        zero_code: bool = False,
    ):
        super().__init__()
        check_positive(num_codebooks=num_codebooks, codebook_size=codebook_size, code_dim=code_dim)
        if update not in UPDATE_CHOICES:
            raise ConfigError(f"quantizer argument update='{update}' is unknown; allowed: {', '.join(UPDATE_CHOICES)}")
        if not 0.0 < ema_decay < 1.0:
            raise ConfigError(f"quantizer argument ema_decay={ema_decay} must lie in (0, 1)")
        self.num_codebooks, self.codebook_size, self.code_dim = num_codebooks, codebook_size, code_dim
        self.normalize, self.update_rule, self.zero_code = normalize, update, zero_code
        self.ema_decay, self.ema_epsilon = ema_decay, ema_epsilon
        self.kmeans_iters, self.restart_dead_after = kmeans_iters, restart_dead_after

        init = torch.randn(num_codebooks, codebook_size, code_dim)
        if normalize:
            init = F.normalize(init, dim=-1)
        else:
            init = init / math.sqrt(code_dim)  # unit expected norm, like the normalised case
        if update == "grad":
            self.embed = nn.Parameter(init)
        else:
            self.register_buffer("embed", init)
            self.register_buffer("ema_count", torch.ones(num_codebooks, codebook_size))
            self.register_buffer("ema_sum", init.clone())
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        # Host-side mirrors of device state, so the training step does not sync with the GPU every call.
        self._known_initialized = not kmeans_init
        self._updates = 0
        self.register_load_state_dict_post_hook(_restore_update_count)
        self.tracker = UsageTracker(num_codebooks, codebook_size, stats_window)

    # ---- search and lookup -------------------------------------------------------------------------------
    def codes(self) -> Tensor:
        """(n, K, c) codes as used for search and lookup (normalised / zero-pinned)."""
        codes = self.embed.float()
        if self.normalize:
            codes = F.normalize(codes, dim=-1)
        if self.zero_code:
            codes = torch.cat([torch.zeros_like(codes[:, :1]), codes[:, 1:]], dim=1)
        return codes

    def prepare_input(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1) if self.normalize else x

    @torch.no_grad()
    def nearest(self, x: Tensor, codes: Tensor | None = None) -> Tensor:
        """x (M, n, c) -> indices (M, n) of the nearest code, searched in token blocks (bounded memory)."""
        codes = self.codes() if codes is None else codes
        n, k, _ = codes.shape
        # Cosine: argmax x.e. Euclidean: argmin ||e||^2 - 2 x.e (||x||^2 is the same for every code); the -2 is
        # folded into the codes (exact: a power of two) and ||e||^2 added in place, so a block costs one score
        # matrix and no temporaries.
        if self.normalize:
            sq_norms, rhs = None, codes.transpose(1, 2)  # (n, c, K)
        else:
            sq_norms, rhs = codes.pow(2).sum(-1).unsqueeze(1), (-2 * codes).transpose(1, 2)  # (n, 1, K), (n, c, K)
        block = max(1, SEARCH_BLOCK_ELEMENTS // (n * k))
        out = torch.empty(x.shape[0], n, dtype=torch.long, device=x.device)
        for start in range(0, x.shape[0], block):
            xb = x[start : start + block].transpose(0, 1)  # (n, b, c)
            scores = torch.bmm(xb, rhs)  # (n, b, K)
            if sq_norms is None:
                out[start : start + block] = scores.argmax(-1).T
            else:
                out[start : start + block] = scores.add_(sq_norms).argmin(-1).T
        return out

    def lookup(self, indices: Tensor, codes: Tensor | None = None) -> Tensor:
        """indices (M, n) -> codes (M, n, c); differentiable w.r.t. the codebook."""
        codes = self.codes() if codes is None else codes
        return codes[torch.arange(self.num_codebooks, device=indices.device), indices]

    # ---- training-time side effects ----------------------------------------------------------------------
    @torch.no_grad()
    def maybe_init(self, x: Tensor) -> None:
        """k-means init from the first training batch (x (M, n, c)), identical on every rank (rank 0 decides)."""
        if not self.training or self._known_initialized:
            return
        if bool(self.initialized):  # e.g. restored from a checkpoint: read the buffer once
            self._known_initialized = True
            return
        centroids = kmeans(self.prepare_input(x.float()), self.codebook_size, self.kmeans_iters)
        broadcast_from_rank0(centroids)
        self._set_codes(centroids, torch.ones_like(self.tracker.histogram, dtype=torch.bool))
        self.initialized.fill_(True)
        self._known_initialized = True

    @torch.no_grad()
    def update(self, x: Tensor, indices: Tensor) -> None:
        """After a training forward: x (M, n, c) inputs as searched, indices (M, n) their codes."""
        if not self.training:
            return
        flat = flat_codes(indices, self.num_codebooks, self.codebook_size)
        counts = all_reduce_sum(code_counts(indices, self.num_codebooks, self.codebook_size, flat))
        self.tracker.update(counts, flat)
        if self.update_rule == "ema":
            self._ema_step(x, flat, counts)
        self._updates += 1
        if self.restart_dead_after > 0 and self._updates % self.restart_dead_after == 0:
            self._restart_dead(x)

    def _ema_step(self, x: Tensor, flat: Tensor, counts: Tensor) -> None:
        # flat: (M * n,) indices into all n * K codes (flat_codes), counts: (n, K) reduced over ranks
        n, k, c = self.embed.shape
        sums = torch.zeros(n * k, c, device=x.device).index_add_(0, flat, x.reshape(-1, c).float())
        sums = all_reduce_sum(sums.view(n, k, c))
        decay = self.ema_decay
        self.ema_count.mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_sum.mul_(decay).add_(sums, alpha=1 - decay)
        total = self.ema_count.sum(-1, keepdim=True)
        smoothed = (self.ema_count + self.ema_epsilon) / (total + k * self.ema_epsilon) * total
        self.embed.copy_(self.ema_sum / smoothed.unsqueeze(-1))

    def _restart_dead(self, x: Tensor) -> None:
        dead = self.tracker.idle_steps() >= self.restart_dead_after  # (n, K), identical on all ranks
        if self.zero_code:
            dead[:, 0] = False
        if not bool(dead.any()):
            return
        # Replacement inputs drawn from this batch on rank 0, then broadcast, so every rank restarts alike.
        picks = torch.randint(0, x.shape[0], (self.num_codebooks, self.codebook_size), device=x.device)
        candidates = x.float().transpose(0, 1).gather(1, picks.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        broadcast_from_rank0(candidates)
        self._set_codes(self.prepare_input(candidates), dead)

    def _set_codes(self, new: Tensor, mask: Tensor) -> None:
        """Overwrite codes where mask (n, K) is true, resetting their EMA state and idle counters."""
        m = mask.unsqueeze(-1)
        self.embed.data.copy_(torch.where(m, new.to(self.embed.dtype), self.embed.data))
        if self.update_rule == "ema":
            self.ema_sum.copy_(torch.where(m, new, self.ema_sum))
            self.ema_count.copy_(torch.where(mask, torch.ones_like(self.ema_count), self.ema_count))
        self.tracker.last_used.copy_(torch.where(mask, self.tracker.step, self.tracker.last_used))


@torch.no_grad()
def kmeans(x: Tensor, num_clusters: int, iters: int) -> Tensor:
    """Batched Lloyd k-means. x (M, n, c) -> centroids (n, K, c); seeds sampled with replacement when M < K."""
    m, n, c = x.shape
    xs = x.transpose(0, 1)  # (n, M, c)
    seeds = torch.randint(0, m, (n, num_clusters), device=x.device)
    centroids = xs.gather(1, seeds.unsqueeze(-1).expand(-1, -1, c)).clone()
    for _ in range(iters):
        dists = torch.cdist(xs, centroids)  # (n, M, K)
        assign = dists.argmin(-1)  # (n, M)
        sums = torch.zeros_like(centroids).scatter_add_(1, assign.unsqueeze(-1).expand(-1, -1, c), xs)
        ones = torch.ones_like(assign, dtype=x.dtype)
        counts = torch.zeros(n, num_clusters, device=x.device).scatter_add_(1, assign, ones)
        centroids = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp_min(1).unsqueeze(-1), centroids)
    return centroids


class Quantizer(nn.Module):
    """Base class: shape checks and fp32 execution around `quantize`; subclasses set the attributes below."""

    name: str = ""
    dim: int
    codebook_sizes: list[int]

    @property
    def num_codes_per_token(self) -> int:
        return len(self.codebook_sizes)

    @property
    def bits_per_token(self) -> float:
        return float(sum(math.log2(k) for k in self.codebook_sizes))

    def forward(self, z: Tensor) -> QuantizerOutput:
        if z.ndim != 3 or z.shape[-1] != self.dim:
            raise ConfigError(
                f"quantizer '{self.name}' expects input of shape (B, N, {self.dim}), got {tuple(z.shape)}; "
                f"set the factorization's out_dim to the quantizer's dim"
            )
        # Distances, entropies and rounding in bf16/fp16 give wrong argmins and NaNs: always fp32.
        with torch.autocast(device_type=z.device.type, enabled=False):
            out = self.quantize(z.float())
        return out if out.z_q.dtype == z.dtype else replace(out, z_q=out.z_q.to(z.dtype))

    def quantize(self, z: Tensor) -> QuantizerOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, indices: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"dim={self.dim}, codebook_sizes={self.codebook_sizes}, bits_per_token={self.bits_per_token:g}"


def build_quantizer(name: str, **kwargs) -> Quantizer:
    return QUANTIZERS.build(name, **kwargs)


def list_quantizers() -> list[str]:
    return QUANTIZERS.names()
