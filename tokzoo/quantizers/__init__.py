"""Quantizers behind one registry: build_quantizer("mcq", dim=64, num_codebooks=8, codebook_size=4096)."""

from tokzoo.quantizers import bsq, fsq, ibq, lfq, mcq, msrq, none, rq, simvq, vq  # noqa: F401  (registers each quantizer)
from tokzoo.quantizers.base import QUANTIZERS, Quantizer, QuantizerOutput, build_quantizer, list_quantizers

__all__ = ["QUANTIZERS", "Quantizer", "QuantizerOutput", "build_quantizer", "list_quantizers"]
