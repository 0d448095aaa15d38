"""Token-space diagnostics: how independent a token's codes are, how much they say about the class, how stable
they are under invisible noise.

    code_mutual_information(codes, sizes)   mean over pairs (i < j) of I(code_i; code_j) in bits, bias-corrected
    code_class_nmi(codes, labels, sizes)    mean over sub-codebooks of NMI(code_c; class), arithmetic-mean normalised
    code_stability(codes, noisy_codes)      fraction of codes unchanged
    noise_at_psnr(images, psnr_db, g)       Gaussian noise at a given PSNR for images in [-1, 1]

`codes` is (M, C): one row per token, one column per sub-codebook / group / depth. Plug-in mutual information of
two K-valued variables over M samples is biased upwards by about (K_i - 1)(K_j - 1) / (2 M ln 2) bits, which is
large for big codebooks; the correction subtracts the plug-in MI of the same pair with one column shuffled (same
marginals, no dependence), so independent codes give about 0 and identical uniform codes about log2 K.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def _entropy_bits(counts: Tensor) -> Tensor:
    p = counts[counts > 0].double() / counts.sum()
    return -(p * p.log2()).sum()


def _plugin_mi_bits(a: Tensor, b: Tensor, size_b: int) -> Tensor:
    """Plug-in I(a; b) in bits from the joint histogram: a dense bincount while the joint table is small, else
    only the occupied cells (unique: M log M, for large codebooks)."""
    key = a * size_b + b
    cells = (int(a.max()) + 1) * size_b if a.numel() else 0
    joint = torch.bincount(key, minlength=cells) if cells <= 1 << 22 else torch.unique(key, return_counts=True)[1]
    return _entropy_bits(torch.bincount(a)) + _entropy_bits(torch.bincount(b)) - _entropy_bits(joint)


def code_mutual_information(codes: Tensor, sizes: Sequence[int], seed: int = 0) -> float:
    """Mean bias-corrected mutual information (bits) between every pair of a token's codes. codes: (M, C), C >= 2."""
    codes = codes.long().cpu()
    c = codes.shape[1]
    if c < 2:
        raise ValueError(f"mutual information needs at least 2 codes per token, got {c}")
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for i in range(c):
        for j in range(i + 1, c):
            a, b = codes[:, i], codes[:, j]
            shuffled = b[torch.randperm(b.numel(), generator=g)]
            total += float(_plugin_mi_bits(a, b, sizes[j]) - _plugin_mi_bits(a, shuffled, sizes[j]))
    return total / (c * (c - 1) / 2)


def code_class_nmi(codes: Tensor, labels: Tensor, sizes: Sequence[int]) -> float:
    """Mean over sub-codebooks of I(code; class) / ((H(code) + H(class)) / 2). codes: (M, C); labels: (M,) >= 0."""
    codes, labels = codes.long().cpu(), labels.long().cpu()
    h_class = _entropy_bits(torch.bincount(labels))
    out = []
    for col in range(codes.shape[1]):
        code = codes[:, col]
        h_code = _entropy_bits(torch.bincount(code))
        mi = _plugin_mi_bits(labels, code, sizes[col])
        denom = (h_code + h_class) / 2
        out.append(float(mi / denom) if denom > 0 else 0.0)
    return sum(out) / len(out)


def code_stability(codes: Tensor, noisy_codes: Tensor) -> float:
    """Fraction of (token, sub-codebook) codes that are the same in both encodings; any equal shapes."""
    if codes.shape != noisy_codes.shape:
        raise ValueError(f"code shapes differ: {tuple(codes.shape)} vs {tuple(noisy_codes.shape)}")
    return float((codes == noisy_codes).double().mean()) if codes.numel() else math.nan


def noise_at_psnr(images: Tensor, psnr_db: float, generator: torch.Generator | None = None) -> Tensor:
    """images in [-1, 1] (peak-to-peak 2) plus Gaussian noise whose MSE gives `psnr_db`: sigma = 2 / 10^(psnr/20)."""
    sigma = 2.0 / 10 ** (psnr_db / 20)
    noise = torch.randn(images.shape, generator=generator, dtype=torch.float32).to(images.device, images.dtype)
    return images + sigma * noise


class TokenDiagnostics:
    """Accumulates a validation pass's codes and computes the three diagnostics over every rank's share.

    update(indices, labels, noisy_indices=None): indices (B, N, C); labels (B,) (-1: unlabelled); noisy_indices
    (b, N, C) for the first b <= B images of the batch encoded with noise. At most `max_tokens` tokens per rank are
    kept for the mutual-information measures (memory stays bounded on large validation sets).
    compute() -> {"code_mi_bits" (C >= 2), "code_class_nmi" (all labelled), "code_stability" (noisy codes seen)}.
    """

    def __init__(self, codebook_sizes: Sequence[int], max_tokens: int = 1 << 18):
        self.sizes = [int(s) for s in codebook_sizes]
        self.max_tokens = max_tokens
        self.reset()

    def reset(self) -> None:
        self.codes: list[Tensor] = []
        self.labels: list[Tensor] = []
        self.kept = 0
        self.same = self.total = self.noisy_images = 0

    def update(self, indices: Tensor, labels: Tensor, noisy_indices: Tensor | None = None) -> None:
        b, n, c = indices.shape
        room = max(0, (self.max_tokens - self.kept) // max(n, 1))
        if room:
            keep = indices[:room].detach()
            self.codes.append(keep.reshape(-1, c).to(torch.int32).cpu())
            self.labels.append(labels[:room].detach().long().cpu().repeat_interleave(n))
            self.kept += keep.shape[0] * n
        if noisy_indices is not None:
            clean = indices[: noisy_indices.shape[0]]
            self.same += int((clean == noisy_indices).sum())
            self.total += clean.numel()
            self.noisy_images += noisy_indices.shape[0]

    def compute(self) -> dict[str, float]:
        from tokzoo.distributed import gather_rows

        out: dict[str, float] = {}
        c = len(self.sizes)
        codes = torch.cat(self.codes) if self.codes else torch.zeros(0, c, dtype=torch.int32)
        labels = torch.cat(self.labels) if self.labels else torch.zeros(0, dtype=torch.long)
        codes, labels = gather_rows(codes), gather_rows(labels)
        counts = gather_rows(torch.tensor([[self.same, self.total]], dtype=torch.long)).sum(0)
        if codes.shape[0] >= 2 and c >= 2:
            out["code_mi_bits"] = code_mutual_information(codes, self.sizes)
        if labels.numel() >= 2 and bool((labels >= 0).all()):
            out["code_class_nmi"] = code_class_nmi(codes, labels, self.sizes)
        if int(counts[1]) > 0:
            out["code_stability"] = int(counts[0]) / int(counts[1])
        return out
