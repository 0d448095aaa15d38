"""Image geometry of the data layer: the deterministic resize + center crop (every val split, and train splits with
augmentation off) and the seeded train augmentation that `data.augment` selects.

The augmentation is the one tokenizer trainers use: the short side resized to `resize_short * image_size`, an
`image_size` square cut at random (or in the center), and a horizontal flip with probability 1/2. Its draws come
from (run seed, epoch, item) alone, never from a worker's or the global RNG, so they are the same whatever the
number of DataLoader workers or DDP ranks, and a resumed run sees the draws an uninterrupted one would have.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from tokzoo.errors import ConfigError

CROPS = ("random", "center")

ItemKey = int | tuple[int, int]  # a map-style item: an index, or (epoch, index) from the train sampler


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """RGB, shorter side resized to `size` (PIL's resize filters are antialiased), then a center crop."""
    img = img.convert("RGB")
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


@dataclass(frozen=True)
class Augment:
    """A train split's augmentation (the resolved `data.augment` and the run's seed)."""

    crop: str = "center"
    flip: bool = False
    resize_short: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ConfigError(f"data.augment.crop is {self.crop!r}; allowed: {', '.join(CROPS)}")
        if not isinstance(self.flip, bool):
            raise ConfigError(f"data.augment.flip must be true or false, got {self.flip!r}")
        scale = self.resize_short
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 1.0 <= scale <= 4.0:
            raise ConfigError(
                f"data.augment.resize_short must be a number in [1, 4] (the short side as a multiple of "
                f"model.image_size before the crop), got {scale!r}"
            )

    @property
    def active(self) -> bool:
        """False when it is exactly the val transform (resize + center crop, no flip)."""
        return self.crop != "center" or self.flip or self.resize_short != 1.0

    def rng(self, *item: int | str) -> np.random.Generator:
        """The draws of one item, e.g. rng(epoch, index) or rng(epoch, pass, shard, key)."""
        words = [self.seed & 0xFFFFFFFF] + [
            zlib.crc32(part.encode()) if isinstance(part, str) else part & 0xFFFFFFFF for part in item
        ]
        return np.random.default_rng(words)


def active(augment: Augment | None) -> bool:
    return augment is not None and augment.active


def item_key(key: ItemKey) -> tuple[int, int]:
    """(epoch, index) of a map-style item; a plain index (val split, direct use) is epoch 0."""
    if isinstance(key, tuple):
        epoch, index = key
        return int(epoch), int(index)
    return 0, int(key)


def augment_image(img: Image.Image, size: int, augment: Augment | None, rng: np.random.Generator | None) -> Image.Image:
    """The train transform of a decoded image; resize_center_crop itself when augmentation is off."""
    if not active(augment) or rng is None:
        return resize_center_crop(img, size)
    # three uniforms per item, always drawn in this order, so the array path below makes the same choices
    u_left, u_top, u_flip = rng.random(3)
    img = img.convert("RGB")
    w, h = img.size
    short = max(size, round(size * augment.resize_short))
    scale = short / min(w, h)
    nw, nh = max(short, round(w * scale)), max(short, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    if augment.crop == "random":
        left, top = min(int(u_left * (nw - size + 1)), nw - size), min(int(u_top * (nh - size + 1)), nh - size)
    else:
        left, top = (nw - size) // 2, (nh - size) // 2
    if (left, top, nw, nh) != (0, 0, size, size):
        img = img.crop((left, top, left + size, top + size))
    if augment.flip and u_flip < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def augment_array(arr: np.ndarray, size: int, augment: Augment | None, rng: np.random.Generator | None) -> np.ndarray:
    """The same for an in-memory uint8 (H, W, 3) image (shapes, CIFAR): no PIL round trip when none is needed."""
    if arr.shape[:2] == (size, size) and (not active(augment) or rng is None or augment.resize_short == 1.0):
        if not active(augment) or rng is None:
            return arr
        # at scale 1 any crop of a size x size image is the whole image: only the flip is left
        return arr[:, ::-1] if augment.flip and rng.random(3)[2] < 0.5 else arr
    return np.asarray(augment_image(Image.fromarray(arr), size, augment, rng))
