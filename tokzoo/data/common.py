"""Shared pieces of the data layer: the registry, image loading, sample format and collation.

Every dataset item is a dict {"image": FloatTensor (3, H, W) in [-1, 1], "caption": str, "label": int}
(label -1 when unknown), or None when the sample could not be read. Training never sees the None: the train
loader replaces an unreadable sample by another one (`ReplaceUnreadable` for map-style sets, the stream's next
readable sample for webdataset), which carries the count in an extra "skipped" key, so every batch is full and DDP
ranks run the same steps. `collate_samples` sums those counts and drops (and counts) any None left, so a corrupt
file costs one sample, never a run.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from tokzoo.checks import int_at_least
from tokzoo.data.transforms import (
    Augment,
    ItemKey,
    active,
    augment_image,
    item_key,
    resize_center_crop,  # noqa: F401  (it lived here: importable from here still)
)
from tokzoo.errors import ConfigError, DataError
from tokzoo.registry import Registry

log = logging.getLogger("tokzoo.data")

DATASETS = Registry("dataset")

SPLITS = ("train", "val")

# Generic zero-shot prompts for photo-like data; each holds exactly one "{}" for the class name.
PHOTO_TEMPLATES = [
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a close-up photo of a {}.",
    "a low resolution photo of a {}.",
    "a bright photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "an image of a {}.",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

Sample = dict[str, Any]


@dataclass(frozen=True)
class AttributeTask:
    """A classification task beside the class label that the captions describe (the embedded dataset's colour,
    size, ...): a dataset lists them as `attribute_tasks` {name: task} and each sample carries "attributes", its
    value index per task in that order. Scored as val/zeroshot_acc/<name> and val/linprobe_acc/<name>."""

    names: list[str]  # value names; a sample's value is an index into them
    prompts: list[list[str]]  # per value, the zero-shot prompts whose mean text embedding stands for it


def build_dataset(name: str, **kwargs: Any) -> torch.utils.data.Dataset:
    """Build a registered dataset, e.g. build_dataset("shapes", split="train", image_size=32)."""
    return DATASETS.build(name, **kwargs)


def list_datasets() -> list[str]:
    return DATASETS.names()


def default_cache_dir() -> Path:
    """TOKZOO_CACHE if set, else ~/.cache/tokzoo."""
    env = os.environ.get("TOKZOO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tokzoo"


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ConfigError(f"data split '{split}' is unknown; allowed: {', '.join(SPLITS)}")
    return split


def check_image_size(image_size: int) -> int:
    int_at_least(8, "data", image_size=image_size)
    return image_size


def check_templates(templates: list[str] | None, default: list[str]) -> list[str]:
    templates = list(default if templates is None else templates)
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ConfigError(
            "data.kwargs.prompt_templates must be a non-empty list of strings, each with exactly one '{}'; "
            f"bad: {bad}"
        )
    return templates


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Log `message` once per key per process (a corrupt file is reported once, not once per epoch)."""
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def uint8_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1]."""
    arr = np.ascontiguousarray(arr) if arr.flags.writeable else arr.copy()  # PIL's arrays are read-only
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def load_image(
    source: str | Path | bytes,
    size: int,
    name: str | None = None,
    augment: Augment | None = None,
    rng: np.random.Generator | None = None,
) -> torch.Tensor | None:
    """Decode a path or encoded bytes to (3, size, size) in [-1, 1]; None (and one warning) if unreadable.
    Resize + center crop, or the train augmentation drawn from `rng` (tokzoo.data.transforms)."""
    what = name or str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img.load()
            arr = np.asarray(augment_image(img, size, augment, rng), dtype=np.uint8)
    except Exception as exn:  # PIL raises many types for bad data (OSError, SyntaxError, ValueError...)
        warn_once(what, f"skipping unreadable image {what}: {type(exn).__name__}: {exn}")
        return None
    return uint8_to_tensor(arr)


def collate_samples(items: list[Sample | None]) -> dict[str, Any]:
    """Stack samples into {"image": (B,3,H,W), "caption": [str], "label": (B,) int64, "skipped": int}.

    "skipped": the unreadable samples behind this batch: the replacements' counts, plus None items (dropped here;
    only val loaders still yield them, so only a val batch can be short, or empty if all were None).
    """
    kept = [it for it in items if it is not None]
    skipped = len(items) - len(kept) + sum(int(it.get("skipped", 0)) for it in kept)
    if not kept:
        return {
            "image": torch.zeros(0, 3, 0, 0),
            "caption": [],
            "label": torch.zeros(0, dtype=torch.long),
            "skipped": skipped,
        }
    batch = {
        "image": torch.stack([it["image"] for it in kept]),
        "caption": [it["caption"] for it in kept],
        "label": torch.tensor([int(it["label"]) for it in kept], dtype=torch.long),
        "skipped": skipped,
    }
    if all("attributes" in it for it in kept):
        batch["attributes"] = torch.tensor([list(it["attributes"]) for it in kept], dtype=torch.long)  # (B, tasks)
    return batch


def deterministic_split(n: int, split: str, val_fraction: float, seed: int, what: str) -> np.ndarray:
    """Indices of `split` in a seeded permutation of range(n); val gets round(n * val_fraction), >= 1."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"data.kwargs.val_fraction must be in (0, 1), got {val_fraction} (for {what})")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = min(max(1, round(n * val_fraction)), n - 1) if n > 1 else 0
    idx = perm[:n_val] if split == "val" else perm[n_val:]
    return np.sort(idx)


