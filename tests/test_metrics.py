"""Metrics.

Run as a script (`python tests/test_metrics.py OUT_DIR PORT`) it is the 2-rank gloo worker of the DDP test.
"""

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.hub
from conftest import run_two_rank_script
from torch import nn

from tokzoo.metrics import (
    CodebookUsage,
    FidelityMetrics,
    linear_probe_accuracy,
    retrieval_recall_at_1,
    zero_shot_accuracy,
)
from tokzoo.weights import weights_available

WORLD = 2


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("TOKZOO_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", None)

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path


def _images(seed: int, n: int = 4, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


# ---------------------------------------------------------------- fidelity


def test_fidelity_identical_vs_noisy(empty_home):
    fm = FidelityMetrics(lpips=False, rfid=False)
    assert isinstance(fm, nn.Module) and fm.absent == {}
    target = _images(0)
    fm.update(target, target)
    same = fm.compute()
    assert set(same) == {"psnr", "ssim"}
    assert same["psnr"] == math.inf or same["psnr"] > 60
    assert same["ssim"] == pytest.approx(1.0, abs=1e-4)

    fm.reset()
    noisy = target + 0.2 * torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    fm.update(noisy, target)
    worse = fm.compute()
    assert worse["psnr"] < 30 and worse["ssim"] < 0.95
    # per-image PSNR on [0, 1] (same as data_range 2 on [-1, 1]) over the clamped reconstruction
    mse = ((noisy.clamp(-1, 1) - target) / 2).pow(2).flatten(1).mean(1)
    assert worse["psnr"] == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), rel=1e-4)

    fm.reset()
    fm.update(noisy + 0.3 * torch.randn_like(noisy), target)
    assert fm.compute()["psnr"] < worse["psnr"]


def test_fidelity_accumulates_over_batches(empty_home):
    target = _images(0, n=6)
    recon = target + 0.1 * torch.randn(target.shape, generator=torch.Generator().manual_seed(2))
    whole, split = FidelityMetrics(lpips=False, rfid=False), FidelityMetrics(lpips=False, rfid=False)
    whole.update(recon, target)
    split.update(recon[:2], target[:2])
    split.update(recon[2:], target[2:])
    a, b = whole.compute(), split.compute()
    assert a["psnr"] == pytest.approx(b["psnr"], rel=1e-5) and a["ssim"] == pytest.approx(b["ssim"], rel=1e-5)


def test_fidelity_absent_metrics_have_reasons_and_are_not_reported(empty_home):
    fm = FidelityMetrics(lpips=True, rfid=True)
    assert set(fm.absent) == {"lpips", "rfid"}
    checkpoints = str(empty_home / "torch" / "hub" / "checkpoints")
    assert "vgg16-397923af.pth" in fm.absent["lpips"] and checkpoints in fm.absent["lpips"]
    assert "inception" in fm.absent["rfid"].lower() and checkpoints in fm.absent["rfid"]
    assert "tokzoo weights --download" in fm.absent["rfid"]
    fm.update(_images(0), _images(1))
    out = fm.compute()
    assert set(out) == {"psnr", "ssim"}  # never 0 or NaN placeholders
    assert len(fm.state_dict()) == 0  # nothing of the metric nets goes into checkpoints


@pytest.mark.skipif(
    not (weights_available("lpips_vgg")[0] and weights_available("inception_fid")[0]),
    reason="LPIPS VGG16 / FID Inception weights are not on this machine",
)
def test_fidelity_with_weights_reports_lpips_and_rfid():
    fm = FidelityMetrics()
    target = _images(0, n=4, size=64)
    fm.update(target[:1], target[:1])
    out = fm.compute()
    assert "rfid" not in out and "2 images" in fm.absent["rfid"]
    fm.reset()
    fm.update(target, target)
    out = fm.compute()
    assert out["lpips"] == pytest.approx(0.0, abs=1e-5) and "rfid" in out and "rfid" not in fm.absent


