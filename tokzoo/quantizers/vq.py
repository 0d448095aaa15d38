"""Single-codebook vector quantization: MCQ with num_codebooks=1, one codebook spanning the whole latent.

Defaults follow UniTok (cosine lookup on l2-normalised inputs and codes, codebook loss weight 1, commitment 0.25,
codebook learned by gradient). `normalize=False` gives the classic Euclidean VQ-VAE; `update="ema"` the
EMA-codebook variant (decay 0.99, Laplace-smoothed counts), which drops the codebook loss term.

`vq` takes every argument of `mcq` except num_codebooks (fixed to 1, and rejected if given), with its default
codebook_size of 16384. A subclass rather than a bare functools.partial so that instances are named "vq" (in
errors and repr) and the class still answers `continuous` etc. for the model.
"""

from __future__ import annotations

from functools import partial, partialmethod

from tokzoo.quantizers.base import QUANTIZERS
from tokzoo.quantizers.mcq import MultiCodebookQuantizer
from tokzoo.registry import signature_without


@QUANTIZERS.register("vq", example=dict(dim=8, codebook_size=16))
class VectorQuantizer(MultiCodebookQuantizer):
    name = "vq"
    __init__ = partialmethod(MultiCodebookQuantizer.__init__, num_codebooks=1, codebook_size=16384)
    # What Registry.build checks arguments against: mcq's with vq's default, less the fixed num_codebooks.
    __signature__ = signature_without(partial(MultiCodebookQuantizer, codebook_size=16384), "num_codebooks")
