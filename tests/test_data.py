"""The data layer: the embedded shapes set, the file readers, corrupt-sample handling, the DataModule (webdataset:
test_webdataset.py; what every dataset yields: test_contracts.py)."""

from __future__ import annotations

import io
import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokzoo.data import build_dataset, collate_samples, list_datasets
from tokzoo.data import shapes as shapes_mod
from tokzoo.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # never touch the user's ~/.cache/tokzoo from tests
    monkeypatch.setenv("TOKZOO_CACHE", str(tmp_path / "cache"))


def _shapes(tmp_path: Path, split: str = "train", **kw):
    kw = {"num_train": 48, "num_val": 24, "seed": 0, "cache_dir": str(tmp_path / "c"), **kw}
    return build_dataset("shapes", split=split, image_size=kw.pop("image_size", 32), **kw)


def _png_bytes(color: tuple[int, int, int], size=(20, 14), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


# ---------------------------------------------------------------- registry and collate


def test_all_datasets_registered():
    assert set(list_datasets()) >= {"shapes", "imagefolder", "captions", "webdataset", "cifar10", "cifar100"}


def test_collate_drops_none_and_counts_them():
    item = {"image": torch.zeros(3, 8, 8), "caption": "x", "label": 3}
    batch = collate_samples([item, None, item, None])
    assert batch["image"].shape == (2, 3, 8, 8)
    assert batch["caption"] == ["x", "x"]
    assert batch["label"].dtype == torch.long and batch["label"].tolist() == [3, 3]
    assert batch["skipped"] == 2
    empty = collate_samples([None])
    assert empty["image"].shape[0] == 0 and empty["skipped"] == 1
    # a replacement carries the number of unreadable samples it stands in for
    assert collate_samples([item, {**item, "skipped": 2}])["skipped"] == 2


# ---------------------------------------------------------------- shapes


def test_shapes_generator_is_deterministic_in_seed():
    a_img, a_att = shapes_mod.generate_shapes(40, 32, seed=7)
    b_img, b_att = shapes_mod.generate_shapes(40, 32, seed=7)
    c_img, c_att = shapes_mod.generate_shapes(40, 32, seed=8)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_att, b_att)
    assert not np.array_equal(a_img, c_img) and not np.array_equal(a_att, c_att)


def test_shapes_caption_styles_name_the_shape_and_say_what_they_promise(tmp_path):
    full, obj, shape = (_shapes(tmp_path, captions=style) for style in ("full", "object", "shape"))
    assert torch.equal(full.images, obj.images) and full.labels == obj.labels == shape.labels  # same cache
    for i, label in enumerate(full.labels):
        name = full.class_names[label]
        color = obj.captions[i].split()[1]
        assert shape.captions[i] == f"a {name}" and obj.captions[i] == f"a {color} {name}"
        assert color in shapes_mod.COLORS and f"{color} {name}" in full.captions[i]
    # prompts follow the caption style: ensembled over colours for `object`
    assert obj.prompt_templates == [f"a {c} {{}}" for c in shapes_mod.COLORS] and shape.prompt_templates == ["a {}"]
    assert full.prompt_templates == shapes_mod.default_templates("full")  # caption grammar: tests/test_attributes.py
    with pytest.raises(ConfigError, match="captions must be one of"):
        _shapes(tmp_path, captions="long")


def test_shapes_items_range_shape_and_captions(tmp_path):
    ds = _shapes(tmp_path)
    assert len(ds) == 48 and len(ds.class_names) >= 8
    assert all(t.count("{}") == 1 for t in ds.prompt_templates)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    assert images.shape == (48, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert images.min() < -0.8 and images.max() > 0.8  # uses the range, not a squashed slice of it
    assert images.std(dim=(2, 3)).mean() > 0.05  # images are not flat colour fields
    for i in range(len(ds)):
        item = ds[i]
        assert isinstance(item["label"], int) and 0 <= item["label"] < len(ds.class_names)
        assert ds.class_names[item["label"]] in item["caption"].split()
        assert "background" in item["caption"]
    assert len(set(ds.captions)) > 40  # captions vary (colour, size, position, background)
    assert len({ds[i]["label"] for i in range(len(ds))}) >= 6


def test_shapes_64px_and_splits_differ(tmp_path):
    train = _shapes(tmp_path, "train", image_size=64)
    val = _shapes(tmp_path, "val", image_size=64)
    assert train[0]["image"].shape == (3, 64, 64) and len(val) == 24
    assert not torch.equal(train.images[:24], val.images)


def test_shapes_rejects_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="image_size"):
        _shapes(tmp_path, image_size=48)
    with pytest.raises(ConfigError, match="colour_space"):
        _shapes(tmp_path, colour_space="hsv")  # unknown kwarg, rejected by the registry
    with pytest.raises(ConfigError, match="split"):
        _shapes(tmp_path, split="test")
    with pytest.raises(ConfigError, match="num_train"):
        _shapes(tmp_path, num_train=0)


