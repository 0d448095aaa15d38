"""What every quantizer shares: the output type, the registry, the Quantizer base class, and codebooks with
blocked nearest-code search (their usage statistics live in usage.py and are re-exported here).

Conventions (see ../shared/docs/QUANTIZERS.md):
- input z is (B, N, dim); indices are (B, N, C) int64 with C codes per token; `codebook_sizes` lists the size of
  each of the C codebooks; `bits_per_token` = log2 of the effective vocabulary.
- all arithmetic runs in fp32 even under autocast; z_q comes back in the input's dtype.
- training-time side effects (EMA updates, usage tracking, k-means init, dead-code restarts) happen only when
  `self.training` is true, so validation and Lightning's sanity check never move a codebook.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokzoo.checks import positive_int, positive_number
from tokzoo.distributed import all_reduce_sum, broadcast_from_rank0, world_size  # noqa: F401  (re-exported)
from tokzoo.errors import ConfigError
from tokzoo.quantizers.usage import LazyStats, UsageTracker, entropy  # noqa: F401  (re-exported for the quantizers)
from tokzoo.registry import Registry

QUANTIZERS = Registry("quantizer")

# Upper bound on the (tokens x codes) score block of the nearest-code search: 2^24 floats = 64 MiB.
SEARCH_BLOCK_ELEMENTS = 1 << 24
UPDATE_CHOICES = ("grad", "ema")


@dataclass
class QuantizerOutput:
    z_q: Tensor  # (B, N, dim), straight-through to z
    indices: Tensor  # (B, N, C) int64
    loss: Tensor  # scalar
    stats: Mapping[str, Tensor] = field(default_factory=dict)  # computed when first read (LazyStats)


def round_ste(x: Tensor) -> Tensor:
    """Round with a straight-through (identity) gradient."""
    return x + (x.round() - x).detach()


def _restore_update_count(module: nn.Module, incompatible_keys: object) -> None:
    """Load hook: tracker.step (saved) counts the same updates, so a resumed run keeps the restart schedule."""
    module._updates = int(module.tracker.step)


def nearest_in_blocks(x: Tensor, codes: Tensor, cosine: bool, block_elements: int | None = None) -> Tensor:
    """x (M, n, c), codes (n, K, c) -> (M, n) int64: per codebook, argmax x.e (cosine, for unit vectors) or
    argmin ||x - e||^2, over token blocks of at most `block_elements` scores (default SEARCH_BLOCK_ELEMENTS, read
    at call time), so that memory stays bounded for any number of tokens."""
    n, k, _ = codes.shape
    # Euclidean: argmin ||e||^2 - 2 x.e (||x||^2 is the same for every code), as one matmul of [x, 1] with
    # [-2 e; ||e||^2]: adding the norms to the score block separately was one more pass over it (a quarter of the
    # search's time after the matmul and the reduction); the -2 is exact (a power of two).
    if cosine:
        rhs = codes.transpose(1, 2)  # (n, c, K)
    else:
        rhs = torch.cat([-2 * codes, codes.pow(2).sum(-1, keepdim=True)], dim=-1).transpose(1, 2)  # (n, c + 1, K)
    block = max(1, (SEARCH_BLOCK_ELEMENTS if block_elements is None else block_elements) // (n * k))
    out = torch.empty(x.shape[0], n, dtype=torch.long, device=x.device)
    # max(dim).indices, not argmax: the same first-best index, but torch's CPU argmax/argmin reduce about 2x slower
    # (4096 codes x 5440 rows, 1 thread: 55 ms vs 28 ms), and the reduction costs as much as the matmul here
    for start in range(0, x.shape[0], block):
        rows = x[start : start + block].transpose(0, 1)  # (n, b, c)
        if cosine:
            out[start : start + block] = torch.bmm(rows, rhs).max(-1).indices.T  # (n, b, K) scores
        else:
            rows = torch.cat([rows, rows.new_ones(*rows.shape[:2], 1)], dim=-1)
            out[start : start + block] = torch.bmm(rows, rhs).min(-1).indices.T
    return out


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
        positive_int("quantizer codebooks", num_codebooks=num_codebooks, codebook_size=codebook_size, code_dim=code_dim)
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
        return nearest_in_blocks(x, self.codes() if codes is None else codes, cosine=self.normalize)

    def lookup(self, indices: Tensor, codes: Tensor | None = None) -> Tensor:
        """indices (M, n) -> codes (M, n, c); differentiable w.r.t. the codebook."""
        codes = self.codes() if codes is None else codes
        n, k, c = codes.shape
        # index_select into the flattened books, not codes[arange, indices]: the backward of tensor indexing
        # accumulates repeated indices in a thread-dependent order on CPU (not bitwise reproducible), while
        # index_select's (index_add) adds them in order.
        flat = (indices + torch.arange(n, device=indices.device) * k).reshape(-1)
        return codes.reshape(n * k, c).index_select(0, flat).view(*indices.shape, c)

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
        flat, counts = self.tracker.record(indices)
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


def check_codebook_options(
    what: str, rotation_trick: object, entropy_weight: object, entropy_temperature: object
) -> None:
    """The rotation-trick and entropy options of the codebook quantizers (vq, mcq, rq)."""
    if not isinstance(rotation_trick, bool):
        raise ConfigError(f"{what}: rotation_trick={rotation_trick!r} must be true or false")
    if isinstance(entropy_weight, bool) or not isinstance(entropy_weight, (int, float)) or entropy_weight < 0:
        raise ConfigError(f"{what}: entropy_weight={entropy_weight!r} must be a number >= 0 (0 turns the term off)")
    positive_number(what, entropy_temperature=entropy_temperature)


@torch.no_grad()
def kmeans(x: Tensor, num_clusters: int, iters: int) -> Tensor:
    """Batched Lloyd k-means. x (M, n, c) -> centroids (n, K, c); seeds sampled with replacement when M < K."""
    m, n, c = x.shape
    xs = x.transpose(0, 1)  # (n, M, c)
    seeds = torch.randint(0, m, (n, num_clusters), device=x.device)
    centroids = xs.gather(1, seeds.unsqueeze(-1).expand(-1, -1, c)).clone()
    for _ in range(iters):
        dists = torch.cdist(xs, centroids)  # (n, M, K)
        assign = dists.min(-1).indices  # (n, M); as argmin, faster on CPU (see nearest_in_blocks)
        sums = torch.zeros_like(centroids).scatter_add_(1, assign.unsqueeze(-1).expand(-1, -1, c), xs)
        ones = torch.ones_like(assign, dtype=x.dtype)
        counts = torch.zeros(n, num_clusters, device=x.device).scatter_add_(1, assign, ones)
        centroids = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp_min(1).unsqueeze(-1), centroids)
    return centroids


class Quantizer(nn.Module):
    """Base class: shape checks and fp32 execution around `quantize`; subclasses set the attributes below.

    What the model asks a quantizer instead of testing its name: `continuous` (no vocabulary: the identity
    baseline), `codebook_parameters()` (kept out of weight decay) and `shape_label` (the vocabulary in plots).
    """

    name: str = ""
    continuous: bool = False  # True: no indices and no finite vocabulary (codebook_sizes is empty)
    dim: int
    codebook_sizes: list[int]
    # Tokens per sample the quantizer requires (msrq: its square grid), None for any count; the contract tests
    # feed this many when it is set.
    num_tokens: int | None = None

    @property
    def num_codes_per_token(self) -> int:
        return len(self.codebook_sizes)

    @property
    def bits_per_token(self) -> float:
        if self.continuous:
            return float("inf")
        return float(sum(math.log2(k) for k in self.codebook_sizes))

    @property
    def shape_label(self) -> str:
        """The vocabulary in a few characters: codes per token x codes per codebook ("4x256" for mcq, "3x16" for
        rq of depth 3, "1x16384" for vq, "2x200" for fsq of two [8, 5, 5] groups), "continuous 64-d" for none."""
        if self.continuous:
            return f"continuous {self.dim}-d"
        sizes = self.codebook_sizes
        if len(set(sizes)) == 1:
            return f"{len(sizes)}x{sizes[0]}"
        return "+".join(str(k) for k in sizes)

    def codebook_parameters(self) -> list[nn.Parameter]:
        """The learnable codebook tensors. Found here for codebooks held in CodebookSets (gradient-learned ones;
        EMA codebooks are buffers, not parameters); a quantizer with codebook tensors of its own overrides this."""
        return [
            book.embed
            for book in self.modules()
            if isinstance(book, CodebookSet) and isinstance(book.embed, nn.Parameter)
        ]

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
