"""Reconstruction losses: weighted L1 + L2 on pixels, and LPIPS(VGG) as the perceptual term."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from tokzoo.errors import TokzooError
from tokzoo.weights import exclude_from_checkpoint, hub_weights, weights_available


class PixelLoss(nn.Module):
    """l1_weight * mean|x - y| + l2_weight * mean (x - y)^2 (UniTok's code: 0.2 L1 + 1.0 L2)."""

    def __init__(self, l1_weight: float = 0.2, l2_weight: float = 1.0):
        super().__init__()
        self.l1_weight = l1_weight
        self.l2_weight = l2_weight

    def forward(self, recon: Tensor, target: Tensor) -> Tensor:
        # recon, target: (B, 3, H, W) in [-1, 1] -> scalar
        recon, target = recon.float(), target.float()
        loss = recon.new_zeros(())
        if self.l1_weight:
            loss = loss + self.l1_weight * F.l1_loss(recon, target)
        if self.l2_weight:
            loss = loss + self.l2_weight * F.mse_loss(recon, target)
        return loss


class PerceptualLoss(nn.Module):
    """LPIPS with the VGG16 trunk (lpips package, v0.1 linear heads), frozen and always in eval mode.

    Never downloads: raises TokzooError naming the missing file when the VGG weights are not on disk
    (see tokzoo.weights). The frozen net is kept out of checkpoints; it is rebuilt from the weight file.
    """

    def __init__(self) -> None:
        super().__init__()
        ok, reason = weights_available("lpips_vgg")
        if not ok:
            raise TokzooError(f"PerceptualLoss needs LPIPS weights. {reason}")
        import lpips

        with hub_weights("lpips_vgg"):
            self.lpips = lpips.LPIPS(net="vgg", verbose=False)
        self.lpips.requires_grad_(False)
        self.lpips.eval()
        exclude_from_checkpoint(self)

    def train(self, mode: bool = True) -> PerceptualLoss:
        # a frozen metric network: dropout/batch statistics must never switch to training behaviour
        return super().train(False)

    def forward(self, recon: Tensor, target: Tensor) -> Tensor:
        # recon, target: (B, 3, H, W) in [-1, 1] -> scalar (mean LPIPS distance over the batch)
        return self.lpips(recon.float(), target.float(), normalize=False).mean()
