"""The training objective: supervision recon | contra | both, each term kept separately for logging.

    recon   = pixel (l1_weight * L1 + l2_weight * L2) + lpips_weight * LPIPS [+ adaptive GAN term]
    total   = [recon] + quant_weight * quantizer loss + [contra_weight * contrastive] [+ discriminator loss]

The discriminator shares the single optimizer: the generator's GAN term is computed through a *detached copy*
of the discriminator's parameters and the discriminator's hinge loss on detached reconstructions, so each term
only reaches the parameters it should, with one backward and DDP-friendly (every parameter used every step).
With loss.recon_batch_fraction f < 1 the recon terms see the first ceil(f * B) images of the batch (the model
decodes only those), the quantizer and contrastive terms all B.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.func import functional_call

from tokzoo.errors import ConfigError
from tokzoo.losses.contrastive import DUPLICATE_MODES, ContrastiveLoss, caption_matches
from tokzoo.losses.gan import PatchDiscriminator, adaptive_gan_weight, hinge_d_loss, hinge_g_loss
from tokzoo.losses.reconstruction import PerceptualLoss, PixelLoss
from tokzoo.weights import weights_available


class ModelOutput(Protocol):
    """What the objective reads from the tokenizer's forward (tokzoo.model.TokenizerOutput has these fields)."""

    recon: Tensor | None  # (B, 3, H, W)
    quant: Any  # has .loss: the quantizer's scalar loss
    image_emb: Tensor | None  # (B, D) l2-normalised
    text_emb: Tensor | None  # (B, D) l2-normalised
    logit_scale: Tensor | None  # scalar
    decoder_last_weight: Tensor | None  # the decoder's last layer weight (adaptive GAN weight)


class TokenizerObjective(nn.Module):
    def __init__(self, loss_cfg: dict[str, Any], max_steps: int, lpips: bool = True):
        super().__init__()
        self.cfg = dict(loss_cfg)
        self.supervision = loss_cfg["supervision"]
        self.use_recon = self.supervision in ("recon", "both")
        self.use_contra = self.supervision in ("contra", "both")
        self.pixel = PixelLoss(loss_cfg["l1_weight"], loss_cfg["l2_weight"])
        self.contrastive = ContrastiveLoss()
        self.duplicates = loss_cfg.get("contra_duplicates", "positive")  # identical captions: positives or negatives
        if self.duplicates not in DUPLICATE_MODES:
            raise ConfigError(f"loss.contra_duplicates is {self.duplicates!r}; allowed: {', '.join(DUPLICATE_MODES)}")
        self.perceptual = None
        self.absent: dict[str, str] = {}  # loss terms that cannot run here, with the reason
        if self.use_recon and lpips and loss_cfg["lpips_weight"] > 0:
            ok, reason = weights_available("lpips_vgg")
            if ok:
                self.perceptual = PerceptualLoss()
            else:
                self.absent["loss_lpips"] = reason
        self.recon_fraction = float(loss_cfg.get("recon_batch_fraction", 1.0))  # (0, 1]: checked by config
        self.discriminator = PatchDiscriminator() if self.use_recon and loss_cfg["gan_weight"] > 0 else None
        self.gan_start_step = int(loss_cfg["gan_start"] * max_steps)

    def recon_rows(self, batch_size: int) -> int | None:
        """How many images of a training batch the decoder sees (None: all of them)."""
        if not self.use_recon or self.recon_fraction >= 1:
            return None
        return max(1, math.ceil(self.recon_fraction * batch_size))

    def reconstruction_terms(self, out: ModelOutput, images: Tensor, step: int) -> dict[str, Tensor]:
        images = images[: out.recon.shape[0]]  # the decoded sub-batch (loss.recon_batch_fraction)
        terms = {"loss_pixel": self.pixel(out.recon, images)}
        nll = terms["loss_pixel"]
        if self.perceptual is not None:
            terms["loss_lpips"] = self.perceptual(out.recon, images)
            nll = nll + self.cfg["lpips_weight"] * terms["loss_lpips"]
        recon = nll
        if self.discriminator is not None:
            active = float(step >= self.gan_start_step)
            frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
            g_loss = hinge_g_loss(functional_call(self.discriminator, frozen, (out.recon,)))
            weight = adaptive_gan_weight(nll, g_loss, out.decoder_last_weight) * self.cfg["gan_weight"]
            terms["loss_gan"] = g_loss
            recon = recon + active * weight * g_loss
            d_loss = hinge_d_loss(self.discriminator(images), self.discriminator(out.recon.detach()))
            terms["loss_disc"] = d_loss
            terms["_disc_total"] = active * d_loss
        terms["loss_recon"] = recon
        return terms

    def forward(
        self, out: ModelOutput, images: Tensor, step: int, caption_ids: Tensor | None = None
    ) -> dict[str, Tensor]:
        """caption_ids: (B,) int64, equal for identical captions (contrastive.caption_ids); None treats every
        pair as distinct (the plain one-hot InfoNCE)."""
        terms: dict[str, Tensor] = {"loss_quant": out.quant.loss}
        total = self.cfg["quant_weight"] * out.quant.loss
        if self.use_recon:
            terms.update(self.reconstruction_terms(out, images, step))
            total = total + terms["loss_recon"] + terms.pop("_disc_total", 0.0)
        if self.use_contra:
            positives = None
            if caption_ids is not None:
                matches = caption_matches(caption_ids)
                # logged in both modes: how many duplicates there were (1.0 = none)
                terms["contra_positives_per_row"] = matches.sum(dim=1).float().mean()
                positives = matches if self.duplicates == "positive" else None
            terms["loss_contra"] = self.contrastive(out.image_emb, out.text_emb, out.logit_scale, positives)
            total = total + self.cfg["contra_weight"] * terms["loss_contra"]
        terms["loss"] = total
        return terms


def gradient_conflict(loss_a: Tensor, loss_b: Tensor, params: list[nn.Parameter]) -> dict[str, Tensor]:
    """Cosine similarity and norms of the gradients of two losses on shared parameters (graph retained)."""
    grads_a = torch.autograd.grad(loss_a, params, retain_graph=True, allow_unused=True)
    grads_b = torch.autograd.grad(loss_b, params, retain_graph=True, allow_unused=True)
    pairs = [(a, b) for a, b in zip(grads_a, grads_b) if a is not None and b is not None]
    flat_a = torch.cat([a.reshape(-1) for a, _ in pairs])
    flat_b = torch.cat([b.reshape(-1) for _, b in pairs])
    norm_a, norm_b = flat_a.norm(), flat_b.norm()
    return {
        "grad_cos_recon_contra": (flat_a @ flat_b) / (norm_a * norm_b).clamp_min(1e-12),
        "grad_norm_recon": norm_a,
        "grad_norm_contra": norm_b,
    }
