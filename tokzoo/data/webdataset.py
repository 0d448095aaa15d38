"""`webdataset`: image-text pairs streamed from tar shards (WebDataset / DataComp layout).

A shard holds files named <key>.<ext>; consecutive files with the same key form one sample (jpg/jpeg/png/
webp image, txt caption, optional cls integer label). Read with Python's tarfile rather than the
`webdataset` package because the behaviour we need is small and must be exact: which rank/worker reads
what (decided at iteration time), an equal number of samples per rank when asked (otherwise DDP ranks
that run out early hang the others), corrupt images yielded as None so collate_samples counts them, and
a truncated shard ending with a warning while the next shard goes on. The package's defaults for these
changed across its 0.2 / 1.x releases, so we would be pinning and overriding most of it anyway.

Splitting: with at least as many shards as consumers (ranks x workers), each consumer reads whole
shards (shards[rank::world][worker::workers]); with fewer, every consumer reads every shard and keeps
every C-th sample, so small datasets still split exactly.
"""

from __future__ import annotations

import io
import os
import random
import tarfile
from collections.abc import Iterator
from pathlib import Path

import torch
from braceexpand import braceexpand
from PIL import Image

from tokzoo import distributed
from tokzoo.data.common import (
    DATASETS,
    PHOTO_TEMPLATES,
    Sample,
    check_image_size,
    check_split,
    check_templates,
    load_image,
    log,
    warn_once,
)
from tokzoo.data.transforms import Augment, active
from tokzoo.errors import ConfigError, DataError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def expand_urls(urls: str | list[str]) -> list[str]:
    """Shard paths from a brace pattern ("shards/{00000..00009}.tar") or a list of paths / patterns."""
    patterns = [urls] if isinstance(urls, str) else list(urls)
    return [str(Path(u).expanduser()) for pattern in patterns for u in braceexpand(str(pattern))]


def rank_world(parent: tuple[int, int] | None = None) -> tuple[int, int]:
    """Node rank and world size, read when iteration starts (the process group exists by then).

    `parent` is what the main process saw when it pickled the dataset for a spawn/forkserver DataLoader
    worker: such workers do not inherit the process group (forked ones do), and Lightning's DDP launcher
    does not export RANK.
    """
    if distributed.initialized():
        return distributed.rank_world()
    if parent is not None:
        return parent
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def worker_id_count() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")  # gzip, bz2, xz, zstd


def _missing_end_marker(path: str) -> bool:
    """True if an uncompressed tar lacks its trailing zero blocks, i.e. was cut short.

    Needed because tarfile ends quietly when a file is cut at a header boundary; it only raises when the
    cut falls inside a member's data. Compressed shards raise on truncation by themselves (EOFError).
    """
    with open(path, "rb") as f:
        if f.read(6).startswith(_COMPRESSED_MAGIC):
            return False
        size = f.seek(0, os.SEEK_END)
        if size < 1024 or size % 512:
            return True
        f.seek(size - 1024)
        return f.read(1024) != bytes(1024)


def read_shard(path: str) -> Iterator[dict[str, bytes | str]]:
    """Yield {"__key__": key, ext: bytes, ...} per sample of one tar. A truncated or corrupt shard stops with
    a warning; its last, possibly incomplete, sample is dropped and the caller goes on to the next shard."""
    key, sample, count = None, {}, 0
    try:
        truncated = _missing_end_marker(path)
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                folder, base = os.path.split(member.name)
                if not member.isfile() or base.startswith(".") or "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                if os.path.join(folder, stem) != key:
                    if sample:
                        yield sample
                        count += 1
                    key = os.path.join(folder, stem)
                    sample = {"__key__": key}
                sample[ext.lower()] = data
    except (tarfile.TarError, OSError, EOFError) as exn:
        log.warning(
            "shard %s is corrupt or truncated after %d samples (%s); going on with the next shard",
            path,
            count,
            exn,
        )
        return
    if truncated:
        log.warning(
            "shard %s is truncated (no end-of-archive blocks) after %d samples; going on with the next shard",
            path,
            count,
        )
        return
    if sample:
        yield sample


