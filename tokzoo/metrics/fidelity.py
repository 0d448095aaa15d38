"""Reconstruction fidelity over a validation set: PSNR, SSIM, LPIPS(VGG) and rFID (torchmetrics).

Conventions: images arrive in [-1, 1]; both sides are clamped to [-1, 1] and mapped to [0, 1] for PSNR/SSIM
(data_range=1.0, which gives the same numbers as data_range=2.0 on [-1, 1]). PSNR is computed per image and
averaged (so one exact reconstruction makes it inf), in a MeanMetric: PeakSignalNoiseRatio(dim=...) keeps list
states that fail to sync when a DDP rank scored no image (unpadded validation can leave one without a batch).
LPIPS gets the clamped [-1, 1] images; rFID gets [0, 1] images (normalize=True: torchmetrics converts them to
uint8; the Inception resizes to 299).
A metric whose weights are missing is not computed and not reported: ``absent`` says why.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.functional.image import peak_signal_noise_ratio
from torchmetrics.image import StructuralSimilarityIndexMeasure

from tokzoo.distributed import all_reduce_sum
from tokzoo.weights import exclude_from_checkpoint, hub_weights, require_weights, weights_available


class FidelityMetrics(nn.Module):
    """update(recon, target) per batch, compute() -> {"psnr", "ssim"[, "lpips"][, "rfid"]} as floats, reset().

    An nn.Module of torchmetrics Metrics: moves with .to(device), and each metric all-reduces its states
    across ranks in compute(), so every rank must call compute(). The pretrained nets stay out of
    checkpoints.
    """

    def __init__(self, lpips: bool = True, rfid: bool = True):
        super().__init__()
        self.psnr = MeanMetric()  # of per-image PSNRs
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.lpips: nn.Module | None = None
        self.rfid: nn.Module | None = None
        self.absent: dict[str, str] = {}  # metric -> why it is not in compute()'s result
        if lpips:
            ok, reason = weights_available("lpips_vgg")
            if ok:
                from torchmetrics.image import LearnedPerceptualImagePatchSimilarity

                with hub_weights("lpips_vgg"):
                    self.lpips = LearnedPerceptualImagePatchSimilarity(net_type="vgg", normalize=False)
            else:
                self.absent["lpips"] = reason
        if rfid:
            ok, reason = weights_available("inception_fid")
            if ok:
                from torchmetrics.image.fid import FrechetInceptionDistance

                with hub_weights("inception_fid"):
                    self.rfid = FrechetInceptionDistance(
                        feature=2048,
                        normalize=True,
                        reset_real_features=True,
                        feature_extractor_weights_path=str(require_weights("inception_fid")),
                    )
            else:
                self.absent["rfid"] = reason
        exclude_from_checkpoint(self)

    @torch.no_grad()
    def update(self, recon: Tensor, target: Tensor) -> None:
        # recon, target: (B, 3, H, W), nominally [-1, 1]; recon may overshoot and is clamped
        recon = recon.detach().float().clamp(-1.0, 1.0)
        target = target.detach().float().clamp(-1.0, 1.0)
        recon01, target01 = (recon + 1.0) / 2.0, (target + 1.0) / 2.0
        per_image = peak_signal_noise_ratio(recon01, target01, data_range=1.0, reduction="none", dim=(1, 2, 3))
        self.psnr.update(per_image)
        self.ssim.update(recon01, target01)
        if self.lpips is not None:
            self.lpips.update(recon, target)
        if self.rfid is not None:
            self.rfid.update(target01, real=True)
            self.rfid.update(recon01, real=False)

    def compute(self) -> dict[str, float]:
        out = {"psnr": float(self.psnr.compute()), "ssim": float(self.ssim.compute())}
        if self.lpips is not None:
            out["lpips"] = float(self.lpips.compute())
        if self.rfid is not None:
            # summed over ranks before FID's compute, so every rank takes the same branch (compute is a collective)
            n = int(all_reduce_sum(self.rfid.fake_features_num_samples.detach().clone()))
            if n < 2:
                self.absent["rfid"] = f"rFID needs at least 2 images, the validation set gave {n}"
            else:
                self.absent.pop("rfid", None)
                out["rfid"] = float(self.rfid.compute())
        return out

    def reset(self) -> None:
        for metric in (self.psnr, self.ssim, self.lpips, self.rfid):
            if metric is not None:
                metric.reset()
