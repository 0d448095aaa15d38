"""Single-codebook vector quantization: the MCQ machinery with one codebook spanning the whole latent.

Defaults follow UniTok (cosine lookup on l2-normalised inputs and codes, codebook loss weight 1, commitment 0.25,
codebook learned by gradient). `normalize=False` gives the classic Euclidean VQ-VAE; `update="ema"` the
EMA-codebook variant (decay 0.99, Laplace-smoothed counts), which drops the codebook loss term.
"""

from __future__ import annotations

from tokzoo.quantizers.base import QUANTIZERS
from tokzoo.quantizers.mcq import MultiCodebookQuantizer


@QUANTIZERS.register("vq")
class VectorQuantizer(MultiCodebookQuantizer):
    name = "vq"

    def __init__(
        self,
        dim: int = 64,
        codebook_size: int = 16384,
        normalize: bool = True,
        update: str = "grad",
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        ema_decay: float = 0.99,
        kmeans_init: bool = False,
        restart_dead_after: int = 0,
        stats_window: int = 100,
    ):
        super().__init__(
            dim=dim,
            num_codebooks=1,
            codebook_size=codebook_size,
            normalize=normalize,
            update=update,
            commitment_weight=commitment_weight,
            codebook_weight=codebook_weight,
            ema_decay=ema_decay,
            kmeans_init=kmeans_init,
            restart_dead_after=restart_dead_after,
            stats_window=stats_window,
        )