def test_shapes_cache_is_written_once_and_reused(tmp_path, monkeypatch):
    first = _shapes(tmp_path)
    files = list((tmp_path / "c" / "shapes").iterdir())
    assert [f.suffix for f in files] == [".npz"]  # no tmp files left behind
    assert f"v{shapes_mod.GENERATOR_VERSION}_" in files[0].name and "n48" in files[0].name and "px32" in files[0].name
    mtime = files[0].stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("regenerated although the cache exists")

    monkeypatch.setattr(shapes_mod, "generate_shapes", fail)
    second = _shapes(tmp_path)
    assert torch.equal(first.images, second.images) and first.captions == second.captions
    assert files[0].stat().st_mtime_ns == mtime
    with pytest.raises(AssertionError, match="regenerated"):
        _shapes(tmp_path, seed=1)  # different parameters -> different file -> generation


def test_shapes_corrupt_cache_is_regenerated(tmp_path, caplog):
    first = _shapes(tmp_path)
    (path,) = (tmp_path / "c" / "shapes").iterdir()
    path.write_bytes(b"not a zip")
    with caplog.at_level(logging.WARNING, logger="tokzoo.data"):
        again = _shapes(tmp_path)
    assert "unreadable" in caplog.text
    assert torch.equal(first.images, again.images)


# ---------------------------------------------------------------- imagefolder and captions


def _make_folder(root: Path) -> None:
    colors = {"cat": (200, 30, 30), "golden_retriever": (30, 200, 30)}
    for name, color in colors.items():
        (root / name).mkdir(parents=True)
        for i in range(3):
            (root / name / f"{i}.png").write_bytes(_png_bytes(color))
        (root / name / "3.jpg").write_bytes(_png_bytes(color, fmt="JPEG"))


def test_imagefolder_presplit_skips_corrupt_file(tmp_path, caplog):
    _make_folder(tmp_path / "data" / "train")
    _make_folder(tmp_path / "data" / "val")
    bad = tmp_path / "data" / "train" / "cat" / "broken.jpg"
    bad.write_bytes(np.random.default_rng(0).bytes(300))
    ds = build_dataset("imagefolder", root=str(tmp_path / "data"), split="train", image_size=16)
    assert ds.class_names == ["cat", "golden retriever"] and len(ds) == 9
    with caplog.at_level(logging.WARNING, logger="tokzoo.data"):
        batch = collate_samples([ds[i] for i in range(len(ds))])
    assert batch["skipped"] == 1 and batch["image"].shape == (8, 3, 16, 16)
    assert str(bad) in caplog.text
    assert sorted(set(batch["label"].tolist())) == [0, 1]
    # a red image under "cat" is labelled 0 and captioned with the class name
    cat = batch["label"] == 0
    assert (batch["image"][cat][:, 0] > 0.5).all()
    assert all("cat" in c for c, is_cat in zip(batch["caption"], cat.tolist(), strict=True) if is_cat)
    val = build_dataset("imagefolder", root=str(tmp_path / "data"), split="val", image_size=16)
    assert len(val) == 8 and val.class_names == ds.class_names


def test_imagefolder_deterministic_split(tmp_path):
    _make_folder(tmp_path / "flat")
    kw = {"root": str(tmp_path / "flat"), "image_size": 8, "val_fraction": 0.25}
    train = build_dataset("imagefolder", split="train", **kw)
    val = build_dataset("imagefolder", split="val", **kw)
    assert len(val) == 2 and len(train) == 6
    assert not set(train.paths) & set(val.paths)
    assert build_dataset("imagefolder", split="val", **kw).paths == val.paths


