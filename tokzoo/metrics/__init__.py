"""Validation metrics: fidelity (PSNR, SSIM, LPIPS, rFID), semantics (zero-shot, retrieval, linear probe), codebooks."""

from tokzoo.metrics.codebook import CodebookUsage
from tokzoo.metrics.fidelity import FidelityMetrics
from tokzoo.metrics.semantics import linear_probe_accuracy, retrieval_recall_at_1, zero_shot_accuracy

__all__ = ["CodebookUsage", "FidelityMetrics", "linear_probe_accuracy", "retrieval_recall_at_1", "zero_shot_accuracy"]
