"""Quantizers behind one registry: build_quantizer("mcq", dim=64, num_codebooks=8, codebook_size=4096)."""

from tokzoo.quantizers import fsq, lfq, mcq, none, rq, vq  # noqa: F401  (registers each quantizer)
from tokzoo.quantizers.base import QUANTIZERS, Quantizer, QuantizerOutput, build_quantizer, list_quantizers

__all__ = ["QUANTIZERS", "Quantizer", "QuantizerOutput", "build_quantizer", "list_quantizers"]