def test_captions_csv_and_jsonl(tmp_path):
    d = tmp_path / "pairs"
    (d / "img").mkdir(parents=True)
    for i in range(6):
        (d / "img" / f"{i}.png").write_bytes(_png_bytes((40 * i, 10, 10), size=(24, 40)))
    (d / "img" / "bad.png").write_bytes(b"\x89PNG garbage")
    lines = ["image,caption,label"] + [f"img/{i}.png,picture number {i},{'dog' if i % 2 else 'cat'}" for i in range(6)]
    (d / "train.csv").write_text("\n".join(lines + ["img/bad.png,broken,cat"]) + "\n")
    (d / "val.jsonl").write_text(
        "\n".join(json.dumps({"image": f"img/{i}.png", "caption": f"val {i}", "label": "dog"}) for i in range(2))
    )
    train = build_dataset("captions", path=str(d / "train.csv"), val_path=str(d / "val.jsonl"), image_size=16)
    val = build_dataset("captions", path=str(d / "train.csv"), val_path=str(d / "val.jsonl"), split="val")
    assert train.class_names == ["cat", "dog"] == val.class_names
    assert len(train) == 7 and len(val) == 2
    assert train[3]["caption"] == "picture number 3" and train[3]["label"] == 1
    assert train[3]["image"].shape == (3, 16, 16)
    assert train[6] is None  # the corrupt file
    assert val[0]["caption"] == "val 0" and val[0]["label"] == 1

    # no label column: labels -1, no class names; val carved out of the file deterministically
    (d / "nolabel.jsonl").write_text(
        "\n".join(json.dumps({"image": f"img/{i}.png", "caption": f"c{i}"}) for i in range(6))
    )
    tr = build_dataset("captions", path=str(d / "nolabel.jsonl"), split="train", val_fraction=0.5)
    va = build_dataset("captions", path=str(d / "nolabel.jsonl"), split="val", val_fraction=0.5)
    assert tr.class_names is None and {tr[i]["label"] for i in range(len(tr))} == {-1}
    assert sorted(tr.captions + va.captions) == [f"c{i}" for i in range(6)]


def test_cifar_arrays_are_resized_and_captioned():
    from tokzoo.data.torchvision_sets import ArrayImageDataset

    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    ds = ArrayImageDataset(images, [0, 1, 1, 0], 16, ["airplane", "automobile"], ["a photo of a {}."])
    item = ds[1]
    assert item["image"].shape == (3, 16, 16) and item["caption"] == "a photo of a automobile." and item["label"] == 1
    same = ArrayImageDataset(images, [0, 1, 1, 0], 32, ["airplane", "automobile"], ["{}"])[2]["image"]
    assert torch.equal(same, torch.from_numpy(images[2]).permute(2, 0, 1).float() / 127.5 - 1)


def test_cifar_folders_are_read_in_the_official_layout(tmp_path):

    from tokzoo.data.torchvision_sets import LAYOUTS, write_example

    for name in ("cifar10", "cifar100"):
        root = tmp_path / name
        kw = write_example(name, root)
        layout = LAYOUTS[name]
        batch_file = root / layout.folder / layout.train[-1]
        data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)  # channel-major rows, as in the tarball
        batch_file.write_bytes(pickle.dumps({"data": data, layout.labels_key: [1, 0]}))
        train = build_dataset(name, split="train", image_size=32, **kw)
        assert len(train) == 2 * len(layout.train) and train.class_names == ["airplane", "sports car", "bird"]
        assert train.labels[-2:] == [1, 0]  # batches in order: the rewritten last one ends the split
        expected = data.reshape(2, 3, 32, 32).transpose(0, 2, 3, 1)[0]
        assert np.array_equal(train.images[-2], expected)
        assert len(build_dataset(name, split="val", image_size=32, **kw)) == 2 * len(layout.val)
        with pytest.raises(ConfigError, match="which"):  # fixed by the registered name
            build_dataset(name, which="cifar10", **kw)
        batch_file.write_bytes(b"not a pickle")
        with pytest.raises(DataError, match="corrupt"):
            build_dataset(name, split="train", **kw)


# ---------------------------------------------------------------- missing data


