"""CLIP's symmetric InfoNCE, with features gathered across ranks (with gradients) under DDP, and optionally with
identical captions of the global batch as positives of each other (class-template captions repeat within a batch)."""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokzoo.distributed import gather_rows, gather_with_grad, rank_world

DUPLICATE_MODES = ("positive", "negative")  # loss.contra_duplicates: identical captions are positives / negatives


def caption_ids(captions: list[str], device: torch.device) -> Tensor:
    """A stable 63-bit id per caption string (identical captions share one), so they can be gathered across ranks."""
    digest = lambda c: int.from_bytes(hashlib.blake2b(c.encode(), digest_size=8).digest(), "little") >> 1
    return torch.tensor([digest(c) for c in captions], dtype=torch.int64, device=device)


def caption_matches(ids: Tensor) -> Tensor:
    """(B,) this rank's caption ids -> (B, world * B) bool: column j of the global batch has row i's caption.

    The ids are gathered without gradient in rank order, the same order gather_with_grad gives the features, so
    column j here is column j of the logits. Each row matches its own column at least.
    """
    return ids[:, None] == gather_rows(ids)[None, :]


class ContrastiveLoss(nn.Module):
    """loss = (CE(s * I T^T, targets) + CE(s * T I^T, targets)) / 2 over the global batch.

    Each rank scores its own B rows against all world * B columns (labels offset by rank * B), so the mean
    of the per-rank losses equals the loss of the concatenated batch, and DDP's gradient averaging then
    yields the gradient of that global loss. Every rank must pass the same batch size: the train loaders
    guarantee it (drop_last, equal per-rank epochs, unreadable samples replaced rather than dropped: tokzoo.data),
    and training_step has no path that skips a step on one rank alone.

    targets: one-hot on the row's own pair, or, given `positives` (caption_matches), uniform over every column
    whose caption equals the row's (multi-positive InfoNCE), in both directions: the match is symmetric.
    """

    def forward(
        self, image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float, positives: Tensor | None = None
    ) -> Tensor:
        # image_emb, text_emb: (B, D) l2-normalised; logit_scale: scalar, exp()-ed and clamped;
        # positives: (B, world * B) bool including each row's own column, or None -> scalar
        image_emb, text_emb = image_emb.float(), text_emb.float()
        rank, _ = rank_world()  # asked per call: the loss is built before Lightning starts the process group
        all_image, all_text = gather_with_grad(image_emb), gather_with_grad(text_emb)  # identity on one rank
        logits_per_image = logit_scale * image_emb @ all_text.t()  # (B, world * B)
        logits_per_text = logit_scale * text_emb @ all_image.t()  # (B, world * B)
        batch = image_emb.shape[0]
        if positives is not None and positives.shape != logits_per_image.shape:
            shape = tuple(logits_per_image.shape)
            raise ValueError(f"positives {tuple(positives.shape)} must be (B, world * B) = {shape}")
        # One match per row (its own) is the one-hot case: the hard-label path keeps today's loss bit for bit.
        # The count costs one host sync, as the finiteness check of the loss does anyway.
        if positives is None or int(positives.sum()) == batch:
            labels = torch.arange(batch, device=image_emb.device) + rank * batch
        else:
            labels = positives.float()
            labels = labels / labels.sum(dim=1, keepdim=True)  # soft targets: CE(p, q) = -sum q log softmax(p)
        return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))
