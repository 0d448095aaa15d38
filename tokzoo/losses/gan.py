"""Adversarial reconstruction term: PatchGAN discriminator, hinge losses, VQGAN's adaptive weight."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from tokzoo.errors import ConfigError


class PatchDiscriminator(nn.Module):
    """PatchGAN: strided 4x4 convs, channels doubling up to 8x base, one logit per overlapping patch.

    norm="batch" is the VQGAN recipe; norm="spectral" avoids batch statistics (real and fake batches are
    usually passed separately, and under DDP BatchNorm statistics stay per rank).
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        num_layers: int = 3,
        norm: Literal["batch", "spectral"] = "batch",
    ):
        super().__init__()
        if norm not in ("batch", "spectral"):
            raise ConfigError(f"discriminator norm '{norm}' is unknown; allowed: batch, spectral")
        if num_layers < 1:
            raise ConfigError(f"discriminator num_layers must be >= 1, got {num_layers}")

        def conv(c_in: int, c_out: int, stride: int, bias: bool) -> nn.Module:
            layer = nn.Conv2d(c_in, c_out, kernel_size=4, stride=stride, padding=1, bias=bias)
            return spectral_norm(layer) if norm == "spectral" else layer

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            if norm == "batch":  # the norm supplies the bias
                return [conv(c_in, c_out, stride, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
            return [conv(c_in, c_out, stride, bias=True), nn.LeakyReLU(0.2)]

        layers: list[nn.Module] = [conv(in_channels, base_channels, 2, bias=True), nn.LeakyReLU(0.2)]
        c_out = base_channels
        for i in range(1, num_layers + 1):
            c_in, c_out = c_out, base_channels * min(2**i, 8)
            # the last block keeps the resolution (stride 1), as in pix2pix's 70x70 PatchGAN
            layers += block(c_in, c_out, stride=2 if i < num_layers else 1)
        layers.append(conv(c_out, 1, 1, bias=True))
        self.net = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C, H, W) -> logits (B, 1, H', W'), H' ~ H / 2^num_layers - 2
        return self.net(x)


def _init_weights(m: nn.Module) -> None:
    # DCGAN-style init, as used by pix2pix / VQGAN discriminators
    if isinstance(m, nn.Conv2d):
        weight = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
        nn.init.normal_(weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 * (mean relu(1 - D(real)) + mean relu(1 + D(fake)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """-mean D(fake)."""
    return -logits_fake.mean()


def adaptive_gan_weight(nll_loss: Tensor, g_loss: Tensor, last_layer_weight: Tensor, max_weight: float = 1e4) -> Tensor:
    """VQGAN's balance ||d nll / d w_last|| / (||d g_loss / d w_last|| + 1e-4), clamped to [0, max_weight].

    Detached.

    The caller multiplies it by its discriminator weight (UniTok: 0.4). Returns 0 when no graph is available
    (validation under no_grad / inference_mode), where the GAN term is only logged.
    """
    if not (torch.is_grad_enabled() and nll_loss.requires_grad and g_loss.requires_grad):
        return torch.zeros((), device=nll_loss.device)
    nll_grad = torch.autograd.grad(nll_loss, last_layer_weight, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)[0]
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