def test_missing_roots_raise_data_error(tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(DataError, match="does-not-exist"):
        build_dataset("imagefolder", root=str(missing))
    with pytest.raises(DataError, match="does-not-exist"):
        build_dataset("captions", path=str(missing / "x.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        build_dataset("imagefolder", root=str(tmp_path / "empty"))
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        build_dataset("imagefolder", root=str(tmp_path / "noimg"))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_offline_is_a_clear_data_error(tmp_path, name):
    root = tmp_path / "cifar-root"
    with pytest.raises(DataError, match="download=true") as info:
        build_dataset(name, split="val", image_size=32, root=str(root))
    assert str(root) in str(info.value)


# ---------------------------------------------------------------- DataModule


def test_datamodule_batches(tmp_path):
    from tokzoo.lit.datamodule import TokzooDataModule

    dm = TokzooDataModule(
        "shapes",
        image_size=32,
        batch_size=8,
        val_batch_size=10,
        dataset_kwargs={"num_train": 20, "num_val": 12, "cache_dir": str(tmp_path / "dm")},
    )
    assert dm.class_names is None  # nothing built before setup
    dm.prepare_data()
    assert len(list((tmp_path / "dm" / "shapes").glob("*.npz"))) == 2
    dm.setup("fit")
    assert dm.class_names == shapes_mod.SHAPE_NAMES and "{}" in dm.prompt_templates[0]
    train = list(dm.train_dataloader())
    assert len(train) == 2  # 20 // 8 with drop_last
    batch = train[0]
    assert set(batch) == {"image", "caption", "label", "skipped"}
    assert batch["image"].shape == (8, 3, 32, 32) and len(batch["caption"]) == 8 and batch["label"].shape == (8,)
    val = list(dm.val_dataloader())
    assert [len(b["caption"]) for b in val] == [10, 2]
    assert list(dm.attribute_tasks) == ["color", "size", "position", "background"]
    assert val[0]["attributes"].shape == (10, 4)  # the val split carries the attribute tasks; train needs none
    assert [b["caption"] for b in val] == [b["caption"] for b in dm.val_dataloader()]  # deterministic
    with pytest.raises(ConfigError, match="batch_size"):
        TokzooDataModule("shapes", image_size=32, batch_size=0)


# ---------------------------------------------------------------- resumable training order


def test_resumable_sampler_continues_the_interrupted_epoch_and_leaves_the_global_rng_alone():
    from tokzoo.lit.datamodule import ResumableSampler

    data = list(range(50))

    def epoch_order(epoch: int, **kw) -> list[int]:
        sampler = ResumableSampler(data, seed=7, **kw)
        sampler.set_epoch(epoch)
        return list(sampler)

    rng_before = torch.get_rng_state()
    orders = [epoch_order(e) for e in range(3)]
    assert torch.equal(torch.get_rng_state(), rng_before)  # seed_everything on resume cannot change the order
    assert all(sorted(o) == data for o in orders) and orders[0] != orders[1] != orders[2]
    assert orders[1] == epoch_order(1)  # a function of (seed, epoch) only
    assert orders[0] != list(ResumableSampler(data, seed=8))

    resumed = ResumableSampler(data, seed=7)
    resumed.resume_at(epoch=1, consumed=20)
    assert list(resumed) == orders[1][20:]  # the rest of the interrupted epoch ...
    assert list(resumed) == orders[1]  # ... once: a second pass over the same epoch is whole again
    resumed.set_epoch(2)
    assert list(resumed) == orders[2]

    # two ranks split each epoch's permutation without overlap, and resume the same way
    ranks = [epoch_order(1, rank=r, world_size=2) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == data
    rank1 = ResumableSampler(data, seed=7, rank=1, world_size=2)
    rank1.resume_at(epoch=1, consumed=5)
    assert list(rank1) == ranks[1][5:]


def test_datamodule_resumes_the_order_from_the_trainers_step(tmp_path):
    """Lightning restores global_step before asking for the train loader: the loader continues with the batch
    after the last one trained on, in the epoch that step falls in (10 batches per epoch here, resumed at step 13),
    whatever epoch Lightning passes to set_epoch (it counts a finished run's epoch as complete, so a longer budget
    continuing that run hears epoch + 1)."""
    from types import SimpleNamespace

    from tokzoo.lit.datamodule import TokzooDataModule

    def batches(global_step: int, lightning_epoch: int) -> list[list[int]]:
        dm = TokzooDataModule(
            "shapes", image_size=32, batch_size=4, seed=3,
            dataset_kwargs={"num_train": 40, "num_val": 4, "cache_dir": str(tmp_path)},
        )  # fmt: skip
        dm.trainer = SimpleNamespace(global_step=global_step, accumulate_grad_batches=1, global_rank=0, world_size=1)
        dm.setup("fit")
        loader = dm.train_dataloader()
        out = []
        for epoch in (lightning_epoch, lightning_epoch + 1):
            loader.sampler.set_epoch(epoch)  # as Lightning does at each epoch start
            for b in loader:
                out.append(b["image"].flatten(1)[:, :8].tolist())
                dm.trainer.global_step += 1  # one optimizer step per batch
        return out

    uninterrupted = batches(0, 0)  # epochs 0 and 1
    resumed = batches(13, 1)  # the rest of epoch 1, then epoch 2
    continued = batches(13, 2)  # the same, with Lightning one epoch ahead
    assert len(uninterrupted) == 20 and len(resumed) == len(continued) == 7 + 10
    assert resumed[:7] == uninterrupted[13:] and continued == resumed
    assert resumed[7:] != uninterrupted[10:]  # epoch 2 is a new permutation, not a replay of epoch 1


# ---------------------------------------------------------------- DDP-safe loaders: full train batches, exact val


def _fake_trainer(rank: int = 0, world_size: int = 1):
    from types import SimpleNamespace

    return SimpleNamespace(global_step=0, accumulate_grad_batches=1, global_rank=rank, world_size=world_size)


def test_train_loader_replaces_an_unreadable_image_and_keeps_batches_full(tmp_path, caplog):
    from tokzoo.lit.datamodule import TokzooDataModule

    _make_folder(tmp_path / "data" / "train")
    _make_folder(tmp_path / "data" / "val")
    (tmp_path / "data" / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    dm = TokzooDataModule("imagefolder", image_size=16, batch_size=3, dataset_kwargs={"root": str(tmp_path / "data")})
    dm.trainer = _fake_trainer()
    dm.setup("fit")
    assert len(dm.train_set) == 9 and dm.train_set[list(map(str, dm.train_set.paths)).index(
        str(tmp_path / "data" / "train" / "cat" / "broken.jpg"))] is None  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="tokzoo.data"):
        batches = list(dm.train_dataloader())
    assert [b["image"].shape[0] for b in batches] == [3, 3, 3]  # 9 items, one unreadable: still 3 full batches
    assert sum(b["skipped"] for b in batches) == 1 and "broken.jpg" in caplog.text

    from tokzoo.data.common import ReplaceUnreadable

    wrapped = ReplaceUnreadable(dm.train_set)
    bad = [i for i in range(len(dm.train_set)) if dm.train_set[i] is None]
    assert bad and wrapped[bad[0]]["caption"] == dm.train_set[(bad[0] + 1) % 9]["caption"]  # the next item
    assert wrapped[(0, bad[0])]["skipped"] == 1  # (epoch, index) keys too


def test_val_loader_splits_without_padding(tmp_path):
    from tokzoo.lit.datamodule import TokzooDataModule, ValSplitSampler

    assert [list(ValSplitSampler(range(9), rank=r, world_size=2)) for r in range(2)] == [[0, 2, 4, 6, 8], [1, 3, 5, 7]]
    kwargs = {"num_train": 8, "num_val": 9, "cache_dir": str(tmp_path)}
    seen = []
    for rank in range(2):
        dm = TokzooDataModule("shapes", image_size=32, batch_size=4, dataset_kwargs=kwargs)
        dm.trainer = _fake_trainer(rank, 2)
        seen.append([len(b["caption"]) for b in dm.val_dataloader()])
    assert seen == [[4, 1], [4]]  # 9 images scored once each; ranks may hold different numbers of batches
    dm = TokzooDataModule("shapes", image_size=32, batch_size=4, dataset_kwargs={**kwargs, "num_val": 2})
    dm.trainer = _fake_trainer(0, 3)
    with pytest.raises(ConfigError, match="fewer than the 3 ranks"):
        dm.val_dataloader()
