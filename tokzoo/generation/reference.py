"""The reference classifier that judges samples: trained once per dataset on real training images, then cached.

    ref, cached = reference_classifier(identity, train_images, train_labels, num_classes, cache_dir)  # or the cached
    preds, feats = predict_and_embed(ref, val_images)          # val/gen_ref_acc: is the judge any good?
    fd = frechet_distance(sample_feats, feats)                 # val/gen_fd_ref

It is no Inception network: its features know only this dataset's classes, so `val/gen_fd_ref` compares runs on one
dataset and nothing else (named for what it is, never called FID).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REFERENCE_VERSION = 2  # bump when the classifier or its training changes: old cache files are then not found
FEATURE_DIM = 64
STAGES = (32, 64, 128, 256)


class ReferenceClassifier(nn.Module):
    """A small VGG-style net: four stages of two 3x3 conv + BatchNorm + ReLU (32, 64, 128, 256 channels, 2x2 max-pool
    between stages) -> global average pool -> 64-d features -> linear. On the embedded `shapes` data (32 px) it reaches
    87% validation accuracy after 15 epochs (docs/REPRODUCTION.md); BatchNorm is fine here: it is trained alone, on
    one process, and used in eval mode."""

    def __init__(self, num_classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c_out in enumerate(STAGES):
            for c in (c_in, c_out):
                layers += [nn.Conv2d(c, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            if i < len(STAGES) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.features = nn.Linear(c_in, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def embed(self, images: Tensor) -> Tensor:
        # images (B, 3, H, W) in [-1, 1] -> (B, 64)
        return F.relu(self.features(self.body(images).mean(dim=(2, 3))))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.embed(images))


def cache_key(identity: dict[str, Any]) -> str:
    blob = json.dumps({**identity, "version": REFERENCE_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_classifier(
    images: Tensor, labels: Tensor, num_classes: int, epochs: int = 15, seed: int = 0
) -> ReferenceClassifier:
    """AdamW with a one-cycle schedule, horizontal flips and +-2 px shifts, on real images (B, 3, H, W) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ReferenceClassifier(num_classes)
    batch = min(128, len(images))
    steps = epochs * max(1, len(images) // batch)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.2)
    side = images.shape[-1]
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=g)
        x = images[idx]
        flip = torch.rand(batch, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        dx, dy = torch.randint(0, 5, (2,), generator=g).tolist()  # one shift per batch: cheap, and enough
        x = F.pad(x, (2, 2, 2, 2), mode="replicate")[..., dy : dy + side, dx : dx + side]
        loss = F.cross_entropy(net(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def reference_classifier(
    identity: dict[str, Any], images: Tensor, labels: Tensor, num_classes: int, cache_dir: Path
) -> tuple[ReferenceClassifier, bool]:
    """The cached classifier for this dataset identity, else one trained now and cached (tmp + rename, so
    concurrent runs never read half a file). Returns (classifier, loaded_from_cache)."""
    path = cache_dir / "reference" / f"classifier-{cache_key(identity)}.pt"
    if path.is_file():
        try:
            net = ReferenceClassifier(num_classes)
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return net.eval(), True
        except (RuntimeError, OSError, EOFError):  # a stale or truncated file: train again and replace it
            pass
    net = train_classifier(images, labels, num_classes)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save(net.state_dict(), tmp)
    os.replace(tmp, path)
    return net, False


@torch.no_grad()
def predict_and_embed(net: ReferenceClassifier, images: Tensor, batch: int = 256) -> tuple[Tensor, Tensor]:
    """(predicted classes (B,), features (B, 64)) for images (B, 3, H, W) in [-1, 1]."""
    preds, feats = [], []
    for chunk in images.split(batch):
        f = net.embed(chunk.float())
        feats.append(f)
        preds.append(net.head(f).argmax(dim=1))
    return torch.cat(preds), torch.cat(feats)


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) between two feature sets (rows), in float64."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    middle = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * middle)
