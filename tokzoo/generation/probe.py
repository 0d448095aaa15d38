"""The generation probe: how well a small autoregressive model can model a frozen tokenizer's codes.

    result = run_probe(model, datamodule, config, identity)     # after a variant trains (runner) or `tokzoo probe-gen`
    result.metrics        # val/gen_bits_per_image, val/gen_bits_per_token, val/gen_class_acc, val/gen_fd_ref, ...
    result.absent         # metric -> why it is not there (continuous quantizer, no labels, no decoder, no Inception)
    result.grid           # class-conditional samples decoded by the tokenizer, one row per class (or None)

Steps: encode the training split to codes (B, N, C), train the prior (TokenPrior) on them, score held-out validation
codes (bits), then sample class-conditionally at temperature 1 (guidance only when eval.generation.cfg > 0), decode
the samples and judge them with the dataset's reference classifier (trained once on real images, cached).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from tokzoo.data.common import collate_samples, default_cache_dir
from tokzoo.generation.prior import TokenPrior
from tokzoo.generation.reference import frechet_distance, predict_and_embed, reference_classifier
from tokzoo.weights import hub_weights, require_weights, weights_available

CLASSIFIER_SIDE = 64  # real images are kept for the reference classifier at most this size (uint8): memory stays small


@dataclass
class ProbeResult:
    metrics: dict[str, float] = field(default_factory=dict)
    absent: dict[str, str] = field(default_factory=dict)
    grid: Tensor | None = None  # (rows * cols, 3, H, W) in [0, 1], rows = classes


@dataclass
class EncodedSplit:
    codes: Tensor  # (B, N, C) int64
    labels: Tensor  # (B,) int64, -1 where unknown
    images: Tensor  # (B, 3, h, w) uint8, for the reference classifier and the Frechet distances


def to_uint8(images: Tensor) -> Tensor:
    side = min(images.shape[-1], CLASSIFIER_SIDE)
    if images.shape[-1] != side:
        images = F.interpolate(images.float(), size=(side, side), mode="area")
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def from_uint8(images: Tensor) -> Tensor:
    return images.float() / 127.5 - 1


@torch.no_grad()
def encode_split(model: Any, dataset: torch.utils.data.Dataset, limit: int, batch_size: int = 256) -> EncodedSplit:
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_samples)
    codes, labels, images, seen = [], [], [], 0
    for batch in loader:
        x = batch["image"][: limit - seen].to(device)
        if not len(x):
            continue
        codes.append(model.encode(x).indices.cpu())
        labels.append(batch["label"][: len(x)].cpu().long())
        images.append(to_uint8(x))
        seen += len(x)
        if seen >= limit:
            break
    return EncodedSplit(torch.cat(codes), torch.cat(labels), torch.cat(images))


def train_prior(prior: TokenPrior, train: EncodedSplit, cfg: dict[str, Any], seed: int, conditional: bool) -> None:
    device = prior.pos.device
    g = torch.Generator().manual_seed(seed)
    steps, batch = cfg["steps"], min(cfg["batch_size"], len(train.codes))
    opt = torch.optim.AdamW(prior.parameters(), lr=cfg["lr"], betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    prior.train()
    for _ in range(steps):
        idx = torch.randint(0, len(train.codes), (batch,), generator=g)
        labels = train.labels[idx].to(device) if conditional else None
        loss = prior.nll_bits(train.codes[idx].to(device), labels).sum(dim=(1, 2)).mean() / prior.num_positions
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
        opt.step()
        sched.step()
    prior.eval()


@torch.no_grad()
def held_out_bits(prior: TokenPrior, val: EncodedSplit, conditional: bool, batch: int = 256) -> float:
    device = prior.pos.device
    total = 0.0
    for codes, labels in zip(val.codes.split(batch), val.labels.split(batch)):
        bits = prior.bits_per_image(codes.to(device), labels.to(device) if conditional else None)
        total += float(bits.sum())
    return total / len(val.codes)


def sample_labels(num_classes: int, count: int) -> Tensor:
    return torch.arange(num_classes).repeat(math.ceil(count / num_classes))[:count]


@torch.no_grad()
def decode(model: Any, codes: Tensor, batch: int = 128) -> Tensor:
    device = next(model.parameters()).device
    out = [model.decode_codes(model.quantizer.decode(c.to(device))).float().clamp(-1, 1) for c in codes.split(batch)]
    return torch.cat(out)


def run_probe(model: Any, datamodule: Any, config: dict[str, Any], identity: dict[str, Any]) -> ProbeResult:
    """The probe for one trained tokenizer (an eval-mode UnifiedTokenizer); `identity` names the dataset (it keys
    the reference classifier's cache). Seeded by config['seed']: a rerun gives the same numbers."""
    cfg, seed = config["eval"]["generation"], config["seed"]
    result = ProbeResult()
    if model.quantizer.continuous:
        for key in GENERATION_METRICS:
            result.absent[key] = "continuous quantizer (none): no codes for a prior to model"
        return result
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    datamodule.setup("fit")
    train = encode_split(model, datamodule.train_set, cfg["train_images"])
    val = encode_split(model, datamodule.val_set, cfg["train_images"])
    class_names = datamodule.class_names or []
    conditional = bool(class_names) and bool((train.labels >= 0).all()) and bool((val.labels >= 0).all())
    num_classes = len(class_names) if conditional else 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        prior = TokenPrior(
            model.quantizer.codebook_sizes,
            train.codes.shape[1],
            num_classes,
            width=cfg["width"],
            depth=cfg["depth"],
            heads=cfg["heads"],
            head_depth=cfg["head_depth"],
            class_dropout=cfg["class_dropout"] if conditional else 0.0,
        ).to(next(model.parameters()).device)
        train_prior(prior, train, cfg, seed, conditional)
        bits = held_out_bits(prior, val, conditional)
        m = result.metrics
        m["val/gen_bits_per_image"], m["val/gen_bits_per_token"] = bits, bits / prior.num_positions
        m["val/gen_uniform_bits_per_image"] = prior.uniform_bits_per_image
        if model.decoder is None:
            for key in SAMPLE_METRICS:
                result.absent[key] = "no decoder (supervision=contra): samples cannot be turned into images"
        else:
            judge_samples(model, prior, train, val, num_classes, cfg, seed, identity, result)
    result.metrics["perf/gen_seconds"] = time.perf_counter() - start
    model.train(was_training)
    return result


def judge_samples(
    model: Any,
    prior: TokenPrior,
    train: EncodedSplit,
    val: EncodedSplit,
    num_classes: int,
    cfg: dict[str, Any],
    seed: int,
    identity: dict[str, Any],
    result: ProbeResult,
) -> None:
    g = torch.Generator(device=prior.pos.device).manual_seed(seed)
    labels = sample_labels(num_classes, cfg["samples"]) if num_classes else None
    codes = prior.sample(
        labels, batch=cfg["samples"], temperature=cfg["temperature"], cfg_scale=cfg["cfg"], generator=g
    )
    images = from_uint8(to_uint8(decode(model, codes)))  # judged at the size the real images are kept at
    per_row = cfg["grid_per_class"]
    if num_classes:  # one row per class: sample_labels cycles through the classes
        order = torch.cat([torch.nonzero(labels == k).flatten()[:per_row] for k in range(num_classes)])
        result.grid = images[order].cpu() * 0.5 + 0.5
    else:
        result.grid = images[: per_row * per_row].cpu() * 0.5 + 0.5
    real = from_uint8(val.images)
    if num_classes:
        ref, _ = reference_classifier(
            identity, from_uint8(train.images), train.labels, num_classes, default_cache_dir()
        )
        val_pred, real_feats = predict_and_embed(ref, real)
        sample_pred, sample_feats = predict_and_embed(ref, images)
        result.metrics["val/gen_ref_acc"] = float((val_pred == val.labels).float().mean())
        result.metrics["val/gen_class_acc"] = float((sample_pred == labels).float().mean())
        result.metrics["val/gen_fd_ref"] = frechet_distance(sample_feats, real_feats)
    else:
        for key in ("val/gen_class_acc", "val/gen_ref_acc", "val/gen_fd_ref"):
            result.absent[key] = "the dataset has no class labels: no reference classifier to judge samples"
    ok, reason = weights_available("inception_fid")
    if not ok:
        result.absent["val/gfid"] = reason
        return
    from torchmetrics.image.fid import FrechetInceptionDistance

    with hub_weights("inception_fid"):
        fid = FrechetInceptionDistance(
            feature=2048,
            normalize=True,
            sync_on_compute=False,  # the probe runs on rank 0 alone
            feature_extractor_weights_path=str(require_weights("inception_fid")),
        )
    fid.update((real + 1) / 2, real=True)
    fid.update(images * 0.5 + 0.5, real=False)
    result.metrics["val/gfid"] = float(fid.compute())


SAMPLE_METRICS = ("val/gen_class_acc", "val/gen_ref_acc", "val/gen_fd_ref", "val/gfid")
GENERATION_METRICS = ("val/gen_bits_per_image", "val/gen_bits_per_token", *SAMPLE_METRICS)
