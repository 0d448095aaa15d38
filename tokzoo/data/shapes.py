"""`shapes`: the embedded synthetic dataset (generated, deterministic, cached).

Each image is one coloured shape (10 kinds, the class label) of some size and position on a patterned
background (plain, gradient, stripes, checkers, smooth noise). Captions come in three styles
(`captions`: full "a large red triangle in the top left on a striped blue background", object "a red
triangle", shape "a triangle"). Reconstruction has edges, colours and textures to get right;
understanding has shape (the label) to align with text.

Generation is vectorised numpy (4k images at 32 px in well under a second), rendered at 2x and
box-downsampled so edges are antialiased, and cached as a compressed .npz whose name encodes the
generator version and every parameter. Writes are tmp + rename, so concurrent DDP ranks never read a
half-written file (at worst both generate the same bytes and the last rename wins).
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from tokzoo.checks import positive_int
from tokzoo.data.common import (
    DATASETS,
    AttributeTask,
    Sample,
    check_split,
    check_templates,
    default_cache_dir,
    uint8_to_tensor,
)
from tokzoo.data.shapes_captions import (  # noqa: F401  (the vocabulary is importable from here too)
    ATTRIBUTES,
    BACKGROUNDS,
    CAPTION_STYLES,
    COLORS,
    POSITIONS,
    SHAPE_NAMES,
    SIZES,
    attribute_tasks,
    compose_captions,
    default_templates,
    task_columns,
)
from tokzoo.data.transforms import Augment, ItemKey, active, augment_array, item_key
from tokzoo.errors import ConfigError

log = logging.getLogger("tokzoo.data")

# Bump whenever the generator's output changes: old cache files are then simply not found.
GENERATOR_VERSION = 2  # 2: the cache stores attributes, captions are composed at load time

SUPPORTED_SIZES = (32, 64)
SIZE_RADIUS = np.array([0.13, 0.2, 0.27])  # radius as a fraction of the image side
_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
_COLOR_NAMES = list(COLORS)


def _polar_polygon(u: np.ndarray, v: np.ndarray, n: int, inner: float) -> np.ndarray:
    """Inside test for a star-shaped polygon: n outer vertices at radius 1 (first one pointing up) alternating
    with n inner vertices at radius `inner` (inner = cos(pi/n) gives the regular n-gon)."""
    h = np.pi / n
    rho = np.hypot(u, v)
    phase = np.mod(np.arctan2(v, u) - np.pi / 2, 2 * h)
    phi = np.minimum(phase, 2 * h - phase)  # fold by symmetry into [0, h]
    # distance from the origin along angle phi to the edge from (1, 0) to inner * (cos h, sin h)
    edge = inner * np.sin(h) / (inner * np.sin(h) * np.cos(phi) - (inner * np.cos(h) - 1.0) * np.sin(phi))
    return rho <= edge


def _shape_mask(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of shape `kind` in local coordinates (u right, v up) scaled so the radius is 1."""
    name = SHAPE_NAMES[kind]
    r2 = u * u + v * v
    if name == "circle":
        return r2 <= 0.9
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if name == "triangle":
        return _polar_polygon(u / 1.1, (v + 0.15) / 1.1, 3, np.cos(np.pi / 3))
    if name == "diamond":  # a rhombus, taller than wide, so it differs from a rotated square
        return np.abs(u) / 0.65 + np.abs(v) <= 1.0
    if name == "pentagon":
        return _polar_polygon(u, v, 5, np.cos(np.pi / 5))
    if name == "hexagon":
        return _polar_polygon(u, v, 6, np.cos(np.pi / 6))
    if name == "star":
        return _polar_polygon(u, v, 5, 0.42)
    if name == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if name == "ring":
        return (r2 <= 0.95) & (r2 >= 0.3)
    if name == "crescent":
        return (r2 <= 0.95) & ((u - 0.45) ** 2 + (v - 0.1) ** 2 >= 0.65)
    raise AssertionError(name)


def _smooth_noise(rng: np.random.Generator, n: int, size: int, cells: int = 6) -> np.ndarray:
    """(n, size, size) in [0, 1]: a coarse random grid, bilinearly upsampled (separable, as two matmuls)."""
    grid = rng.random((n, cells, cells), dtype=np.float32)
    pos = np.linspace(0, cells - 1, size)
    lo = np.minimum(np.floor(pos).astype(int), cells - 2)
    frac = (pos - lo).astype(np.float32)
    w = np.zeros((size, cells), dtype=np.float32)
    w[np.arange(size), lo] = 1 - frac
    w[np.arange(size), lo + 1] = frac
    return w @ grid @ w.T


def _pool2(a: np.ndarray) -> np.ndarray:
    """(n, 2h, 2w) -> (n, h, w) box average."""
    return 0.25 * (a[:, 0::2, 0::2] + a[:, 1::2, 0::2] + a[:, 0::2, 1::2] + a[:, 1::2, 1::2])


