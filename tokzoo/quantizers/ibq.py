"""Index backpropagation quantization (IBQ). Shi, Luo, Ge, Yang, Shan and Wang 2024, "Taming Scalable Visual
Tokenizer for Autoregressive Image Generation" (arXiv 2412.02692).

Logits are dot products with the K codes (paper Eq. 3-5), and the one-hot index is made differentiable by a
straight-through estimator on the categorical distribution:

    l = z C^T,   p = softmax(l / temperature),   h = onehot(argmax l),   z_q = (h - sg(p) + p) C,

so the forward value is z_q = C[argmax l] while the backward pass reaches EVERY code (through p and through the
logits) and the encoder (through the logits only: there is no identity path from z_q to z). Note the search is by
dot product, not distance: a code with a large norm wins more often.

Loss, the paper's double quantization loss (the released code's three terms), with e = C[argmax l]:

    double_quant_weight * ||z_q - z||^2 + commitment_weight * ||sg(e) - z||^2 + codebook_weight * ||e - sg(z)||^2

with weights 1, 1 and beta = 0.25 (the taming-VQGAN convention the paper inherits: beta sits on the CODEBOOK term,
the reverse of vq/mcq's commitment 0.25). The first term trains z and C through the soft path as well.
Optional MAGVIT-v2 entropy penalty on softmax(l / entropy_temperature): entropy_weight * (mean_n H(p_n) -
H(mean_n p_n)); off by default, as in the released IBQ class (use_entropy_loss=False, entropy temperature 0.01).

Memory: p is an (M, K) matrix, M tokens by K codes, O(M K): written naively (logits, softmax and one-hot kept for
backward) that is 3 x 16 GiB at 65,536 x 65,536. Nothing of that size is kept here: the forward pass finds the
argmax in token blocks, and the backward pass recomputes each block's softmax from z and C (the exact gradient, not
an approximation). Peak extra memory is about three blocks of BLOCK_ELEMENTS floats (3 x 64 MiB) plus the (K, d)
gradient of C, whatever M is; the price is recomputing z C^T in backward. The entropy penalty is blocked the same way.
Codes start as N(0, 1/d) rows (unit expected norm, as the other tokzoo codebooks), not taming's U(-1/K, 1/K).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from tokzoo.checks import positive_int, positive_number
from tokzoo.quantizers.base import QUANTIZERS, SEARCH_BLOCK_ELEMENTS, Quantizer, QuantizerOutput, UsageTracker
from tokzoo.quantizers.simvq import blocked_search

BLOCK_ELEMENTS = SEARCH_BLOCK_ELEMENTS  # (tokens x codes) per softmax block; tests lower it to exercise the loop


def _block_size(k: int) -> int:
    return max(1, BLOCK_ELEMENTS // k)


def _softmax_backward(p: Tensor, dp: Tensor, tau_inv: float) -> Tensor:
    """dL/dlogits of p = softmax(logits * tau_inv) from dL/dp, both (b, K); overwrites dp (no (b, K) temporaries)."""
    dot = torch.bmm(p.unsqueeze(1), dp.unsqueeze(2)).squeeze(2)  # (b, 1): sum_k p_k dp_k
    return dp.sub_(dot).mul_(p).mul_(tau_inv)


def _logit_backward(x: Tensor, codes: Tensor, d_logits: Tensor, dz: Tensor, dc: Tensor, start: int) -> None:
    """Accumulate the gradients of l = x C^T from d_logits (b, K) into dz[start:] and dc."""
    dz[start : start + x.shape[0]] += d_logits @ codes
    dc.addmm_(d_logits.T, x)


class IndexBackprop(torch.autograd.Function):
    """(x (M, d), codes (K, d), 1/temperature) -> (z_q (M, d), indices (M,)) with z_q = (h - sg(p) + p) C."""

    @staticmethod
    def forward(ctx, x: Tensor, codes: Tensor, inv_temperature: float) -> tuple[Tensor, Tensor]:
        indices = blocked_search(x, codes, "dot", BLOCK_ELEMENTS)
        ctx.save_for_backward(x, codes, indices)
        ctx.inv_temperature = inv_temperature
        ctx.mark_non_differentiable(indices)
        return codes[indices], indices

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor, _unused: Tensor) -> tuple[Tensor, Tensor, None]:
        x, codes, indices = ctx.saved_tensors
        tau_inv = ctx.inv_temperature
        dz, dc = torch.zeros_like(x), torch.zeros_like(codes)
        dc.index_add_(0, indices, grad)  # the one-hot factor: h^T grad
        step = _block_size(codes.shape[0])
        for start in range(0, x.shape[0], step):
            xb, gb = x[start : start + step], grad[start : start + step]
            p = torch.softmax((xb @ codes.T).mul_(tau_inv), dim=-1)  # (b, K)
            gp = gb @ codes.T  # dL/dp = grad C^T
            _logit_backward(xb, codes, _softmax_backward(p, gp, tau_inv), dz, dc, start)
        return dz, dc, None


class BlockedEntropy(torch.autograd.Function):
    """(x (M, d), codes (K, d), 1/temperature) -> (mean_n H(p_n), H(mean_n p_n)), p = softmax(x C^T / t)."""

    @staticmethod
    def forward(ctx, x: Tensor, codes: Tensor, inv_temperature: float) -> tuple[Tensor, Tensor]:
        m, k = x.shape[0], codes.shape[0]
        prob_sum, token_entropy = x.new_zeros(k), x.new_zeros(())
        step = _block_size(k)
        for start in range(0, m, step):
            log_p = torch.log_softmax((x[start : start + step] @ codes.T).mul_(inv_temperature), dim=-1)
            p = log_p.exp()
            prob_sum += p.sum(0)
            token_entropy -= torch.dot(p.reshape(-1), log_p.reshape(-1))  # sum p log p, no (b, K) temporary
        mean_p = prob_sum / m
        ctx.save_for_backward(x, codes, mean_p)
        ctx.inv_temperature = inv_temperature
        batch_entropy = -(mean_p * mean_p.clamp_min(1e-12).log()).sum()
        return token_entropy / m, batch_entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, g_token: Tensor, g_batch: Tensor) -> tuple[Tensor, Tensor, None]:
        x, codes, mean_p = ctx.saved_tensors
        tau_inv, m = ctx.inv_temperature, x.shape[0]
        dz, dc = torch.zeros_like(x), torch.zeros_like(codes)
        # d/dp_n of H(mean p) is -(log mean_p + 1) / M for every token
        batch_term = -g_batch * (mean_p.clamp_min(1e-12).log() + 1) / m  # (K,)
        step = _block_size(codes.shape[0])
        for start in range(0, m, step):
            xb = x[start : start + step]
            log_p = torch.log_softmax((xb @ codes.T).mul_(tau_inv), dim=-1)
            p = log_p.exp()
            dp = log_p.add_(1).mul_(-g_token / m).add_(batch_term)  # dL/dp (b, K), in log_p's storage
            _logit_backward(xb, codes, _softmax_backward(p, dp, tau_inv), dz, dc, start)
        return dz, dc, None


@QUANTIZERS.register("ibq", example=dict(dim=8, codebook_size=16))
class IndexBackpropQuantizer(Quantizer):
    name = "ibq"

    def __init__(
        self,
        dim: int = 64,
        codebook_size: int = 16384,
        temperature: float = 1.0,
        double_quant_weight: float = 1.0,
        commitment_weight: float = 1.0,
        codebook_weight: float = 0.25,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 0.01,
        stats_window: int = 100,
    ):
        super().__init__()
        positive_int(self.name, dim=dim, codebook_size=codebook_size, stats_window=stats_window)
        positive_number(self.name, temperature=temperature, entropy_temperature=entropy_temperature)
        self.dim = dim
        self.codebook_sizes = [codebook_size]
        self.temperature, self.entropy_temperature = temperature, entropy_temperature
        self.double_quant_weight, self.commitment_weight = double_quant_weight, commitment_weight
        self.codebook_weight, self.entropy_weight = codebook_weight, entropy_weight
        self.codebook = nn.Parameter(torch.randn(codebook_size, dim) * dim**-0.5)
        self.tracker = UsageTracker(1, codebook_size, stats_window)

    def codebook_parameters(self) -> list[nn.Parameter]:
        return [self.codebook]

    def quantize(self, z: Tensor) -> QuantizerOutput:
        # z: (B, N, d) fp32 -> x: (B*N, d); z_q (B*N, d), indices (B*N,)
        b = z.shape[0]
        x = rearrange(z, "b t c -> (b t) c")
        codes = self.codebook.float()
        x_q, indices = IndexBackprop.apply(x, codes, 1.0 / self.temperature)
        e = codes[indices]  # the hard code, for the two VQ terms

        loss = self.double_quant_weight * (x_q - x).pow(2).mean()
        loss = loss + self.commitment_weight * (x - e.detach()).pow(2).mean()
        loss = loss + self.codebook_weight * (e - x.detach()).pow(2).mean()
        if self.training and self.entropy_weight > 0:
            token_entropy, batch_entropy = BlockedEntropy.apply(x, codes, 1.0 / self.entropy_temperature)
            loss = loss + self.entropy_weight * (token_entropy - batch_entropy)
        if self.training:
            self.tracker.record(indices.unsqueeze(-1))

        return QuantizerOutput(
            z_q=rearrange(x_q, "(b t) c -> b t c", b=b),
            indices=rearrange(indices, "(b t) -> b t 1", b=b),
            loss=loss,
            stats=self.tracker.stats(),
        )

    def decode(self, indices: Tensor) -> Tensor:
        # indices: (B, N, 1) -> (B, N, d)
        return self.codebook.float()[indices[..., 0]]