class FileListDataset(torch.utils.data.Dataset):
    """Map-style dataset over (image path, caption, label) triples; unreadable images give None. With an active
    `augment` (train splits), item (epoch, i) is image i with the draws of (seed, epoch, i)."""

    def __init__(
        self,
        paths: list[str],
        captions: list[str],
        labels: list[int],
        image_size: int,
        class_names: list[str] | None,
        prompt_templates: list[str],
        augment: Augment | None = None,
    ):
        self.paths, self.captions, self.labels = paths, captions, labels
        self.image_size = image_size
        self.class_names = class_names
        self.prompt_templates = prompt_templates
        self.augment = augment

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: ItemKey) -> Sample | None:
        epoch, i = item_key(key)
        rng = self.augment.rng(epoch, i) if active(self.augment) else None
        image = load_image(self.paths[i], self.image_size, augment=self.augment, rng=rng)
        if image is None:
            return None
        return {"image": image, "caption": self.captions[i], "label": self.labels[i]}


class ReplaceUnreadable(torch.utils.data.Dataset):
    """A map-style train set as its loader sees it: an unreadable item i is replaced by the next readable one
    (i + 1, i + 2, ... modulo the length, same epoch key), which carries the number it replaced in "skipped".
    Deterministic, so a resumed run reads the same replacements."""

    max_tries = 64  # then the data, not one file, is broken

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: ItemKey) -> Sample:
        epoch, i = item_key(key)
        n = len(self.dataset)
        tries = min(n, self.max_tries)
        for k in range(tries):
            j = (i + k) % n
            sample = self.dataset[(epoch, j) if isinstance(key, tuple) else j]
            if sample is not None:
                return {**sample, "skipped": k} if k else sample
        raise DataError(
            f"{tries} samples in a row from index {i} of the train set are unreadable; check the data files (the "
            "warnings above name them)"
        )


def write_example_images(folder: Path, count: int, size: tuple[int, int] = (20, 14)) -> list[Path]:
    """count small PNGs of distinct flat colours in folder (for the datasets' registry examples). Not square,
    so loading them exercises the resize and the center crop."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i}.png"
        Image.new("RGB", size, (40 * i % 256, 200 - 30 * i % 200, 90)).save(path)
        paths.append(path)
    return paths
