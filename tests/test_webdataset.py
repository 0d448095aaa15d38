"""The `webdataset` reader: brace patterns, held-out val shard, truncated and corrupt shards, the split across
DataLoader workers and DDP ranks (decided at iteration time), equal per-rank counts."""

from __future__ import annotations

import io
import logging
import pickle
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from tokzoo.data import build_dataset, collate_samples
from tokzoo.data import webdataset as wds_mod
from tokzoo.errors import DataError


def _png_bytes(color: tuple[int, int, int], size=(20, 14), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def _write_shard(path: Path, shard: int, n: int, corrupt: int | None = None) -> None:
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            key = f"s{shard}_{i:04d}"
            jpg = b"\xff\xd8 not a jpeg" if i == corrupt else _png_bytes((10 * i, 50, 90), fmt="JPEG")
            for ext, data in (("jpg", jpg), ("txt", f"caption {key}".encode()), ("cls", str(i % 3).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture()
def shards(tmp_path) -> Path:
    d = tmp_path / "shards"
    d.mkdir()
    for s in range(4):
        _write_shard(d / f"train-{s:02d}.tar", s, 5)
    _write_shard(d / "val-00.tar", 9, 4)
    return d


def _captions(dataset, **loader_kw) -> list[str]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate_samples, **loader_kw)
    return [c for batch in loader for c in batch["caption"]]


def test_webdataset_reads_brace_pattern_and_val(shards):
    ds = build_dataset(
        "webdataset",
        urls=str(shards / "train-{00..03}.tar"),
        val_urls=str(shards / "val-00.tar"),
        image_size=16,
    )
    items = [it for it in ds if it is not None]
    assert len(items) == 20 and items[0]["image"].shape == (3, 16, 16)
    assert {it["label"] for it in items} == {0, 1, 2}
    assert all(it["caption"].startswith("caption s") for it in items)
    val = build_dataset(
        "webdataset", urls=str(shards / "train-00.tar"), val_urls=str(shards / "val-00.tar"), split="val"
    )
    assert sorted(it["caption"] for it in val) == [f"caption s9_{i:04d}" for i in range(4)]  # one pass, in order
    # without val_urls the last shard is held out
    held = build_dataset("webdataset", urls=str(shards / "train-{00..03}.tar"), split="val")
    assert held.shards == [str(shards / "train-03.tar")]


def test_webdataset_truncated_shard_and_corrupt_sample(shards, caplog):
    _write_shard(shards / "bad-00.tar", 7, 6, corrupt=1)
    raw = (shards / "bad-00.tar").read_bytes()
    (shards / "bad-00.tar").write_bytes(raw[: len(raw) // 2])  # truncated mid-shard
    urls = [str(shards / "bad-00.tar"), str(shards / "train-00.tar")]
    ds = build_dataset("webdataset", urls=urls, val_urls=str(shards / "val-00.tar"), shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="tokzoo.data"):
        loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_samples)
        batches = list(loader)
    caps = [c for b in batches for c in b["caption"]]
    assert sum(b["skipped"] for b in batches) == 1  # the corrupt jpg, counted, not fatal
    assert "truncated" in caplog.text and "bad-00.tar" in caplog.text
    assert {f"caption s0_{i:04d}" for i in range(5)} <= set(caps)  # the next shard is read in full
    assert 0 < sum(c.startswith("caption s7") for c in caps) < 5  # part of the truncated shard survives


def test_webdataset_splits_by_worker_and_rank(shards, monkeypatch):
    kw = {"urls": str(shards / "train-{00..03}.tar"), "val_urls": str(shards / "val-00.tar"), "image_size": 8}
    everything = sorted(_captions(build_dataset("webdataset", **kw)))
    assert len(everything) == 20
    # two DataLoader workers: each sample exactly once
    assert sorted(_captions(build_dataset("webdataset", **kw), num_workers=2)) == everything
    # two ranks (decided when iteration starts, not at construction): disjoint halves of everything
    ds = build_dataset("webdataset", **kw)
    per_rank = []
    for rank in range(2):
        monkeypatch.setattr(wds_mod, "rank_world", lambda *_, r=rank: (r, 2))
        ds.set_epoch(0)  # each rank's own copy would be at the same epoch
        per_rank.append(_captions(ds))
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == everything
    # fewer shards than ranks x workers: sample-level split, still exact
    one = build_dataset("webdataset", urls=[str(shards / "train-00.tar")], val_urls=kw["val_urls"])
    split = []
    for rank in range(2):
        monkeypatch.setattr(wds_mod, "rank_world", lambda *_, r=rank: (r, 2))
        split.append(_captions(one))
    assert sorted(split[0] + split[1]) == [f"caption s0_{i:04d}" for i in range(5)] and len(split[0]) == 3


def test_webdataset_spawned_worker_keeps_the_parent_rank(shards, monkeypatch):
    # spawn/forkserver DataLoader workers do not inherit the process group: the pickled copy carries the rank
    kw = {"urls": str(shards / "train-{00..03}.tar"), "val_urls": str(shards / "val-00.tar"), "image_size": 8}
    ds = build_dataset("webdataset", **kw)
    with monkeypatch.context() as m:
        m.setattr(wds_mod, "rank_world", lambda *_: (1, 2))
        in_worker = pickle.loads(pickle.dumps(ds))
    alone = _captions(build_dataset("webdataset", **kw))
    got = _captions(in_worker)
    assert len(got) == 10 and set(got) < set(alone)


def test_webdataset_samples_per_epoch_gives_equal_counts(shards, monkeypatch):
    ds = build_dataset(
        "webdataset",
        urls=[str(shards / "train-00.tar")],
        val_urls=str(shards / "val-00.tar"),
        samples_per_epoch=14,
    )
    counts = []
    for rank in range(2):
        monkeypatch.setattr(wds_mod, "rank_world", lambda *_, r=rank: (r, 2))
        counts.append(len(_captions(ds)))
        assert len(ds) == 7
    assert counts == [7, 7]  # rank 1 has only 2 samples per pass and cycles; rank 0 has 3


def test_webdataset_missing_shards(tmp_path, shards):
    with pytest.raises(DataError, match="nope-0.tar"):
        build_dataset("webdataset", urls=str(tmp_path / "nope-{0..1}.tar"))
    with pytest.raises(DataError, match="val_urls"):
        build_dataset("webdataset", urls=str(shards / "train-00.tar"))
