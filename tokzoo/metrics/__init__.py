"""Validation metrics: fidelity (PSNR, SSIM, LPIPS, rFID), semantics (zero-shot, retrieval, linear probe), codebooks,
token-space diagnostics."""

from tokzoo.metrics.codebook import CodebookUsage
from tokzoo.metrics.fidelity import FidelityMetrics
from tokzoo.metrics.semantics import linear_probe_accuracy, retrieval_recall_at_1, zero_shot_accuracy
from tokzoo.metrics.tokens import TokenDiagnostics, noise_at_psnr

__all__ = [
    "CodebookUsage", "FidelityMetrics", "TokenDiagnostics", "linear_probe_accuracy", "noise_at_psnr",
    "retrieval_recall_at_1", "zero_shot_accuracy",
]  # fmt: skip
