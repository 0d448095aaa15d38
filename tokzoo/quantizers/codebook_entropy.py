"""Entropy regulariser for codebook quantizers (MAGVIT-v2's LFQ entropy loss, applied to a learned codebook).

For each codebook, soft assignments p_m = softmax(-||x_m - e_k||^2 / temperature) over its K codes (m = token):

    loss = mean_m H(p_m) - H(mean_m p_m)

averaged over the codebooks (mcq: one per channel chunk; rq: one term per depth). The first term sharpens each
token's assignment, the second spreads the batch over the codebook. Means over tokens, never sums, so the scale
does not change with the batch size. Under DDP the batch mean is this rank's (as lfq's).

Memory: the soft assignment is (M, n, K). It is computed in token blocks of at most SEARCH_BLOCK_ELEMENTS scores;
when a gradient is needed and there is more than one block, each block runs under activation checkpointing, so
what backward keeps is the block outputs ((n,) and (n, K) per block), not the (M, n, K) probabilities. The price
is one recomputation of each block in backward.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from tokzoo.quantizers.base import SEARCH_BLOCK_ELEMENTS  # the nearest-code search's block: 64 MiB of fp32 scores


def codebook_entropy_loss(x: Tensor, codes: Tensor, temperature: float) -> Tensor:
    """x (M, n, c) inputs as searched, codes (n, K, c) -> scalar mean_n [mean_m H(p_m) - H(mean_m p_m)]."""
    m, n, _ = x.shape
    k = codes.shape[1]
    block = max(1, SEARCH_BLOCK_ELEMENTS // (n * k))
    starts = range(0, m, block)
    recompute = len(starts) > 1 and torch.is_grad_enabled() and (x.requires_grad or codes.requires_grad)
    entropy_sum, prob_sum = x.new_zeros(n), x.new_zeros(n, k)
    for start in starts:
        xb = x[start : start + block]
        if recompute:
            h, p = checkpoint(_block_terms, xb, codes, temperature, use_reentrant=False)
        else:
            h, p = _block_terms(xb, codes, temperature)
        entropy_sum, prob_sum = entropy_sum + h, prob_sum + p
    per_token = entropy_sum / m  # (n,)
    mean_probs = prob_sum / m  # (n, K)
    batch = -(mean_probs * mean_probs.clamp_min(1e-12).log()).sum(-1)  # (n,)
    return (per_token - batch).mean()


def _block_terms(xb: Tensor, codes: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """xb (b, n, c) -> (sum over the block of per-token entropies (n,), sum of soft assignments (n, K))."""
    # -||x - e||^2 = 2 x.e - ||e||^2 - ||x||^2; ||x||^2 is the same for every code of a token: softmax drops it.
    logits = (2 * torch.einsum("bnc,nkc->bnk", xb, codes) - codes.pow(2).sum(-1)) / temperature  # (b, n, K)
    log_p = logits.log_softmax(-1)
    p = log_p.exp()
    return -(p * log_p).sum(-1).sum(0), p.sum(0)