# ---------------------------------------------------------------- codebook


def _handmade_indices() -> torch.Tensor:
    # codebook 0 (size 4): codes 0,0,1,1 -> usage 2/4, perplexity 2, dead 2/4
    # codebook 1 (size 8): codes 0,1,2,3 -> usage 4/8, perplexity 4, dead 4/8
    return torch.tensor([[[0, 0], [0, 1]], [[1, 2], [1, 3]]])  # (B=2, N=2, C=2)


def test_codebook_usage_known_values():
    cu = CodebookUsage(codebook_sizes=[4, 8])
    idx = _handmade_indices()
    cu.update(idx[:1])
    cu.update(idx[1:])  # the histogram spans updates
    out = cu.compute()
    assert out["codebook_usage/0"] == pytest.approx(0.5) and out["codebook_usage/1"] == pytest.approx(0.5)
    assert out["perplexity/0"] == pytest.approx(2.0) and out["perplexity/1"] == pytest.approx(4.0)
    assert out["dead_codes/0"] == pytest.approx(0.5) and out["dead_codes/1"] == pytest.approx(0.5)
    assert out["codebook_usage"] == pytest.approx(0.5)
    assert out["perplexity"] == pytest.approx(3.0)
    assert out["dead_codes"] == pytest.approx(0.5)
    cu.reset()
    cu.update(torch.zeros(3, 5, 2, dtype=torch.long))  # collapse onto code 0
    out = cu.compute()
    assert out["perplexity/1"] == pytest.approx(1.0) and out["codebook_usage/1"] == pytest.approx(1 / 8)


def test_codebook_dead_after_steps():
    cu = CodebookUsage(codebook_sizes=[4], dead_after_steps=2)
    for codes in ([0, 1], [2], [2]):  # code 0/1 last seen 2 updates ago, code 3 never
        cu.update(torch.tensor(codes).view(1, -1, 1))
    out = cu.compute()
    assert out["dead_codes"] == pytest.approx(3 / 4)  # 0, 1 (stale) and 3 (never hit)
    assert out["codebook_usage"] == pytest.approx(3 / 4)  # usage still counts the whole window


def test_codebook_usage_large_codebooks_and_bad_input():
    sizes = [2**16] * 8
    cu = CodebookUsage(codebook_sizes=sizes)
    g = torch.Generator().manual_seed(0)
    cu.update(torch.randint(0, 2**16, (4, 256, 8), generator=g))
    out = cu.compute()
    hits = 4 * 256
    assert 0 < out["codebook_usage"] <= hits / 2**16
    assert out["dead_codes"] == pytest.approx(1 - out["codebook_usage"])
    with pytest.raises(ValueError, match="sub-codebooks"):
        cu.update(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="out of range"):
        CodebookUsage([4]).update(torch.tensor([[[4]]]))


# ---------------------------------------------------------------- semantics


def test_zero_shot_accuracy_on_constructed_embeddings():
    g = torch.Generator().manual_seed(0)
    classes = torch.randn(5, 16, generator=g)
    labels = torch.arange(20) % 5
    images = 3.0 * classes[labels] + 0.1 * torch.randn(20, 16, generator=g)  # unnormalised on purpose
    assert zero_shot_accuracy(images, labels, classes) == 1.0
    assert zero_shot_accuracy(images, (labels + 1) % 5, classes) == 0.0
    half = labels.clone()
    half[:10] = (half[:10] + 1) % 5
    assert zero_shot_accuracy(images, half, classes) == pytest.approx(0.5)


