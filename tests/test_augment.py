"""Train-time augmentation (`data.augment`): train splits of imagefolder, webdataset and CIFAR crop at random
inside the resized image and flip, seeded by (seed, epoch, item) so that workers and resumes see the same draws;
val splits are resize + center crop every time; `off` is exactly the deterministic transform; shapes is off by
default; bad values are one ConfigError."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tokzoo.config import defaults, flatten, merge, resolve
from tokzoo.data import DATASETS, build_dataset
from tokzoo.data.common import uint8_to_tensor, write_example_images
from tokzoo.data.transforms import Augment, resize_center_crop
from tokzoo.errors import ConfigError
from tokzoo.lit.datamodule import TokzooDataModule, train_augment

SIZE = 16
RANDOM = {"crop": "random", "flip": True, "resize_short": 1.25}
OFF = {"crop": "center", "flip": False, "resize_short": 1.0}


def textured(size: tuple[int, int], seed: int) -> Image.Image:
    """Noise, so that every crop position and a mirror give different pixels (flat colours would hide them)."""
    w, h = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """root/<class>/<i>.png: two classes of four 30x22 textured PNGs (the layout of write_example_images)."""
    root = tmp_path / "images"
    for c, name in enumerate(("cat", "dog")):
        for i, path in enumerate(write_example_images(root / name, 4, size=(30, 22))):
            textured((30, 22), seed=10 * c + i).save(path)
    return root


def tensor(img: Image.Image) -> torch.Tensor:
    return uint8_to_tensor(np.asarray(img.convert("RGB"), dtype=np.uint8))


def candidates(src: Image.Image, short: int) -> dict[tuple[int, int, bool], torch.Tensor]:
    """Every (top, left, flipped) window of SIZE inside `src` with its short side resized to `short`, computed
    here with plain PIL calls."""
    w, h = src.size
    nw, nh = max(short, round(w * short / min(w, h))), max(short, round(h * short / min(w, h)))
    big = src.convert("RGB").resize((nw, nh), Image.Resampling.BICUBIC)
    out = {}
    for top in range(nh - SIZE + 1):
        for left in range(nw - SIZE + 1):
            window = big.crop((left, top, left + SIZE, top + SIZE))
            out[top, left, False] = tensor(window)
            out[top, left, True] = tensor(window.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    return out


def center(src: Image.Image) -> torch.Tensor:
    """Short side to SIZE, then the center square: the val transform, computed independently."""
    w, h = src.size
    nw, nh = max(SIZE, round(w * SIZE / min(w, h))), max(SIZE, round(h * SIZE / min(w, h)))
    big = src.convert("RGB").resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - SIZE) // 2, (nh - SIZE) // 2
    return tensor(big.crop((left, top, left + SIZE, top + SIZE)))


def which(image: torch.Tensor, windows: dict[tuple[int, int, bool], torch.Tensor]) -> tuple[int, int, bool] | None:
    return next((k for k, w in windows.items() if torch.equal(w, image)), None)


# ---------------------------------------------------------------- map-style datasets (imagefolder)


def imagefolder(root: Path, augment: Augment | None):
    return build_dataset(
        "imagefolder", root=str(root), split="train", image_size=SIZE, val_fraction=0.25, augment=augment
    )


def test_train_crops_vary_across_epochs_stay_inside_the_image_and_flip(folder):
    aug = Augment(**RANDOM, seed=3)
    ds = imagefolder(folder, aug)
    seen_flips, positions = set(), set()
    for i in range(len(ds)):
        with Image.open(ds.paths[i]) as src:
            windows = candidates(src, short=round(SIZE * 1.25))
        draws = [ds[(epoch, i)]["image"] for epoch in range(8)]
        found = [which(d, windows) for d in draws]
        assert None not in found, f"item {i}: a draw is no window of the resized image"
        assert len(set(found)) >= 3, f"item {i}: draws hardly vary across epochs: {found}"
        seen_flips |= {f[2] for f in found}
        positions |= {f[:2] for f in found}
        assert torch.equal(ds[(5, i)]["image"], draws[5])  # the same (epoch, item): the same draw
    assert seen_flips == {False, True} and len(positions) > 4
    again = imagefolder(folder, aug)
    assert all(torch.equal(again[(2, i)]["image"], ds[(2, i)]["image"]) for i in range(len(ds)))
    other = imagefolder(folder, Augment(**RANDOM, seed=4))  # another run seed: other draws
    assert any(not torch.equal(other[(2, i)]["image"], ds[(2, i)]["image"]) for i in range(len(ds)))


def test_val_split_is_resize_and_center_crop_every_time(folder):
    kwargs = {"root": str(folder), "val_fraction": 0.25}
    dm = TokzooDataModule("imagefolder", SIZE, batch_size=2, dataset_kwargs=kwargs, seed=3, augment=RANDOM)
    dm.setup("fit")
    assert dm.train_set.augment is not None and dm.val_set.augment is None
    first = [b["image"] for b in dm.val_dataloader()]
    second = [b["image"] for b in dm.val_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    expected = []
    for path in dm.val_set.paths:
        with Image.open(path) as src:
            expected.append(center(src))
            assert torch.equal(tensor(resize_center_crop(src, SIZE)), expected[-1])
    assert torch.equal(torch.cat(first), torch.stack(expected))


def test_augment_off_gives_the_deterministic_transform_exactly(folder):
    kwargs = {"root": str(folder), "val_fraction": 0.25}
    dm = TokzooDataModule("imagefolder", SIZE, batch_size=2, dataset_kwargs=kwargs, seed=3, augment=OFF)
    dm.setup("fit")
    assert dm.augment is None and dm.train_set.augment is None
    loader = dm.train_dataloader()
    assert loader.sampler.keyed is False  # plain indices: the loader path of before data.augment
    for i, path in enumerate(dm.train_set.paths):
        with Image.open(path) as src:
            assert torch.equal(dm.train_set[i]["image"], center(src))
    # shapes (off by default) and CIFAR with off: the stored arrays as they are
    shapes = build_dataset("shapes", split="train", image_size=32, num_train=6, num_val=2, cache_dir=str(folder.parent))
    assert shapes.augment is None and torch.equal(shapes[3]["image"], uint8_to_tensor(shapes.images[3].numpy()))


def test_train_loader_draws_do_not_depend_on_workers_and_survive_a_resume(folder):
    kwargs = {"root": str(folder), "val_fraction": 0.25}  # 6 train images, 3 batches of 2 per epoch

    def batches(workers: int, global_step: int) -> list[torch.Tensor]:
        dm = TokzooDataModule(
            "imagefolder", SIZE, batch_size=2, num_workers=workers, dataset_kwargs=kwargs, seed=3, augment=RANDOM
        )
        dm.trainer = SimpleNamespace(global_step=global_step, accumulate_grad_batches=1, global_rank=0, world_size=1)
        dm.setup("fit")
        loader = dm.train_dataloader()
        out = []
        for epoch in range(global_step // 3, 3):
            loader.sampler.set_epoch(epoch)  # as Lightning does at each epoch start
            for b in loader:
                out.append(b["image"])
                dm.trainer.global_step += 1  # one optimizer step per batch: the sampler reads its position from it
        return out

    uninterrupted = batches(0, 0)
    assert len(uninterrupted) == 9
    with_workers = batches(2, 0)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, with_workers, strict=True))
    resumed = batches(0, 4)  # from the second batch of epoch 1
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted[4:], resumed, strict=True))

    def images(epoch: int) -> set[tuple[float, ...]]:
        return {tuple(im.flatten().tolist()) for b in uninterrupted[3 * epoch : 3 * epoch + 3] for im in b}

    # the loader asks for (epoch, index): the same six images come out augmented anew each epoch
    assert len(images(0)) == 6 and images(0) != images(1) and images(1) != images(2)


# ---------------------------------------------------------------- webdataset and CIFAR


def write_shards(root: Path, shards: int = 2, per_shard: int = 3) -> str:
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(root / f"shard-{s}.tar", "w") as tar:
            for i in range(per_shard):
                png = io.BytesIO()
                textured((28, 20), seed=100 * s + i).save(png, format="PNG")
                for ext, data in {"png": png.getvalue(), "txt": f"sample {i} of {s}".encode()}.items():
                    info = tarfile.TarInfo(f"s{s}_{i}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(root / f"shard-{{0..{shards - 1}}}.tar")


def test_webdataset_train_augments_per_epoch_and_val_is_fixed(tmp_path):
    urls = write_shards(tmp_path / "wds", shards=3)
    aug = Augment(**RANDOM, seed=1)

    def by_caption(ds) -> dict[str, torch.Tensor]:
        return {s["caption"]: s["image"] for s in ds}  # one __iter__ = one epoch

    train = build_dataset("webdataset", urls=urls, split="train", image_size=SIZE, shuffle_buffer=0, augment=aug)
    epochs = [by_caption(train) for _ in range(4)]
    assert sorted(epochs[0]) == sorted(epochs[1]) and len(epochs[0]) == 6
    assert any(len({tuple(e[c].flatten().tolist()) for e in epochs}) > 1 for c in epochs[0])
    fresh = build_dataset("webdataset", urls=urls, split="train", image_size=SIZE, shuffle_buffer=0, augment=aug)
    assert all(torch.equal(v, epochs[0][k]) for k, v in by_caption(fresh).items())  # reproducible
    val = build_dataset("webdataset", urls=urls, split="val", image_size=SIZE, augment=aug)
    assert val.augment is None
    once, twice = by_caption(val), by_caption(val)
    assert all(torch.equal(once[k], twice[k]) for k in once) and len(once) == 3
    assert torch.equal(once["sample 0 of 2"], center(textured((28, 20), seed=200)))


def test_cifar_train_flips_and_val_keeps_the_images(tmp_path):
    kwargs = DATASETS.example("cifar10", tmp_path)  # random 32x32 images in the official layout
    aug = Augment(crop="random", flip=True, resize_short=1.0, seed=0)
    train = build_dataset("cifar10", split="train", image_size=32, augment=aug, **kwargs)
    for i in range(len(train)):
        original = uint8_to_tensor(train.images[i])
        draws = [train[(epoch, i)]["image"] for epoch in range(10)]
        plain = sum(torch.equal(d, original) for d in draws)
        mirrored = sum(torch.equal(d, original.flip(2)) for d in draws)
        assert plain + mirrored == 10 and plain and mirrored, f"item {i}: {plain} plain, {mirrored} mirrored of 10"
    val = build_dataset("cifar10", split="val", image_size=32, augment=aug, **kwargs)
    assert all(torch.equal(val[i]["image"], uint8_to_tensor(val.images[i])) for i in range(len(val)))


# ---------------------------------------------------------------- config: defaults per dataset, bad values


def resolved(**data) -> dict:
    return resolve(merge(defaults(), {"data": data}))


@pytest.mark.parametrize("name", ["imagefolder", "captions", "webdataset", "cifar10", "cifar100"])
def test_photo_datasets_augment_by_default_and_the_params_say_so(name):
    config = resolved(name=name)
    assert config["data"]["augment"] == {"crop": "random", "flip": True, "resize_short": 1.0}
    flat = flatten(config)
    assert (flat["data.augment.crop"], flat["data.augment.flip"]) == ("random", True)  # logged as MLflow params


def test_shapes_is_not_augmented_by_default(tmp_path):
    assert resolved(name="shapes")["data"]["augment"] == OFF
    assert train_augment("shapes", OFF, seed=0) is None
    assert resolved(augment=None)["data"]["augment"] == OFF  # null = off
    # a flip is fine once the captions no longer name positions; then the train split mirrors
    config = resolved(kwargs={"captions": "shape"}, augment={"flip": True})
    assert config["data"]["augment"] == {"crop": "center", "flip": True, "resize_short": 1.0}
    aug = train_augment("shapes", config["data"]["augment"], seed=0)
    kwargs = {"num_train": 4, "num_val": 2, "cache_dir": str(tmp_path), "captions": "shape"}
    ds = build_dataset("shapes", split="train", image_size=32, augment=aug, **kwargs)
    original = uint8_to_tensor(ds.images[0].numpy())
    draws = [ds[(epoch, 0)]["image"] for epoch in range(10)]
    assert {torch.equal(d, original) for d in draws} == {True, False}
    assert all(torch.equal(d, original) or torch.equal(d, original.flip(2)) for d in draws)


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"augment": {"crop": "diagonal"}}, ["data.augment.crop", "diagonal", "random, center"]),
        ({"augment": {"flip": "maybe"}}, ["data.augment.flip", "maybe"]),
        ({"augment": {"resize_short": 0.5}}, ["data.augment.resize_short", "0.5", "[1, 4]"]),
        ({"augment": {"resize_short": True}}, ["data.augment.resize_short"]),
        ({"augment": 5}, ["data.augment", "mapping"]),
        ({"augment": {"rotate": 10}}, ["data.augment.rotate", "crop, flip, resize_short"]),
        ({"kwargs": {"augment": {}}}, ["data.kwargs.augment", "data.augment"]),
        ({"augment": {"flip": True}}, ["shapes", "left/right", "data.augment.flip=false"]),
    ],
)
def test_bad_augment_values_are_one_config_error(data, named):
    with pytest.raises(ConfigError) as err:
        resolved(**data)
    for text in named:
        assert text in str(err.value), f"{text!r} not in: {err.value}"


def test_bad_augment_value_exits_2_from_the_command(tmp_path, capsys):
    from tokzoo.cli import main

    (tmp_path / "run.yaml").write_text("data: {name: imagefolder, kwargs: {root: /nowhere}}\n")
    assert main(["fit", str(tmp_path / "run.yaml"), "data.augment.crop=diagonal"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "data.augment.crop" in err and len(err.strip().splitlines()) == 1


def test_a_dataset_that_cannot_augment_is_refused(monkeypatch):
    monkeypatch.setattr(DATASETS, "get", lambda name: lambda split, image_size: None)
    with pytest.raises(ConfigError, match="takes no augment argument.*data.augment=null"):
        train_augment("mine", RANDOM, seed=0)
    assert train_augment("mine", OFF, seed=0) is None  # off asks nothing of the dataset
