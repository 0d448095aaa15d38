"""Losses: pixel + perceptual + GAN reconstruction terms, and CLIP's contrastive loss."""

from tokzoo.losses.contrastive import ContrastiveLoss, caption_ids, caption_matches
from tokzoo.losses.gan import PatchDiscriminator, adaptive_gan_weight, hinge_d_loss, hinge_g_loss
from tokzoo.losses.reconstruction import PerceptualLoss, PixelLoss

__all__ = [
    "ContrastiveLoss",
    "PatchDiscriminator",
    "PerceptualLoss",
    "PixelLoss",
    "adaptive_gan_weight",
    "caption_ids",
    "caption_matches",
    "hinge_d_loss",
    "hinge_g_loss",
]