def test_retrieval_recall_counts_both_directions_and_identical_captions():
    g = torch.Generator().manual_seed(0)
    text = torch.randn(8, 16, generator=g)
    ids = torch.arange(8)
    images = 2.0 * text + 0.05 * torch.randn(8, 16, generator=g)
    assert retrieval_recall_at_1(images, text, ids) == 1.0
    # images 0 and 1 swapped: both directions miss on those two pairs -> 6/8 each way
    swapped = images[[1, 0, 2, 3, 4, 5, 6, 7]]
    assert retrieval_recall_at_1(swapped, text, ids) == pytest.approx(0.75)
    # ... unless pairs 0 and 1 have the same caption: then either copy is a correct answer
    assert retrieval_recall_at_1(swapped, text, torch.tensor([0, 0, 2, 3, 4, 5, 6, 7])) == 1.0
    # one direction only: every image sits on text 0, so image->text is right for pair 0 alone (1/8) while
    # text->image still finds each pair's own image (each image keeps a trace of its own text)
    crowded = 5.0 * text[0] + 0.5 * text
    assert retrieval_recall_at_1(crowded, text, ids) == pytest.approx((1 / 8 + 1.0) / 2)
    with pytest.raises(ValueError, match="matching rows"):
        retrieval_recall_at_1(images, text[:4], ids)


def _blobs(seed: int, n: int, dim: int = 16, classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    centers = 4.0 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(123))
    labels = torch.randint(0, classes, (n,), generator=g)
    return centers[labels] + torch.randn(n, dim, generator=g), labels


def test_linear_probe_separable_vs_random_labels():
    x_train, y_train = _blobs(0, 200)
    x_test, y_test = _blobs(1, 100)
    acc = linear_probe_accuracy(x_train, y_train, x_test, y_test, epochs=50)
    assert acc > 0.95
    assert linear_probe_accuracy(x_train, y_train, x_test, y_test, epochs=50) == acc  # deterministic
    g = torch.Generator().manual_seed(5)
    random_train, random_test = (
        torch.randint(0, 4, (200,), generator=g),
        torch.randint(0, 4, (100,), generator=g),
    )
    assert linear_probe_accuracy(x_train, random_train, x_test, random_test, epochs=50) < 0.5  # chance is 0.25


def test_linear_probe_inside_inference_mode():
    x_train, y_train = _blobs(0, 100)
    x_test, y_test = _blobs(1, 50)
    with torch.inference_mode():  # what Lightning's validation loop does
        feats_train, feats_test = x_train * 1.0, x_test * 1.0
        assert linear_probe_accuracy(feats_train, y_train, feats_test, y_test, epochs=30) > 0.9


# ---------------------------------------------------------------- DDP


@pytest.mark.ddp
def test_metrics_sync_across_two_ranks(tmp_path):
    proc = run_two_rank_script(__file__, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    single_cu = CodebookUsage([8])
    single_fm = FidelityMetrics(lpips=False, rfid=False)
    for rank in range(WORLD):
        single_cu.update(_rank_codes(rank))
        single_fm.update(*_rank_images(rank))
    expected_cu, expected_fm = single_cu.compute(), single_fm.compute()
    for res in results:  # every rank sees the global numbers
        assert res["cu"] == pytest.approx(expected_cu)
        assert res["fm"] == pytest.approx(expected_fm, rel=1e-5)
    assert results[0]["cu"]["codebook_usage"] == pytest.approx(0.5)  # each rank alone would see 0.25


def _rank_codes(rank: int) -> torch.Tensor:
    return torch.tensor([2 * rank, 2 * rank + 1]).view(1, 2, 1)  # rank 0: codes 0,1; rank 1: codes 2,3


def _rank_images(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    target = _images(10 + rank)
    return target + (0.05 + 0.1 * rank) * torch.randn(
        target.shape, generator=torch.Generator().manual_seed(rank)
    ), target


def _ddp_worker(rank: int, out_dir: str, port: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        cu = CodebookUsage([8])
        fm = FidelityMetrics(lpips=False, rfid=False)
        cu.update(_rank_codes(rank))
        fm.update(*_rank_images(rank))
        torch.save({"cu": cu.compute(), "fm": fm.compute()}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    method = "fork" if sys.platform == "linux" else "spawn"
    mp.start_processes(_ddp_worker, args=(sys.argv[1], int(sys.argv[2])), nprocs=WORLD, start_method=method)