def _render(rng: np.random.Generator, p: dict[str, np.ndarray], size: int) -> np.ndarray:
    """Render one chunk of parameter rows to (n, size, size, 3) uint8.

    Patterns and masks are single-channel maps drawn at 2x and box-downsampled (antialiasing); colours are
    mixed at 1x, which is exact for the background since the mix is linear in the pattern value.
    """
    n, ss = len(p["kind"]), 2 * size
    col = lambda a: a[:, None, None]  # (n,) -> (n, 1, 1) to broadcast over pixels
    xs = (np.arange(ss, dtype=np.float32) + 0.5) / ss
    x, y = xs[None, None, :], xs[None, :, None]  # image coords in [0, 1], y pointing down

    # background pattern t in [0, 1] mixing a base colour and a contrasting variant of it
    t = np.zeros((n, ss, ss), dtype=np.float32)
    for kind in range(1, len(BACKGROUNDS)):
        sel = np.flatnonzero(p["bg_kind"] == kind)
        if len(sel) == 0:
            continue
        if kind == 4:
            t[sel] = _smooth_noise(rng, len(sel), ss)
            continue
        cos_a, sin_a = col(np.cos(p["bg_angle"][sel])), col(np.sin(p["bg_angle"][sel]))
        along = x * cos_a + y * sin_a
        if kind == 1:  # linear gradient across the image
            lo, hi = along.min((1, 2), keepdims=True), along.max((1, 2), keepdims=True)
            t[sel] = (along - lo) / (hi - lo)
        else:
            period = col(p["bg_period"][sel])
            stripes = np.floor(along / period)
            if kind == 3:  # checkers: stripes in two perpendicular directions
                stripes = stripes + np.floor((y * cos_a - x * sin_a) / period)
            t[sel] = stripes % 2

    # foreground: rotate and scale pixel coords into the shape's frame (radius 1, v up)
    dx, dy = x - col(p["cx"]), col(p["cy"]) - y
    cos_r, sin_r, rad = col(np.cos(p["rot"])), col(np.sin(p["rot"])), col(p["radius"])
    u, v = (dx * cos_r + dy * sin_r) / rad, (-dx * sin_r + dy * cos_r) / rad
    mask = np.zeros((n, ss, ss), dtype=bool)
    for kind in np.unique(p["kind"]):
        sel = np.flatnonzero(p["kind"] == kind)
        mask[sel] = _shape_mask(int(kind), u[sel], v[sel])
    # soft directional shading inside the shape (pure flat colour would make it too easy)
    shade = 1 + 0.3 * np.clip(u * col(np.cos(p["shade"])) + v * col(np.sin(p["shade"])), -1, 1)

    t, alpha, shade = (
        _pool2(t)[..., None],
        _pool2(mask.astype(np.float32))[..., None],
        _pool2(shade)[..., None],
    )
    base = _PALETTE[p["bg_color"]][:, None, None]  # (n, 1, 1, 3)
    alt = np.where(base.mean(-1, keepdims=True) > 128, base * 0.55, base + (255 - base) * 0.45)
    bg = base * (1 - t) + alt * t
    noisy = np.flatnonzero(p["bg_kind"] == 4)
    bg[noisy] += rng.normal(0, 12, size=(len(noisy), size, size, 3)).astype(np.float32)  # pixel grain
    fg = _PALETTE[p["color"]][:, None, None] * shade
    img = bg * (1 - alpha) + fg * alpha
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def generate_shapes(n: int, image_size: int, seed: int | list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Generate n images (n, S, S, 3) uint8 and their attributes (n, len(ATTRIBUTES)) int64, deterministic in
    seed. Column 0 (kind) is the class label; compose_captions turns rows into text."""
    if image_size not in SUPPORTED_SIZES:
        raise ConfigError(f"shapes: image_size must be one of {SUPPORTED_SIZES}, got {image_size}")
    rng = np.random.default_rng(seed)
    nc = len(_PALETTE)
    p = {
        "kind": rng.integers(0, len(SHAPE_NAMES), n),
        "color": rng.integers(0, nc, n),
        "size": rng.integers(0, len(SIZES), n),
        "pos": rng.integers(0, len(POSITIONS), n),
        "bg_kind": rng.integers(0, len(BACKGROUNDS), n),
        "rot": rng.uniform(-np.pi / 12, np.pi / 12, n),  # small, so square and diamond stay distinct
        "bg_angle": rng.uniform(0, np.pi, n),
        "bg_period": rng.uniform(0.1, 0.22, n),
        "shade": rng.uniform(0, 2 * np.pi, n),
    }
    p["bg_color"] = (p["color"] + rng.integers(1, nc, n)) % nc  # never the shape's colour
    p["radius"] = SIZE_RADIUS[p["size"]] * rng.uniform(0.9, 1.1, n)
    # cells of a 3x3 grid; the offset shrinks with the radius so the shape stays inside the image
    offset = 0.47 - p["radius"]
    p["cx"] = 0.5 + (p["pos"] % 3 - 1) * offset + rng.uniform(-0.02, 0.02, n)
    p["cy"] = 0.5 + (p["pos"] // 3 - 1) * offset + rng.uniform(-0.02, 0.02, n)
    p = {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in p.items()}

    chunk = max(1, 2**20 // (image_size * image_size))  # bounds peak memory to a few hundred MB
    images = np.concatenate(
        [_render(rng, {k: v[i : i + chunk] for k, v in p.items()}, image_size) for i in range(0, n, chunk)]
    )
    attributes = np.stack([p[k] for k in ATTRIBUTES], axis=1).astype(np.int64)
    return images, attributes


def cache_path(cache_dir: Path, split: str, n: int, image_size: int, seed: int) -> Path:
    return cache_dir / f"shapes_v{GENERATOR_VERSION}_{split}_n{n}_px{image_size}_seed{seed}.npz"


def _split_seed(seed: int, split: str) -> list[int]:
    return [seed, 0 if split == "train" else 1]  # different streams for train and val


def _write_atomic(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; a shared cache should be readable by all
        os.replace(tmp, path)  # atomic on POSIX: readers see the old state or the whole file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_or_generate(split: str, n: int, image_size: int, seed: int, cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images, attributes) from the cache, generated and cached first if absent or unreadable."""
    path = cache_path(cache_dir, split, n, image_size, seed)
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                return z["images"], z["attributes"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exn:
            log.warning("shapes cache %s is unreadable (%s); regenerating it", path, exn)
    images, attributes = generate_shapes(n, image_size, seed=_split_seed(seed, split))
    try:
        _write_atomic(path, images=images, attributes=attributes)
    except OSError as exn:
        log.warning("could not write the shapes cache %s (%s); keeping this copy in memory only", path, exn)
    return images, attributes


class ShapesDataset(torch.utils.data.Dataset):
    def __init__(
        self,
        images: np.ndarray,
        captions: list[str],
        labels: np.ndarray,
        prompt_templates: list[str],
        augment: Augment | None = None,
        tasks: dict[str, AttributeTask] | None = None,
        task_values: np.ndarray | None = None,
    ):
        self.images = torch.from_numpy(images)  # (N, S, S, 3) uint8: 4x smaller than float in memory
        self.captions = captions
        self.labels = labels.tolist()
        self.class_names = list(SHAPE_NAMES)
        self.prompt_templates = prompt_templates
        self.attribute_tasks = tasks or {}  # what the captions name besides the shape (scored at validation)
        self.task_values = [tuple(row) for row in task_values.tolist()] if self.attribute_tasks else None
        self.augment = augment  # off unless data.augment asks: the full captions name positions (left/right)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, key: ItemKey) -> Sample:
        epoch, i = item_key(key)
        image = self.images[i].numpy()
        if active(self.augment):
            image = augment_array(image, image.shape[0], self.augment, self.augment.rng(epoch, i))
        sample = {"image": uint8_to_tensor(image), "caption": self.captions[i], "label": self.labels[i]}
        if self.task_values is not None:
            sample["attributes"] = self.task_values[i]
        return sample


def _example(folder: Path) -> dict:
    return {"num_train": 12, "num_val": 6, "cache_dir": str(folder)}  # generated in a few ms, cached in folder


@DATASETS.register("shapes", example=_example)
def shapes(
    split: str = "train",
    image_size: int = 32,
    num_train: int = 4000,
    num_val: int = 512,
    seed: int = 0,
    cache_dir: str | None = None,
    prompt_templates: list[str] | None = None,
    captions: str = "full",
    augment: Augment | None = None,
) -> ShapesDataset:
    """The embedded synthetic dataset; label = shape kind (class_names = SHAPE_NAMES). `captions` picks how much
    each caption says (compose_captions); the zero-shot prompts follow the same style unless given."""
    check_split(split)
    if captions not in CAPTION_STYLES:
        raise ConfigError(f"data.kwargs.captions must be one of {list(CAPTION_STYLES)} for 'shapes', got {captions!r}")
    if image_size not in SUPPORTED_SIZES:
        raise ConfigError(f"image_size must be one of {SUPPORTED_SIZES} for the shapes dataset, got {image_size}")
    positive_int("data.kwargs of 'shapes'", num_train=num_train, num_val=num_val)
    n = num_train if split == "train" else num_val
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    images, attributes = load_or_generate(split, n, image_size, seed, root / "shapes")
    templates = check_templates(prompt_templates, default_templates(captions))
    augment = augment if split == "train" else None
    captions_text = compose_captions(attributes, captions)
    # the val split carries the attribute tasks the captions name: what validation scores besides the shape
    tasks = attribute_tasks(captions) if split == "val" else {}
    values = attributes[:, task_columns(captions)]
    return ShapesDataset(images, captions_text, attributes[:, 0], templates, augment, tasks, values)
