"""The `webdataset` reader (on the webdataset library): brace patterns, held-out val shard, truncated and corrupt
shards, the split across DataLoader workers and DDP ranks (decided at iteration time), equal per-rank counts of full
batches with unreadable samples replaced, epochs that reach persistent workers, mid-epoch resume, and URLs: a
loopback HTTP server, pipe:, unreachable and missing shards. 2 DDP ranks over HTTP: test_webdataset_stream.py."""

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
from tokzoo.errors import ConfigError, DataError


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
    # the corrupt jpg, counted, not fatal; the library also hands on the cut shard's last, partial sample (here one
    # without its .txt), which is skipped and counted too
    assert sum(b["skipped"] for b in batches) == 2
    assert "s7_0001.jpg" in caplog.text and "s7_0004: no .txt caption" in caplog.text
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


def test_webdataset_missing_shards_and_bad_kwargs(tmp_path, shards):
    with pytest.raises(DataError, match="val-99.tar"):
        build_dataset("webdataset", urls=str(shards / "train-00.tar"), val_urls=str(shards / "val-99.tar"), split="val")
    with pytest.raises(ConfigError, match="storage_options"):
        build_dataset("webdataset", urls=str(shards / "train-{00..01}.tar"), storage_options="anon")


def _epoch_batches(ds, epoch: int, resume: int = 0, **loader_kw) -> list[list[str]]:
    ds.set_epoch(epoch, resume)
    loader = torch.utils.data.DataLoader(ds, batch_size=ds.batch_size, collate_fn=collate_samples, **loader_kw)
    return [b["caption"] for b in loader]


def test_webdataset_train_batches_are_full_and_count_the_replaced_sample(shards, monkeypatch):
    for s in range(2):  # a corrupt jpg at the same place of both shards: the count is known whatever the shard order
        _write_shard(shards / f"bad-{s:02d}.tar", 7 + s, 5, corrupt=2)
    urls = str(shards / "bad-{00..01}.tar")
    ds = build_dataset("webdataset", urls=urls, val_urls=str(shards / "val-00.tar"), samples_per_epoch=22,
                       shuffle_buffer=0)  # fmt: skip
    ds.set_batch_size(3)
    for rank in range(2):
        monkeypatch.setattr(wds_mod, "rank_world", lambda *_, r=rank: (r, 2))
        assert len(ds) == 9  # 22 // 2 = 11 samples: 3 whole batches of 3
        batches = list(torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_samples))
        assert [len(b["caption"]) for b in batches] == [3, 3, 3]  # full, although every pass holds a corrupt jpg
        # 9 good samples = 4 + 4 (two passes over the rank's shard, one corrupt jpg each) + 1 of a third pass
        assert sum(b["skipped"] for b in batches) == 2


def test_webdataset_epoch_reaches_persistent_workers_and_resume_continues_the_order(shards):
    kw = {"urls": str(shards / "train-{00..03}.tar"), "val_urls": str(shards / "val-00.tar"), "image_size": 8}
    ds = build_dataset("webdataset", **kw, samples_per_epoch=18, shuffle_buffer=4, seed=5)
    ds.set_batch_size(2)  # 9 batches an epoch: workers 0 and 1 make batches 0, 2, ... and 1, 3, ...
    fresh = {e: _epoch_batches(ds, e, num_workers=2) for e in (0, 1)}
    assert all(len(b) == 2 for e in fresh for b in fresh[e]) and len(fresh[0]) == 9
    assert fresh[0] != fresh[1]  # a new epoch, a new order
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_samples, num_workers=2,
                                         persistent_workers=True)  # fmt: skip
    for epoch in (0, 1, 0):  # workers started once: set_epoch reaches them through shared memory
        ds.set_epoch(epoch)
        assert [b["caption"] for b in loader] == fresh[epoch]
    for resume in (3, 4):  # continue epoch 1 after its first k batches, in the uninterrupted order
        assert _epoch_batches(ds, 1, resume, num_workers=2) == fresh[1][resume:]
    assert _epoch_batches(ds, 1, 5) == _epoch_batches(ds, 1)[5:]  # no workers: the same


def test_webdataset_under_ddp_needs_samples_per_epoch(shards):
    from types import SimpleNamespace

    from tokzoo.lit.datamodule import TokzooDataModule

    kwargs = {"urls": str(shards / "train-{00..03}.tar"), "val_urls": str(shards / "val-00.tar")}
    dm = TokzooDataModule("webdataset", image_size=8, batch_size=4, dataset_kwargs=kwargs)
    dm.trainer = SimpleNamespace(global_step=0, accumulate_grad_batches=1, global_rank=0, world_size=2)
    with pytest.raises(ConfigError, match="samples_per_epoch"):
        dm.train_dataloader()
    dm = TokzooDataModule("webdataset", image_size=8, batch_size=4, dataset_kwargs={**kwargs, "samples_per_epoch": 6})
    dm.trainer = SimpleNamespace(global_step=0, accumulate_grad_batches=1, global_rank=0, world_size=2)
    with pytest.raises(ConfigError, match="fewer samples than one batch"):
        dm.train_dataloader()


# ---------------------------------------------------------------- URLs


@pytest.fixture()
def http_root(shards):
    """The shards folder served over HTTP on 127.0.0.1 (a free port), in a thread of this process."""
    import functools
    import http.server
    import threading

    handler = functools.partial(_QuietHandler, directory=str(shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(__import__("http.server").server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass


def test_webdataset_reads_http_and_pipe_urls(shards, http_root):
    local = sorted(_captions(build_dataset("webdataset", urls=str(shards / "train-{00..03}.tar"),
                                           val_urls=str(shards / "val-00.tar"))))  # fmt: skip
    over_http = build_dataset("webdataset", urls=http_root + "/train-{00..03}.tar", val_urls=http_root + "/val-00.tar")
    assert sorted(_captions(over_http)) == local and len(local) == 20
    val = build_dataset("webdataset", urls=http_root + "/train-00.tar", val_urls=http_root + "/val-00.tar", split="val")
    assert len(_captions(val)) == 4
    piped = build_dataset(
        "webdataset", urls=[f"pipe:cat {shards / 'train-00.tar'}"], val_urls=str(shards / "val-00.tar")
    )
    assert sorted(_captions(piped)) == [f"caption s0_{i:04d}" for i in range(5)]


def test_webdataset_unreachable_or_missing_url_is_a_data_error(http_root):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/shard-{{0..1}}.tar"
    with pytest.raises(DataError, match="cannot be opened.*check the URL"):
        build_dataset("webdataset", urls=dead)
    with pytest.raises(DataError, match="nope-0.tar"):
        build_dataset("webdataset", urls=http_root + "/nope-{0..1}.tar")


def test_webdataset_s3_without_its_fsspec_backend_says_what_to_install():
    pytest.importorskip("fsspec")
    try:
        import s3fs  # noqa: F401

        pytest.skip("s3fs is installed: opening s3:// would go to the network")
    except ImportError:
        pass
    with pytest.raises(DataError, match="s3fs"):
        build_dataset("webdataset", urls="s3://some-bucket/shard-{0..1}.tar")
