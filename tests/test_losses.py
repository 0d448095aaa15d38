"""Losses.

Run as a script (`python tests/test_losses.py OUT_DIR PORT`) it is the 2-rank gloo worker of the DDP test.
"""

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.hub
import torch.nn.functional as F
from conftest import run_two_rank_script
from torch import nn

from tokzoo.errors import TokzooError
from tokzoo.losses import (
    ContrastiveLoss,
    PatchDiscriminator,
    PerceptualLoss,
    PixelLoss,
    adaptive_gan_weight,
    hinge_d_loss,
    hinge_g_loss,
)
from tokzoo.weights import weights_available

DDP_BATCH, DDP_DIM, DDP_WORLD = 4, 8, 2


def _ddp_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(DDP_WORLD * DDP_BATCH, DDP_DIM, generator=g), dim=-1)
    txt = F.normalize(img + 0.5 * torch.randn(DDP_WORLD * DDP_BATCH, DDP_DIM, generator=g), dim=-1)
    return img, txt


def test_pixel_loss_matches_manual():
    g = torch.Generator().manual_seed(0)
    recon, target = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    diff = recon - target
    expected = 0.2 * diff.abs().mean() + 1.0 * (diff**2).mean()
    assert torch.allclose(PixelLoss()(recon, target), expected)
    assert torch.allclose(PixelLoss(l1_weight=1.0, l2_weight=0.0)(recon, target), diff.abs().mean())
    assert PixelLoss()(target, target).item() == 0.0


def test_hinge_losses_known_values():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - x) = 0, 0.5, 2 -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + x) = 0, 1, 2  -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert hinge_g_loss(fake).item() == pytest.approx(1 / 3)
    # a perfect discriminator (margins met) has zero loss
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0.0


def test_adaptive_gan_weight_is_ratio_of_grad_norms():
    torch.manual_seed(0)
    last = nn.Linear(3, 2)
    x = torch.randn(5, 3)
    out = last(x)
    nll = (out - 1.0).pow(2).mean()
    g_loss = -out[:, 0].mean() * 3.0
    g_nll = torch.autograd.grad(nll, last.weight, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last.weight, retain_graph=True)[0]
    expected = g_nll.norm() / (g_gan.norm() + 1e-4)
    w = adaptive_gan_weight(nll, g_loss, last.weight)
    assert w.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not w.requires_grad
    assert adaptive_gan_weight(nll, g_loss * 1e-9, last.weight, max_weight=10.0).item() == 10.0
    (nll + w * g_loss).backward()  # the graph is still usable afterwards
    with torch.no_grad():
        out = last(x)
        assert adaptive_gan_weight(out.mean(), out.sum(), last.weight).item() == 0.0


@pytest.mark.parametrize("norm", ["batch", "spectral"])
def test_patch_discriminator_shapes_and_grad(norm):
    disc = PatchDiscriminator(in_channels=3, base_channels=8, num_layers=3, norm=norm)
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    logits = disc(x)
    assert logits.shape == (2, 1, 6, 6)  # 64 -> 32 -> 16 -> 8 -> 7 -> 6
    hinge_g_loss(logits).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert disc(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)


def _manual_clip_loss(img, txt, scale):
    logits = scale * img @ txt.t()
    labels = torch.arange(img.shape[0])
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def test_contrastive_loss_aligned_shuffled_symmetric_and_grad():
    loss_fn = ContrastiveLoss()
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(8, 32), dim=-1)
    aligned = loss_fn(emb, emb, torch.tensor(100.0))
    assert aligned.item() < 1e-3
    shuffled = loss_fn(emb, emb[torch.randperm(8)], torch.tensor(100.0))
    assert shuffled.item() > 1.0

    img = F.normalize(torch.randn(8, 32), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(8, 32), dim=-1).requires_grad_()
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    loss = loss_fn(img, txt, log_scale.exp())
    assert torch.allclose(loss, loss_fn(txt, img, log_scale.exp()))  # symmetric in its two towers
    assert torch.allclose(loss, _manual_clip_loss(img, txt, log_scale.exp()))
    loss.backward()
    for t in (img, txt, log_scale):
        assert t.grad is not None and t.grad.abs().sum() > 0


def test_perceptual_loss_without_weights_raises_and_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("TOKZOO_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", None)

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(TokzooError, match="vgg16-397923af.pth"):
        PerceptualLoss()


@pytest.mark.skipif(not weights_available("lpips_vgg")[0], reason="VGG16 weights for LPIPS are not on this machine")
def test_perceptual_loss_with_weights():
    loss_fn = PerceptualLoss()
    loss_fn.train()
    assert not loss_fn.training and not any(p.requires_grad for p in loss_fn.parameters())
    assert len(loss_fn.state_dict()) == 0  # the frozen net stays out of checkpoints
    torch.manual_seed(0)
    target = torch.rand(2, 3, 64, 64) * 2 - 1
    recon = (target + 0.3 * torch.randn_like(target)).requires_grad_()
    assert loss_fn(target, target).item() == pytest.approx(0.0, abs=1e-6)
    loss = loss_fn(recon, target)
    assert loss.item() > 0
    loss.backward()
    assert recon.grad.abs().sum() > 0


@pytest.mark.ddp
def test_contrastive_loss_ddp_gathers_with_gradients(tmp_path):
    proc = run_two_rank_script(__file__, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    img, txt = _ddp_data()
    img.requires_grad_()
    txt.requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    full = ContrastiveLoss()(img, txt, scale)  # not distributed here: one process, the concatenated batch
    full.backward()

    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(DDP_WORLD)]
    # the mean of the per-rank losses is the loss of the global batch
    assert torch.allclose(torch.stack([r["loss"] for r in results]).mean(), full.detach(), atol=1e-6)
    for rank, res in enumerate(results):
        rows = slice(rank * DDP_BATCH, (rank + 1) * DDP_BATCH)
        # all_gather's backward sums every rank's gradient into the local slice: world x d(global loss)/dx,
        # which DDP's averaging over ranks turns back into the global gradient of shared parameters
        assert torch.allclose(res["img_grad"], DDP_WORLD * img.grad[rows], atol=1e-6)
        assert torch.allclose(res["txt_grad"], DDP_WORLD * txt.grad[rows], atol=1e-6)
    assert torch.allclose(torch.stack([r["scale_grad"] for r in results]).mean(), scale.grad, atol=1e-6)


def _ddp_worker(rank: int, out_dir: str, port: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=DDP_WORLD)
    try:
        loss_fn = ContrastiveLoss()  # built like a model component: before it knows about ranks
        img, txt = _ddp_data()
        rows = slice(rank * DDP_BATCH, (rank + 1) * DDP_BATCH)
        img, txt = img[rows].clone().requires_grad_(), txt[rows].clone().requires_grad_()
        scale = torch.tensor(10.0, requires_grad=True)
        loss = loss_fn(img, txt, scale)
        loss.backward()
        torch.save(
            {"loss": loss.detach(), "img_grad": img.grad, "txt_grad": txt.grad, "scale_grad": scale.grad},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    # fork: the workers inherit the imported torch instead of importing it again (seconds on small machines)
    method = "fork" if sys.platform == "linux" else "spawn"
    mp.start_processes(_ddp_worker, args=(sys.argv[1], int(sys.argv[2])), nprocs=DDP_WORLD, start_method=method)
