"""Multi-scale residual quantization (VAR; Tian et al. 2024, "Visual Autoregressive Modeling: Scalable Image
Generation via Next-Scale Prediction"): the tokenizer behind next-scale prediction.

The (B, N, dim) tokens are read as their square h x h grid f (h = sqrt(N), row-major). For the scales
s_1 < ... < s_L = h, one codebook Z shared by all scales, residual f_0 = sg(f) and f_hat_0 = 0 (VAR's Algorithm 1):

    r_l     = nearest code of each cell of area_down(f_{l-1}, s_l x s_l)
    z_l     = phi(bicubic_up(Z[r_l], h x h))                 (no resize at s_L = h)
    f_l     = f_{l-1} - z_l,     f_hat_l = f_hat_{l-1} + z_l

z_q = f_hat_L, straight-through to z. phi(x) = (1 - phi_ratio) x + phi_ratio conv3x3(x): ONE 3x3 convolution
dim -> dim shared by all scales, blended with the identity (VAR's quant_resi, ratio 0.5; VAR keeps a few such convs,
each shared by neighbouring scales, one is enough here). It can undo some of the upsampling's blur; phi_ratio=0
drops it.
Bicubic upsampling (align_corners=False) as VAR; area (cell-mean) downsampling.

Loss, as VAR's, averaged over the scales:
    mean_l [commitment_weight ||z - sg(f_hat_l)||^2 + codebook_weight ||f_hat_l - sg(z)||^2].
The codebook term is what trains Z and phi: the straight-through sends the decoder's gradient to z only. phi is
part of the code-to-vector map that decode reads, so codebook_parameters() returns it with Z (no weight decay).

normalize=False (default, VAR's): Euclidean search on raw vectors. normalize=True (VAR's using_znorm): cosine search,
cells and codes l2-normalised for the search only; the looked-up code stays raw, since the residual shrinks from
scale to scale and unit-norm codes could not follow it.

Indices: what a token is. A token is one position of the final h x h grid, as for every quantizer here, and indices
are (B, N, L): indices[b, p, l] is the scale-l code of the s_l x s_l cell covering position p, i.e. each scale's
code map nearest-upsampled to h x h (row i lies in cell floor(i s_l / h), integer arithmetic). decode reads each
cell's code back at one position the cell covers (row ceil(j h / s_l)) and replays the sum, so decode(indices)
equals z_q exactly in eval mode. `scale_maps(indices)` gives the L maps (B, s_l, s_l): the sum(s_l^2) codes per
image that a next-scale model predicts.

Bits: codebook_sizes = [K] * L (one code per scale at every position, as (B, N, C) indices require), so the
reported bits_per_token is L log2 K, the contract's sum of log2 codebook_sizes. It over-counts the information,
since coarse codes repeat over their cells: the true count is sum(s_l^2) log2 K bits per image (`bits_per_image`),
sum(s_l^2) / N log2 K per position ([1, 2, 4, 8]: 85/64 log2 K against the reported 4 log2 K, 3x more). Compare
msrq with the other quantizers by bits_per_image / N, not by bits_per_token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from tokzoo.checks import is_int, positive_int
from tokzoo.errors import ConfigError
from tokzoo.quantizers.base import QUANTIZERS, CodebookSet, Quantizer, QuantizerOutput


def check_scales(scales: object) -> tuple[int, ...]:
    """scales: a strictly increasing, non-empty list of positive integers (the last is the grid side)."""
    ok = isinstance(scales, (list, tuple)) and len(scales) > 0 and all(is_int(s) and s >= 1 for s in scales)
    if not ok or any(a >= b for a, b in zip(scales[:-1], scales[1:])):
        raise ConfigError(
            f"msrq: scales={scales!r} must be a strictly increasing list of positive integers ending at the side "
            f"of the token grid, e.g. [1, 2, 4, 8] for an 8x8 grid (64 tokens)"
        )
    return tuple(scales)


def powers_up_to(side: int) -> list[int]:
    """[1, 2, 4, ..., side]: the suggested scales for a side x side grid (side itself last, power of two or not)."""
    out = [2**i for i in range(side.bit_length()) if 2**i < side]
    return out + [side]


@QUANTIZERS.register("msrq", example=dict(dim=8, codebook_size=16, scales=[1, 2]))
class MultiScaleResidualQuantizer(Quantizer):
    name = "msrq"

    def __init__(
        self,
        dim: int = 32,
        codebook_size: int = 4096,
        scales: Sequence[int] = (1, 2, 4, 8),
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        normalize: bool = False,
        phi_ratio: float = 0.5,
        stats_window: int = 100,
    ):
        super().__init__()
        positive_int(self.name, dim=dim, codebook_size=codebook_size)
        self.scales = check_scales(scales)
        if isinstance(phi_ratio, bool) or not isinstance(phi_ratio, (int, float)) or not 0 <= phi_ratio <= 1:
            raise ConfigError(f"msrq: phi_ratio={phi_ratio!r} must lie in [0, 1] (0: no refining convolution)")
        self.dim, self.side = dim, self.scales[-1]
        self.num_tokens = self.side**2
        self.codebook_sizes = [codebook_size] * len(self.scales)
        self.commitment_weight, self.codebook_weight = commitment_weight, codebook_weight
        self.normalize, self.phi_ratio = normalize, float(phi_ratio)
        # Raw codes (normalize only changes the search, see the module docstring), learned by the codebook loss.
        self.codebook = CodebookSet(1, codebook_size, dim, normalize=False, stats_window=stats_window)
        self.phi = nn.Conv2d(dim, dim, kernel_size=3, padding=1) if phi_ratio > 0 else None
        self._upsamplers: dict[tuple, Tensor] = {}  # scale, device, dtype -> bicubic upsampling matrix

    @property
    def bits_per_image(self) -> float:
        """The information of one image's codes: sum(s_l^2) log2 K (bits_per_token over-counts, see above)."""
        return sum(s * s for s in self.scales) * math.log2(self.codebook_sizes[0])

    def codebook_parameters(self) -> list[nn.Parameter]:
        phi = [] if self.phi is None else list(self.phi.parameters())
        return [self.codebook.embed, *phi]

    def _check_grid(self, n: int) -> None:
        if n == self.num_tokens:
            return
        side = math.isqrt(n)
        fix = (
            f"set scales to end at {side}, e.g. {powers_up_to(side)}"
            if side * side == n
            else "msrq needs a square token grid: use an encoder whose token count is a square"
        )
        raise ConfigError(
            f"msrq: scales={list(self.scales)} end at {self.side}, which needs a {self.side}x{self.side} grid "
            f"({self.num_tokens} tokens), but the input has N={n} tokens; {fix}"
        )

    def _upsampler(self, s: int, like: Tensor) -> Tensor:
        """The bicubic s x s -> h x h upsampling as an (s^2, h^2) matrix: F.interpolate of each basis image. The
        resize is linear, so grid @ this matrix is the same resize (up to float summation order), and its backward is
        one small matmul instead of the bicubic kernel's scatter (measured: the upsampling's backward was 8% of a
        step). Built once per scale, device and dtype."""
        key = (s, like.device, like.dtype)
        if key not in self._upsamplers:
            basis = torch.eye(s * s, device=like.device, dtype=like.dtype).view(s * s, 1, s, s)
            up = F.interpolate(basis, size=(self.side, self.side), mode="bicubic", align_corners=False)
            self._upsamplers[key] = up.view(s * s, self.side * self.side)
        return self._upsamplers[key]

    def _expand(self, e: Tensor, b: int, s: int) -> Tensor:
        """One scale's looked-up codes e (B*s*s, 1, dim) -> its contribution z_l (B, dim, h, h)."""
        if s < self.side:
            cells = rearrange(e, "(b p) 1 c -> b c p", b=b, p=s * s)
            grid = (cells @ self._upsampler(s, e)).view(b, self.dim, self.side, self.side)
        else:
            grid = rearrange(e, "(b h w) 1 c -> b c h w", b=b, h=s, w=s)
        if self.phi is not None:
            grid = (1 - self.phi_ratio) * grid + self.phi_ratio * self.phi(grid)
        return grid

    def quantize(self, z: Tensor) -> QuantizerOutput:
        # z: (B, N, dim) fp32 -> grid f: (B, dim, h, h); per scale l: cells (B*s_l^2, 1, dim), codes (B*s_l^2, 1)
        b, n, _ = z.shape
        self._check_grid(n)
        f = rearrange(z, "b (h w) c -> b c h w", h=self.side, w=self.side)
        codes = self.codebook.codes()  # (1, K, dim)
        search_codes = F.normalize(codes, dim=-1) if self.normalize else codes
        residual, f_hat = f.detach(), torch.zeros_like(f)
        losses, searched, picked, maps = [], [], [], []
        for s in self.scales:
            cells = F.interpolate(residual, size=(s, s), mode="area") if s < self.side else residual
            x = rearrange(cells, "b c h w -> (b h w) 1 c")
            if self.normalize:
                x = F.normalize(x, dim=-1)
            idx = self.codebook.nearest(x, search_codes)  # (B*s*s, 1)
            z_l = self._expand(self.codebook.lookup(idx, codes), b, s)
            f_hat = f_hat + z_l
            residual = residual - z_l.detach()
            commitment = (f - f_hat.detach()).pow(2).mean()
            codebook_term = (f_hat - f.detach()).pow(2).mean()
            losses.append(self.commitment_weight * commitment + self.codebook_weight * codebook_term)
            searched.append(x)
            picked.append(idx)
            maps.append(rearrange(idx, "(b h w) 1 -> b h w", b=b, h=s, w=s))
        self.codebook.update(torch.cat(searched), torch.cat(picked))  # all sum(s^2) codes per image, once

        # Straight-through written so that the value is f_hat bit for bit (f - sg(f) is exactly 0): decode matches.
        z_q = f_hat.detach() + (f - f.detach())
        return QuantizerOutput(
            z_q=rearrange(z_q, "b c h w -> b (h w) c"),
            indices=self._spread(maps),
            loss=torch.stack(losses).mean(),
            stats=self.codebook.tracker.stats(),
        )

    def _spread(self, maps: list[Tensor]) -> Tensor:
        """Per-scale code maps [(B, s, s)] -> indices (B, N, L): each map nearest-upsampled to the h x h grid."""
        per_scale = []
        for s, m in zip(self.scales, maps):
            cell = torch.arange(self.side, device=m.device) * s // self.side  # row (or column) -> its cell
            per_scale.append(m[:, cell][:, :, cell])  # (B, h, h)
        return rearrange(torch.stack(per_scale, dim=-1), "b h w l -> b (h w) l")

    def scale_maps(self, indices: Tensor) -> list[Tensor]:
        """indices (B, N, L) -> the L code maps (B, s_l, s_l), each cell read at one position it covers."""
        self._check_grid(indices.shape[1])
        grid = rearrange(indices, "b (h w) l -> b l h w", h=self.side, w=self.side)
        out = []
        for level, s in enumerate(self.scales):
            # the first row of cell j: ceil(j h / s); it lies in cell j since h >= s
            first = (torch.arange(s, device=indices.device) * self.side + s - 1) // s
            out.append(grid[:, level][:, first][:, :, first])
        return out

    def decode(self, indices: Tensor) -> Tensor:
        # indices: (B, N, L) -> (B, N, dim), replaying the sum of the scales as quantize does
        b = indices.shape[0]
        codes = self.codebook.codes()
        f_hat = torch.zeros(b, self.dim, self.side, self.side, device=indices.device, dtype=codes.dtype)
        for s, m in zip(self.scales, self.scale_maps(indices)):
            f_hat = f_hat + self._expand(self.codebook.lookup(rearrange(m, "b h w -> (b h w) 1"), codes), b, s)
        return rearrange(f_hat, "b c h w -> b (h w) c")
