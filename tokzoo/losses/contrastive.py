"""CLIP's symmetric InfoNCE, with features gathered across ranks (with gradients) under DDP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokzoo.distributed import gather_with_grad, rank_world


class ContrastiveLoss(nn.Module):
    """loss = (CE(s * I T^T, labels) + CE(s * T I^T, labels)) / 2 over the global batch.

    Each rank scores its own B rows against all world * B columns (labels offset by rank * B), so the mean
    of the per-rank losses equals the loss of the concatenated batch, and DDP's gradient averaging then
    yields the gradient of that global loss. Every rank must pass the same batch size (drop_last / equal
    shards).
    """

    def forward(self, image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float) -> Tensor:
        # image_emb, text_emb: (B, D) l2-normalised; logit_scale: scalar, exp()-ed and clamped -> scalar
        image_emb, text_emb = image_emb.float(), text_emb.float()
        rank, _ = rank_world()  # asked per call: the loss is built before Lightning starts the process group
        all_image, all_text = gather_with_grad(image_emb), gather_with_grad(text_emb)  # identity on one rank
        logits_per_image = logit_scale * image_emb @ all_text.t()  # (B, world * B)
        logits_per_text = logit_scale * text_emb @ all_image.t()  # (B, world * B)
        labels = torch.arange(image_emb.shape[0], device=image_emb.device) + rank * image_emb.shape[0]
        return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))
