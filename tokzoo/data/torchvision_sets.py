"""`cifar10` / `cifar100` through torchvision (download=False by default: offline runs fail clearly)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tokzoo.data.common import (
    DATASETS,
    PHOTO_TEMPLATES,
    Sample,
    check_image_size,
    check_split,
    check_templates,
    default_cache_dir,
    resize_center_crop,
    uint8_to_tensor,
)
from tokzoo.errors import DataError

_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}


class ArrayImageDataset(torch.utils.data.Dataset):
    """In-memory uint8 images (N, H, W, 3) + integer labels; captions from the class names and templates."""

    def __init__(
        self,
        images: np.ndarray,
        labels: list[int],
        image_size: int,
        class_names: list[str],
        templates: list[str],
    ):
        self.images, self.labels, self.image_size = images, labels, image_size
        self.class_names, self.prompt_templates = class_names, templates

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Sample:
        arr = self.images[i]
        if arr.shape[:2] != (self.image_size, self.image_size):
            arr = np.asarray(resize_center_crop(Image.fromarray(arr), self.image_size))
        label = self.labels[i]
        caption = self.prompt_templates[i % len(self.prompt_templates)].format(self.class_names[label])
        return {"image": uint8_to_tensor(arr), "caption": caption, "label": label}


def _cifar(
    name: str, root: str | None, split: str, image_size: int, download: bool, templates: list[str] | None
) -> ArrayImageDataset:
    check_split(split)
    check_image_size(image_size)
    templates = check_templates(templates, PHOTO_TEMPLATES)
    path = Path(root).expanduser() if root else default_cache_dir() / "cifar"
    missing = DataError(
        f"{name} not found under {path} (expected {path / _FOLDERS[name]}). Set data.kwargs.download=true "
        f"on a machine with internet, or unpack {_URLS[name]} into {path}"
    )
    if not download and not (path / _FOLDERS[name]).is_dir():
        raise missing  # before importing torchvision.datasets, which takes seconds
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        ds = cls(str(path), train=split == "train", download=download)
    except RuntimeError as exn:  # torchvision: "Dataset not found or corrupted"
        raise missing from exn
    except OSError as exn:  # download attempted without network
        raise DataError(
            f"{name}: could not download into {path} ({exn}); fetch {_URLS[name]} by hand"
        ) from exn
    names = [c.replace("_", " ") for c in ds.classes]
    return ArrayImageDataset(ds.data, list(map(int, ds.targets)), image_size, names, templates)


@DATASETS.register("cifar10")
def cifar10(
    split: str = "train",
    image_size: int = 32,
    root: str | None = None,
    download: bool = False,
    prompt_templates: list[str] | None = None,
) -> ArrayImageDataset:
    """CIFAR-10 from `root` (default <cache_dir>/cifar); label = class index, caption = template(class)."""
    return _cifar("cifar10", root, split, image_size, download, prompt_templates)


@DATASETS.register("cifar100")
def cifar100(
    split: str = "train",
    image_size: int = 32,
    root: str | None = None,
    download: bool = False,
    prompt_templates: list[str] | None = None,
) -> ArrayImageDataset:
    """CIFAR-100 (fine labels) from `root` (default <cache_dir>/cifar)."""
    return _cifar("cifar100", root, split, image_size, download, prompt_templates)
