"""How hard are the embedded `shapes` classes? Supervised training of tokzoo's vit_tiny encoder (mean-pooled, linear
head) and of a small CNN on the shape labels, validation accuracy every 100 steps.

It explains why zero-shot and linear-probe accuracy stay at chance (10%) in 200-step tokenizer runs: even with the
labels, the models need hundreds of steps to leave chance (docs/REPRODUCTION.md).

    python benchmarks/shapes_difficulty.py --model vit --steps 600 --lr 5e-4
    python benchmarks/shapes_difficulty.py --model cnn --steps 1500 --lr 2e-3
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from tokzoo.backbones import build_encoder
from tokzoo.data import build_dataset


def small_cnn(classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(128, classes),
    )  # fmt: skip


class PooledViT(nn.Module):
    def __init__(self, image_size: int, classes: int):
        super().__init__()
        self.encoder = build_encoder("vit_tiny", image_size=image_size)
        self.head = nn.Sequential(nn.LayerNorm(self.encoder.width), nn.Linear(self.encoder.width, classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images).mean(dim=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("vit", "cnn"), default="vit")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    train = build_dataset("shapes", split="train", image_size=args.image_size)
    val = build_dataset("shapes", split="val", image_size=args.image_size)
    x_train = torch.stack([train[i]["image"] for i in range(len(train))])
    y_train = torch.tensor(train.labels)
    x_val = torch.stack([val[i]["image"] for i in range(len(val))])
    y_val = torch.tensor(val.labels)
    classes = len(train.class_names)
    model = PooledViT(args.image_size, classes) if args.model == "vit" else small_cnn(classes)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    print(f"{args.model}: {len(x_train)} train / {len(x_val)} val images, {classes} classes (chance {1 / classes:.2f})")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(x_train), (args.batch_size,))
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps:
            with torch.no_grad():
                acc = (model(x_val).argmax(dim=1) == y_val).float().mean().item()
            print(f"step {step:5d}  train loss {loss.item():.3f}  val accuracy {acc:.3f}  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
