"""`webdataset`: image-text pairs streamed from tar shards (WebDataset / DataComp layout), read with the `webdataset`
library from any URL: local paths, `http(s)://`, `pipe:CMD`, and every fsspec filesystem (`s3://`, `gs://`, ...).

A shard holds files named <key>.<ext>; consecutive files with the same key form one sample (jpg/jpeg/png/webp
image, txt caption, optional cls integer label). The library opens, untars and groups the shards (its tar
iterator, key grouping and shuffle buffer); this file decides only what the library leaves to its user:

- Opening: `pipe:` and local paths go to the library's own opener (`webdataset.gopen`); every other scheme fsspec
  knows goes through fsspec with the user's credentials (s3fs / gcsfs read the usual AWS / gcloud settings;
  `storage_options` are passed on). The library's http opener shells out to curl, which retries for a minute
  before failing and is absent on slim images; fsspec's aiohttp client comes with Lightning.
- Splitting: with at least as many shards as consumers (ranks x workers), each consumer reads whole shards
  (shards[rank::world][worker::workers]); with fewer, every consumer reads every shard and keeps every C-th
  sample, so a single validation shard still splits exactly. Rank and world are read when iteration starts.
- Equal batches (train): with samples_per_epoch, every rank yields exactly (samples_per_epoch // world //
  batch_size) full batches per epoch, cycling over its shards as needed; each DataLoader worker makes whole
  batches. An unreadable sample (corrupt image, no caption) is replaced by the next readable one of the stream and
  counted on the sample that replaced it ("skipped"), so no rank ever gets a short batch. Val yields None for it
  (collate_samples drops and counts it): val scores what it can read, once.
- Epochs: `set_epoch` (the datamodule calls it each time an epoch's iteration starts; Lightning only does so for
  samplers) writes into shared memory, so persistent DataLoader workers see it too. Without set_epoch, each
  __iter__ is the next epoch. The shard order of a pass and each consumer's shuffle buffer are seeded by
  (seed, epoch, pass[, rank, worker]) alone.
- Resume: set_epoch(epoch, resume_batches=k) continues an epoch after its first k batches: each worker skips the
  raw samples of the batches it had made (cheap: no decoding) and worker w takes over the batches of worker
  (w + k) % workers, so the rest of the epoch comes in the uninterrupted run's order. Exact unless the skipped
  part held unreadable samples: then as many samples are seen twice.
- Broken shards: a shard that is truncated, corrupt or unreachable mid-run ends with a warning and the next shard
  goes on (a cut that falls exactly between two members is not detectable in a stream and reads as a shorter
  shard). At build time a missing local shard, or a remote first shard that cannot be opened, is a DataError.
"""

from __future__ import annotations

import io
import itertools
import random
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from webdataset import filters as wds_filters
from webdataset.tariterators import group_by_keys, tar_file_expander

from tokzoo import distributed
from tokzoo.data.common import (
    DATASETS,
    PHOTO_TEMPLATES,
    Sample,
    check_image_size,
    check_split,
    check_templates,
    load_image,
    warn_once,
)
from tokzoo.data.shards import EndOfArchiveCheck, check_shards, expand_urls, open_url, warn_and_go_on, warn_shard
from tokzoo.data.transforms import Augment, active
from tokzoo.errors import ConfigError, DataError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
MAX_UNREADABLE_IN_A_ROW = 1000  # then the data, not one file, is broken: stop instead of cycling forever


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
    env = distributed.launcher_environment()  # torchrun / srun: what they assigned; else (0, 1)
    return env.global_rank(), env.world_size()


