"""Binary spherical quantization (BSQ). Zhao, Xiong and Krahenbuhl 2024, "Image and Video Tokenization with Binary
Spherical Quantization" (arXiv 2406.07548); the quantizer of QLIP's unified tokenizer.

The `dim` channels are split into `num_codebooks` contiguous groups of b = dim / num_codebooks channels. Each group
is projected onto its unit sphere and binarised (paper Eq. 2-3):

    u = v / ||v||,        u_hat = sign(u) / sqrt(b),        z_q = u + sg(u_hat - u)   (straight-through from u),

so every code has norm 1 and the quantization error ||u - u_hat|| is bounded (the paper's case for BSQ over LFQ).
num_codebooks=1 is the paper's single sphere; more groups give C = num_codebooks codes per token, each its own
sphere. Index of a group = its b sign bits, FIRST channel the MOST significant bit (as in lfq):
index = sum_j [u_j > 0] * 2^(b - 1 - j). Bits per token = dim.

Entropy regulariser (paper Eq. 5-9), on the soft assignment over the 2^b corners c of a group,

    q(c | u) = softmax_c(-tau ||u - c||^2) = softmax_c(2 tau u.c)        (tau = inv_temperature),

    L_entropy = sample_entropy_weight * E_u[H(q(c | u))] - codebook_entropy_weight * H(E_u[q(c | u)]).

Because the corners are a product set, q(c | u) factorises exactly over the bits, q(c_j = +1 | u) =
sigmoid(4 tau u_j / sqrt(b)), so the per-sample entropy is computed exactly as a sum over the bits. The codebook
(batch) entropy does not factorise; it is approximated by splitting each group's b bits into sub-groups of
g = `entropy_group_bits` bits and summing the sub-groups' entropies of their batch-mean distributions over 2^g
corners (the paper's factorised form; an upper bound on the exact entropy, by subadditivity). g = 1 is the per-bit
form sum_j H(E_u[q(c_j | u)]) of the released b18 configs; g = b is exact. Entropies are in nats, summed over a
group's bits (sub-groups) and averaged over the num_codebooks groups. Cost O(M * dim * 2^g / g). Training only.

Commitment term (paper's beta): commitment_weight * E ||u - sg(u_hat)||^2, the squared distance per group.

Defaults follow the released BSQ-ViT configs: beta = 0 (no commitment: the sphere already bounds the error),
gamma_0 = gamma = zeta = 1 and inv_temperature = 1, with the whole quantizer loss weighted 0.1 (their
codebook_weight), hence the entropy weights 0.1 here (tokzoo's loss.quant_weight is 1). The released code also
divides the entropy term by inv_temperature; that is not done here (it is a rescaling of the two weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from tokzoo.checks import positive_int, positive_number
from tokzoo.errors import ConfigError
from tokzoo.quantizers.base import QUANTIZERS, Quantizer, QuantizerOutput, UsageTracker, entropy

# The usage tracker holds two counters per code: 2^20 codes per group are 12 MB.
MAX_INDEX_BITS = 20
# The codebook-entropy softmax runs over 2^g corners per sub-group and token.
MAX_ENTROPY_GROUP_BITS = 16


@QUANTIZERS.register("bsq", example=dict(dim=8, num_codebooks=2))
class BinarySphericalQuantizer(Quantizer):
    name = "bsq"

    def __init__(
        self,
        dim: int = 18,
        num_codebooks: int = 1,
        entropy_group_bits: int = 1,
        sample_entropy_weight: float = 0.1,
        codebook_entropy_weight: float = 0.1,
        commitment_weight: float = 0.0,
        inv_temperature: float = 1.0,
        stats_window: int = 100,
    ):
        super().__init__()
        positive_int(
            self.name,
            dim=dim,
            num_codebooks=num_codebooks,
            entropy_group_bits=entropy_group_bits,
            stats_window=stats_window,
        )
        positive_number(self.name, inv_temperature=inv_temperature)
        for key, value in dict(
            sample_entropy_weight=sample_entropy_weight,
            codebook_entropy_weight=codebook_entropy_weight,
            commitment_weight=commitment_weight,
        ).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{self.name}: {key}={value!r} must be a number >= 0 (0 turns the term off)")
        if dim % num_codebooks:
            raise ConfigError(
                f"{self.name}: dim={dim} (number of bits) is not divisible by num_codebooks={num_codebooks}; "
                f"choose num_codebooks dividing dim"
            )
        bits = dim // num_codebooks
        if bits > MAX_INDEX_BITS:
            raise ConfigError(
                f"{self.name}: {bits} bits per group means 2^{bits} codes per codebook to track; raise num_codebooks "
                f"so that dim / num_codebooks <= {MAX_INDEX_BITS}"
            )
        if bits % entropy_group_bits or entropy_group_bits > MAX_ENTROPY_GROUP_BITS:
            raise ConfigError(
                f"{self.name}: entropy_group_bits={entropy_group_bits} must divide the {bits} bits of a group and be "
                f"<= {MAX_ENTROPY_GROUP_BITS}; choose 1 (per-bit) or another divisor of dim / num_codebooks"
            )
        self.dim, self.num_codebooks, self.group_bits = dim, num_codebooks, bits
        self.entropy_group_bits = entropy_group_bits
        self.codebook_sizes = [2**bits] * num_codebooks
        self.sample_entropy_weight, self.codebook_entropy_weight = sample_entropy_weight, codebook_entropy_weight
        self.commitment_weight, self.inv_temperature = commitment_weight, inv_temperature
        self.scale = bits**-0.5  # code entries are +-1/sqrt(b): unit norm per group
        self.register_buffer("powers", 2 ** torch.arange(bits - 1, -1, -1), persistent=False)  # MSB first
        # The 2^g corners of one entropy sub-group as +-1 rows, in index order (MSB first).
        sub_powers = 2 ** torch.arange(entropy_group_bits - 1, -1, -1)
        corners = (torch.arange(2**entropy_group_bits).unsqueeze(-1) // sub_powers) % 2
        self.register_buffer("corner_signs", corners.float() * 2 - 1, persistent=False)
        self.tracker = UsageTracker(num_codebooks, 2**bits, stats_window)

    def quantize(self, z: Tensor) -> QuantizerOutput:
        # z: (B, N, dim) fp32 -> u: (B*N, G, b) on the unit sphere of each group
        b = z.shape[0]
        u = F.normalize(rearrange(z, "b t (g j) -> (b t) g j", g=self.num_codebooks), dim=-1)
        positive = u > 0
        u_hat = torch.where(positive, self.scale, -self.scale)
        indices = (positive.long() * self.powers).sum(-1)  # (M, G)

        loss = self.commitment_weight * (u - u_hat).pow(2).sum(-1).mean()
        if self.training and (self.sample_entropy_weight > 0 or self.codebook_entropy_weight > 0):
            sample, codebook = self.entropy_terms(u)
            loss = loss + self.sample_entropy_weight * sample - self.codebook_entropy_weight * codebook
        if self.training:
            self.tracker.record(indices)

        u_q = u + (u_hat - u).detach()
        return QuantizerOutput(
            z_q=rearrange(u_q, "(b t) g j -> b t (g j)", b=b),
            indices=rearrange(indices, "(b t) g -> b t g", b=b),
            loss=loss,
            stats=self.tracker.stats(),
        )

    def entropy_terms(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """(per-sample entropy, factorised codebook entropy), each averaged over the groups; u: (M, G, b) unit rows.

        Per sub-group of g bits: logits 2 tau u.c over its 2^g corners c (entries +-1/sqrt(b)). Summed over the
        sub-groups, the per-token entropies are exactly H(q(c | u)) over all 2^b corners; the batch-mean entropies
        are the factorised approximation of H(E_u[q(c | u)]).
        """
        sub = rearrange(u, "m g (s k) -> m g s k", k=self.entropy_group_bits)
        logits = torch.einsum("mgsk,ck->mgsc", sub, self.corner_signs) * (2 * self.inv_temperature * self.scale)
        probs = logits.softmax(-1)  # (M, G, S, 2^g)
        sample = entropy(probs).sum(-1).mean(0)  # (G,)
        codebook = entropy(probs.mean(0)).sum(-1)  # (G,)
        return sample.mean(), codebook.mean()

    def decode(self, indices: Tensor) -> Tensor:
        # indices: (B, N, G) -> (B, N, dim)
        bits = (indices.unsqueeze(-1) // self.powers) % 2
        return rearrange((bits.float() * 2 - 1) * self.scale, "b t g j -> b t (g j)")
