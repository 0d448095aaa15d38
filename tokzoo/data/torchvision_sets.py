"""`cifar10` / `cifar100`: one reader of the CIFAR "python version" folders, registered twice.

Data lives under `root` (default <cache_dir>/cifar) as the unpacked official tarball: cifar-10-batches-py/ or
cifar-100-python/ (labels: the 100 fine classes). download=False by default, so offline runs fail with a clear
message; download=True fetches and verifies the tarball through torchvision. The folders are read here rather
than through torchvision's dataset classes, because those check fixed md5 sums, which a test fixture (the
registry example below) cannot match. Label = class index, caption = a prompt template filled with its name.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from tokzoo.data.common import (
    DATASETS,
    PHOTO_TEMPLATES,
    Sample,
    check_image_size,
    check_split,
    check_templates,
    default_cache_dir,
    uint8_to_tensor,
)
from tokzoo.data.transforms import Augment, ItemKey, active, augment_array, item_key
from tokzoo.errors import DataError
from tokzoo.registry import preset


@dataclass(frozen=True)
class CifarLayout:
    folder: str  # inside root
    train: tuple[str, ...]  # batch files of each split, in torchvision's order
    val: tuple[str, ...]
    meta: str
    names_key: str  # class names in the meta file
    labels_key: str  # labels in each batch file
    url: str


LAYOUTS = {
    "cifar10": CifarLayout(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        "label_names",
        "labels",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    ),
    "cifar100": CifarLayout(
        "cifar-100-python",
        ("train",),
        ("test",),
        "meta",
        "fine_label_names",
        "fine_labels",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    ),
}


class ArrayImageDataset(torch.utils.data.Dataset):
    """In-memory uint8 images (N, H, W, 3) + integer labels; captions from the class names and templates. With an
    active `augment` (train split), item (epoch, i) is image i with the draws of (seed, epoch, i)."""

    def __init__(
        self,
        images: np.ndarray,
        labels: list[int],
        image_size: int,
        class_names: list[str],
        templates: list[str],
        augment: Augment | None = None,
    ):
        self.images, self.labels, self.image_size = images, labels, image_size
        self.class_names, self.prompt_templates = class_names, templates
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: ItemKey) -> Sample:
        epoch, i = item_key(key)
        rng = self.augment.rng(epoch, i) if active(self.augment) else None
        arr = augment_array(self.images[i], self.image_size, self.augment, rng)
        label = self.labels[i]
        caption = self.prompt_templates[i % len(self.prompt_templates)].format(self.class_names[label])
        return {"image": uint8_to_tensor(arr), "caption": caption, "label": label}


def _unpickle(path: Path) -> dict:
    with path.open("rb") as f:
        return pickle.load(f, encoding="latin1")  # the official files are Python 2 pickles


def read_cifar(folder: Path, layout: CifarLayout, split: str) -> tuple[np.ndarray, list[int], list[str]]:
    """(images (N, 32, 32, 3) uint8, labels, class names) of one split of an unpacked CIFAR folder."""
    try:
        batches = [_unpickle(folder / name) for name in (layout.train if split == "train" else layout.val)]
        names = [str(n).replace("_", " ") for n in _unpickle(folder / layout.meta)[layout.names_key]]
        data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
        labels = [int(label) for b in batches for label in b[layout.labels_key]]
    except (OSError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as exn:
        raise DataError(
            f"{folder} is incomplete or corrupt ({type(exn).__name__}: {exn}); delete it and unpack {layout.url} "
            f"again, or set data.kwargs.download=true"
        ) from exn
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels, names


def cifar(
    which: str,
    split: str = "train",
    image_size: int = 32,
    root: str | None = None,
    download: bool = False,
    prompt_templates: list[str] | None = None,
    augment: Augment | None = None,
) -> ArrayImageDataset:
    """CIFAR-10 or CIFAR-100 (`which`, fixed by the registered name) from `root` (default <cache_dir>/cifar).
    augment: the train split's (data.augment; the val split is always resized and center-cropped)."""
    check_split(split)
    check_image_size(image_size)
    templates = check_templates(prompt_templates, PHOTO_TEMPLATES)
    layout = LAYOUTS[which]
    path = Path(root).expanduser() if root else default_cache_dir() / "cifar"
    missing = DataError(
        f"{which} not found under {path} (expected {path / layout.folder}). Set data.kwargs.download=true "
        f"on a machine with internet, or unpack {layout.url} into {path}"
    )
    if download:
        from torchvision import datasets  # takes seconds to import: only when asked to download

        cls = datasets.CIFAR10 if which == "cifar10" else datasets.CIFAR100
        try:
            cls(str(path), train=split == "train", download=True)  # fetches, verifies and unpacks
        except RuntimeError as exn:  # torchvision: "Dataset not found or corrupted"
            raise missing from exn
        except OSError as exn:  # no network
            raise DataError(f"{which}: could not download into {path} ({exn}); fetch {layout.url} by hand") from exn
    if not (path / layout.folder).is_dir():
        raise missing
    images, labels, names = read_cifar(path / layout.folder, layout, split)
    return ArrayImageDataset(images, labels, image_size, names, templates, augment if split == "train" else None)


def write_example(which: str, folder: Path) -> dict:
    """A tiny CIFAR folder in the official layout (two random 32x32 images per batch file, three classes)."""
    layout = LAYOUTS[which]
    root = folder / layout.folder
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in layout.train + layout.val:
        batch = {"data": rng.integers(0, 256, (2, 3 * 32 * 32), dtype=np.uint8), layout.labels_key: [0, 2]}
        (root / name).write_bytes(pickle.dumps(batch))
    (root / layout.meta).write_bytes(pickle.dumps({layout.names_key: ["airplane", "sports_car", "bird"]}))
    return {"root": str(folder)}


for _name in LAYOUTS:
    DATASETS.register(_name, example=partial(write_example, _name))(preset(cifar, which=_name))