def worker_id_count() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class WebDatasetShards(torch.utils.data.IterableDataset):
    """Streams samples from tar shards; splits itself across DDP ranks and DataLoader workers.

    samples_per_epoch (train only): every rank yields exactly len(self) items per epoch (whole batches of
    set_batch_size's size), cycling over its shards as needed, so DDP ranks stay in step; else (and for val) one
    pass. augment (train only): a sample's draws come from (seed, epoch, pass, shard, key), whichever worker
    decodes it.
    """

    def __init__(
        self,
        shards: list[str],
        image_size: int,
        train: bool,
        samples_per_epoch: int | None,
        shuffle_buffer: int,
        seed: int,
        class_names: list[str] | None,
        prompt_templates: list[str],
        augment: Augment | None = None,
        storage_options: dict | None = None,
    ):
        self.shards = shards
        self.image_size = image_size
        self.shuffle = self.train = train
        self.samples_per_epoch = samples_per_epoch
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.seed = seed
        self.class_names = class_names
        self.prompt_templates = prompt_templates
        self.augment = augment
        self.storage_options = dict(storage_options or {})
        self.batch_size = 1
        # [epoch, resume_batches, generation]: shared with persistent workers; generation counts set_epoch calls
        self._state = torch.zeros(3, dtype=torch.long).share_memory_()
        self._seen_generation, self._iters_since = 0, 0  # this process's own: epochs advance per __iter__
        self._parent_rank_world: tuple[int, int] | None = None

    def __getstate__(self) -> dict:
        # pickled in the main process when DataLoader workers are spawned: carry its rank along
        return {**self.__dict__, "_parent_rank_world": rank_world()}

    def set_epoch(self, epoch: int, resume_batches: int = 0) -> None:
        """The epoch the next __iter__ streams, from its batch `resume_batches` on (0: from its start)."""
        self._state[0], self._state[1] = epoch, resume_batches
        self._state[2] += 1

    def set_batch_size(self, batch_size: int) -> None:
        """The DataLoader's batch size: each worker then yields whole batches, so every rank's epoch is exactly
        len(self) // batch_size full batches, whatever the number of workers."""
        self.batch_size = max(1, int(batch_size))

    def _batches_per_rank(self, world: int) -> int:
        return self.samples_per_epoch // world // self.batch_size

    def __len__(self) -> int:
        if self.samples_per_epoch is None:
            raise TypeError("webdataset without samples_per_epoch has no length")
        return self._batches_per_rank(rank_world(self._parent_rank_world)[1]) * self.batch_size

    def decode(self, raw: dict[str, Any], epoch: int = 0) -> Sample | None:
        shard, rnd = str(raw.get("__url__", "?")), int(raw.get("__pass__", 0))
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

    def _read(self, urls: Iterable[str]) -> Iterator[dict[str, Any]]:
        """The library's tar reading over our opener: raw samples {"__key__", "__url__", ext: bytes, ...}."""

        def opened() -> Iterator[dict[str, Any]]:
            for url in urls:
                try:
                    stream = EndOfArchiveCheck(open_url(url, self.storage_options))
                except Exception as exn:
                    warn_shard(url, exn)
                    continue
                try:
                    yield {"url": url, "stream": stream}
                finally:  # the expander asked for the next shard: this one is done
                    stream.close()

        return group_by_keys(tar_file_expander(opened(), handler=warn_and_go_on), handler=warn_and_go_on)

    def _pass(self, rank: int, world: int, role: int, nw: int, epoch: int, rnd: int) -> Iterator[dict[str, Any]]:
        """One pass over consumer (rank, role)'s share of the shards, as raw samples tagged with the pass."""
        shards = list(self.shards)
        if self.shuffle:  # the same order on every rank and worker: seeded by (seed, epoch, pass) only
            random.Random(f"{self.seed}/{epoch}/{rnd}").shuffle(shards)
        consumer, consumers = rank * nw + role, world * nw
        if len(shards) >= consumers:
            raws: Iterator[dict[str, Any]] = self._read(shards[rank::world][role::nw])
        else:  # fewer shards than consumers: read all, keep every C-th sample
            raws = (raw for i, raw in enumerate(self._read(shards)) if i % consumers == consumer)
        for raw in raws:
            raw["__pass__"] = rnd
            yield raw

    def _cycle(self, rank: int, world: int, role: int, nw: int, epoch: int) -> Iterator[dict[str, Any]]:
        """Pass after (reshuffled) pass over the consumer's shards, for as long as the caller takes."""
        for rnd in itertools.count():
            produced = 0
            for raw in self._pass(rank, world, role, nw, epoch, rnd):
                produced += 1
                yield raw
            if produced == 0:
                raise DataError(
                    f"webdataset shards gave no samples to rank {rank} worker {role}: {self.shards[:5]}; check that "
                    "they are tar files of <key>.jpg/.txt samples and readable from every node"
                )

    def _epoch(self) -> tuple[int, int]:
        """(epoch, resume_batches) of this __iter__: set_epoch's, or the next epoch of this process's copy."""
        epoch, resume, generation = (int(v) for v in self._state.tolist())
        if generation != self._seen_generation:
            self._seen_generation, self._iters_since = generation, 0
        elif self._iters_since:
            resume = 0  # a resume point applies to the first pass over its epoch only
        epoch += self._iters_since
        self._iters_since += 1
        return epoch, resume

    def __iter__(self) -> Iterator[Sample | None]:
        rank, world = rank_world(self._parent_rank_world)
        wid, nw = worker_id_count()
        epoch, resume = self._epoch()
        role, take, skip = wid, None, 0  # role: whose share of the shards and batches this worker makes
        if self.samples_per_epoch is None:  # one pass (val; or train in a single process)
            if world > 1 and self.train and rank == 0 and wid == 0:
                warn_once("wds-uneven", "webdataset training under DDP without samples_per_epoch: set it")
            raws = self._pass(rank, world, role, nw, epoch, 0)
        else:
            # after a resume at batch k, worker w makes the batches worker (w + k) % nw made in the uninterrupted run
            role = (wid + resume) % nw
            batches = self._batches_per_rank(world)
            mine = batches // nw + (role < batches % nw)  # this role's batches in the epoch (round-robin)
            done = min(mine, resume // nw + (role < resume % nw))  # of them, made before the resume
            raws, take, skip = self._cycle(rank, world, role, nw, epoch), mine - done, done
            take, skip = take * self.batch_size, skip * self.batch_size
        if self.shuffle_buffer > 1:
            rng = random.Random(f"{self.seed}/{epoch}/{rank}/{role}")
            raws = wds_filters.shuffle(bufsize=self.shuffle_buffer, rng=rng)(iter(raws))
        raws = itertools.islice(raws, skip, None)  # already trained on (raw samples: nothing decoded)
        yield from itertools.islice(self._decoded(raws, epoch), take)

    def _decoded(self, raws: Iterator[dict[str, Any]], epoch: int) -> Iterator[Sample | None]:
        """Decoded samples. Train: an unreadable one is replaced by the next readable one, which carries the count
        in "skipped" (batches stay full); val: it is None (dropped and counted by collate_samples)."""
        unreadable = 0
        for raw in raws:
            sample = self.decode(raw, epoch)
            if not self.train:
                yield sample
            elif sample is None:
                unreadable += 1
                if unreadable >= MAX_UNREADABLE_IN_A_ROW:
                    raise DataError(
                        f"webdataset: {unreadable} unreadable samples in a row (last in {raw.get('__url__')}); "
                        "check the shards (images that decode, a .txt caption or a .cls label with class_names)"
                    )
            else:
                yield {**sample, "skipped": unreadable} if unreadable else sample
                unreadable = 0


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
    storage_options: dict | None = None,
) -> WebDatasetShards:
    """Tar shards of jpg+txt[+cls] from local paths or URLs (http(s)://, pipe:CMD, s3://, gs://, any fsspec
    scheme); brace patterns like "s3://bucket/{00000..00099}.tar" allowed.

    val: `val_urls` if given, else the last shard of `urls` is held out (train then uses the others).
    samples_per_epoch: the train epoch's length over all ranks (required for DDP training).
    augment: the train split's (data.augment; the val split is always resized and center-cropped).
    storage_options: keyword arguments for fsspec's filesystem (e.g. {"anon": true} for a public bucket).
    """
    check_split(split)
    check_image_size(image_size)
    templates = check_templates(prompt_templates, PHOTO_TEMPLATES)
    if samples_per_epoch is not None and (isinstance(samples_per_epoch, bool) or samples_per_epoch < 1):
        raise ConfigError(f"data.kwargs.samples_per_epoch must be a positive integer or null, got {samples_per_epoch}")
    if storage_options is not None and not isinstance(storage_options, dict):
        raise ConfigError(f"data.kwargs.storage_options must be a mapping or null, got {storage_options!r}")
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
    check_shards(shards, storage_options)
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
        storage_options,
    )