class WebDatasetShards(torch.utils.data.IterableDataset):
    """Streams samples from tar shards; splits itself across DDP ranks and DataLoader workers.

    samples_per_epoch (train only): every rank yields exactly samples_per_epoch // world_size items per epoch
    (cycling over its shards as needed), so DDP ranks stay in step; else (and for val) one pass.
    augment (train only): a sample's draws come from (seed, epoch, pass, shard, key), whichever worker decodes it.
    """

    def __init__(
        self,
        shards: list[str],
        image_size: int,
        shuffle: bool,
        samples_per_epoch: int | None,
        shuffle_buffer: int,
        seed: int,
        class_names: list[str] | None,
        prompt_templates: list[str],
        augment: Augment | None = None,
    ):
        self.shards = shards
        self.image_size = image_size
        self.shuffle = shuffle
        self.samples_per_epoch = samples_per_epoch
        self.shuffle_buffer = shuffle_buffer if shuffle else 0
        self.seed = seed
        self.class_names = class_names
        self.prompt_templates = prompt_templates
        self.augment = augment
        self.epoch = 0  # advanced by each __iter__ (persistent workers keep their own copy in step)
        self._parent_rank_world: tuple[int, int] | None = None

    def __getstate__(self) -> dict:
        # pickled in the main process when DataLoader workers are spawned: carry its rank along
        return {**self.__dict__, "_parent_rank_world": rank_world()}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.samples_per_epoch is None:
            raise TypeError("webdataset without samples_per_epoch has no length")
        return self.samples_per_epoch // rank_world(self._parent_rank_world)[1]

    def decode(self, raw: dict[str, bytes | str], shard: str, epoch: int = 0, rnd: int = 0) -> Sample | None:
        where = f"{shard}:{raw['__key__']}"
        image_key = next((k for k in IMAGE_KEYS if k in raw), None)
        if image_key is None:
            warn_once(where, f"skipping sample {where}: no image ({'/'.join(IMAGE_KEYS)})")
            return None
        label = -1
        if "cls" in raw:
            try:
                label = int(bytes(raw["cls"]).decode().strip())
            except ValueError:
                warn_once(where + ".cls", f"sample {where} has a non-integer .cls; using label -1")
        if "txt" in raw:
            caption = bytes(raw["txt"]).decode("utf-8", errors="replace").strip()
        elif self.class_names is not None and 0 <= label < len(self.class_names):
            caption = self.prompt_templates[0].format(self.class_names[label])
        else:
            warn_once(where, f"skipping sample {where}: no .txt caption")
            return None
        rng = self.augment.rng(epoch, rnd, shard, str(raw["__key__"])) if active(self.augment) else None
        image = load_image(bytes(raw[image_key]), self.image_size, f"{where}.{image_key}", self.augment, rng)
        if image is None:
            return None
        return {"image": image, "caption": caption, "label": label}

    def _pass(self, rank: int, world: int, wid: int, nw: int, epoch: int, rnd: int) -> Iterator[Sample | None]:
        """One pass over this (rank, worker)'s share of the shards."""
        shards = list(self.shards)
        if self.shuffle:  # the same order on every rank and worker: seeded by (seed, epoch, pass) only
            random.Random(f"{self.seed}/{epoch}/{rnd}").shuffle(shards)
        consumer, consumers = rank * nw + wid, world * nw
        if len(shards) >= consumers:
            for shard in shards[rank::world][wid::nw]:
                for raw in read_shard(shard):
                    yield self.decode(raw, shard, epoch, rnd)
            return
        index = 0
        for shard in shards:
            for raw in read_shard(shard):
                if index % consumers == consumer:  # decode only our share
                    yield self.decode(raw, shard, epoch, rnd)
                index += 1

    def __iter__(self) -> Iterator[Sample | None]:
        rank, world = rank_world(self._parent_rank_world)
        wid, nw = worker_id_count()
        epoch, self.epoch = self.epoch, self.epoch + 1
        if self.samples_per_epoch is None:
            if world > 1 and self.shuffle and rank == 0 and wid == 0:
                warn_once(
                    "wds-uneven",
                    "webdataset training under DDP without samples_per_epoch: ranks may get different "
                    "numbers of samples and hang at the end of an epoch; set samples_per_epoch",
                )
            items = self._pass(rank, world, wid, nw, epoch, 0)
        else:
            per_rank = self.samples_per_epoch // world
            items = self._cycle(rank, world, wid, nw, epoch, quota=per_rank // nw + (wid < per_rank % nw))
        rng = random.Random(f"{self.seed}/{epoch}/{rank}/{wid}")
        yield from _shuffled(items, self.shuffle_buffer, rng)

    def _cycle(self, rank: int, world: int, wid: int, nw: int, epoch: int, quota: int) -> Iterator[Sample | None]:
        """Exactly `quota` items, starting new (reshuffled) passes over the shards as needed."""
        produced, rnd = 0, 0
        while produced < quota:
            before = produced
            for item in self._pass(rank, world, wid, nw, epoch, rnd):
                yield item
                produced += 1
                if produced >= quota:
                    return
            if produced == before:
                raise DataError(f"webdataset shards gave no samples to rank {rank} worker {wid}: {self.shards}")
            rnd += 1


def _shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Approximate shuffle of a stream with a buffer of `size` items (0 = keep the order)."""
    if size <= 1:
        yield from items
        return
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


def _example(folder: Path) -> dict:
    """Two shards of three jpg+txt+cls samples, named by a brace pattern; the last shard is the val split."""
    root = folder / "webdataset"
    root.mkdir(parents=True, exist_ok=True)
    for shard in range(2):
        with tarfile.open(root / f"shard-{shard}.tar", "w") as tar:
            for i in range(3):
                jpg = io.BytesIO()
                Image.new("RGB", (20, 14), (80 * i, 60 * shard, 120)).save(jpg, format="JPEG")
                fields = {"jpg": jpg.getvalue(), "txt": f"sample {i} of shard {shard}".encode(), "cls": str(i).encode()}
                for ext, data in fields.items():
                    info = tarfile.TarInfo(f"s{shard}_{i}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return {"urls": str(root / "shard-{0..1}.tar"), "shuffle_buffer": 0}


@DATASETS.register("webdataset", example=_example)
def webdataset(
    urls: str | list[str],
    split: str = "train",
    image_size: int = 64,
    val_urls: str | list[str] | None = None,
    samples_per_epoch: int | None = None,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    class_names: list[str] | None = None,
    prompt_templates: list[str] | None = None,
    augment: Augment | None = None,
) -> WebDatasetShards:
    """Tar shards of jpg+txt[+cls] (local paths; brace patterns like "data/{00000..00099}.tar" allowed).

    val: `val_urls` if given, else the last shard of `urls` is held out (train then uses the others).
    augment: the train split's (data.augment; the val split is always resized and center-cropped).
    """
    check_split(split)
    check_image_size(image_size)
    templates = check_templates(prompt_templates, PHOTO_TEMPLATES)
    if samples_per_epoch is not None and samples_per_epoch < 1:
        raise ConfigError(f"data.kwargs.samples_per_epoch must be a positive integer or null, got {samples_per_epoch}")
    shards = expand_urls(urls)
    if not shards:
        raise DataError(f"webdataset urls {urls!r} expand to no shards")
    if val_urls is not None:
        shards = expand_urls(val_urls) if split == "val" else shards
    elif len(shards) < 2:
        raise DataError(
            f"webdataset has one shard {shards[0]}: set data.kwargs.val_urls, or give 2+ shards (the last is "
            "held out for val)"
        )
    else:
        shards = shards[-1:] if split == "val" else shards[:-1]
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise DataError(
            f"webdataset shard(s) not found: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")
        )
    train = split == "train"
    return WebDatasetShards(
        shards,
        image_size,
        train,
        samples_per_epoch if train else None,
        shuffle_buffer,
        seed,
        class_names,
        templates,
        augment if train else None,
    )
