"""TokzooDataModule: any registered dataset as Lightning train/val loaders of collate_samples batches.

Under DDP every rank gets full, equal train batches (an unreadable sample is replaced, never dropped: see
tokzoo.data.common) and the ranks together score each validation item exactly once (ValSplitSampler; streamed
val shards split themselves). A streamed (iterable) train set is told its epoch, and after a resume the batch to
continue from, each time an epoch's iteration starts (StreamLoader): Lightning calls set_epoch on samplers only.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Iterator

import lightning
import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from tokzoo.checks import int_at_least, positive_int
from tokzoo.data import DATASETS, build_dataset, collate_samples
from tokzoo.data.common import ReplaceUnreadable
from tokzoo.data.transforms import Augment, active
from tokzoo.errors import ConfigError

# datasets whose first build does real work worth doing once, before the ranks start (cache, download)
_PREPARE_ONCE = ("shapes", "cifar10", "cifar100")


class ResumableSampler(DistributedSampler):
    """The training order: one permutation per epoch drawn from (seed, epoch) alone, split across ranks, and
    able to start an epoch part-way through, so a run resumed mid-epoch sees exactly the batches an
    uninterrupted run would have seen next.

    A DistributedSampler subclass because Lightning then leaves it in place under DDP (it only swaps in its
    own sampler for plain Random/Sequential ones) and calls set_epoch on it each epoch. Unlike RandomSampler
    it never touches the global RNG, which seed_everything resets on resume.

    keyed: yield (epoch, index) instead of index, for a train split that augments: its draws then depend on the
    epoch and the item alone (tokzoo.data.transforms).

    position: () -> (epoch, samples of it already consumed), asked each time an epoch's iteration starts. Given, it
    decides the epoch instead of Lightning's set_epoch: Lightning counts a finished run's epoch as complete, so a
    longer budget continuing that run's checkpoint would otherwise start a new permutation mid-epoch."""

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        keyed: bool = False,
        position: Callable[[], tuple[int, int]] | None = None,
    ):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self._resume: tuple[int, int] | None = None  # (epoch, samples of that epoch already consumed)
        self.keyed = keyed
        self.position = position

    def resume_at(self, epoch: int, consumed: int) -> None:
        self.set_epoch(epoch)
        self._resume = (epoch, consumed) if consumed else None

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        if self.position is not None:
            self.resume_at(*self.position())
        order = super().__iter__()
        if self.keyed:
            epoch = self.epoch
            order = ((epoch, i) for i in order)
        if self._resume is not None and self._resume[0] == self.epoch:
            consumed, self._resume = self._resume[1], None  # only the first pass over the resumed epoch skips
            return itertools.islice(order, consumed, None)
        return order


class ValSplitSampler(DistributedSampler):
    """The validation items of one rank: indices[rank::world], in order, without DistributedSampler's padding
    (which repeats items so that every rank gets as many, and so scores them twice). Ranks may then hold one batch
    more or less; validation's collectives run once per epoch, not per batch (lit/module.py). A DistributedSampler
    subclass so that Lightning leaves it in place under DDP."""

    def __init__(self, dataset: torch.utils.data.Dataset, rank: int = 0, world_size: int = 1):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False, drop_last=False)
        self.indices = list(range(rank, len(dataset), world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class StreamLoader(DataLoader):
    """A DataLoader over a streamed train set that calls `before_epoch()` whenever an epoch's iteration starts
    (Lightning creates the first epoch's iterator before its epoch hooks run, so a callback would be too late)."""

    before_epoch = None

    def __iter__(self):
        if self.before_epoch is not None:
            self.before_epoch()
        return super().__iter__()


def train_augment(name: str, augment: dict | None, seed: int) -> Augment | None:
    """The train split's augmentation from the resolved data.augment (None when it is off), for dataset `name`,
    whose factory must then take an `augment` argument (every built-in one does)."""
    if not augment:
        return None
    policy = Augment(crop=augment["crop"], flip=augment["flip"], resize_short=augment["resize_short"], seed=seed)
    if not policy.active:
        return None
    if "augment" not in inspect.signature(DATASETS.get(name)).parameters:
        raise ConfigError(
            f"dataset '{name}' takes no augment argument, so data.augment cannot apply to it; set "
            f"data.augment.crop=center data.augment.flip=false data.augment.resize_short=1.0 (or data.augment=null)"
        )
    return policy


class TokzooDataModule(lightning.LightningDataModule):
    def __init__(
        self,
        name: str,
        image_size: int,
        batch_size: int,
        num_workers: int = 0,
        val_batch_size: int | None = None,
        dataset_kwargs: dict | None = None,
        seed: int = 0,
        augment: dict | None = None,
    ):
        super().__init__()
        positive_int("data", batch_size=batch_size, val_batch_size=val_batch_size or batch_size)
        int_at_least(0, "data", num_workers=num_workers)
        self.name = name
        self.image_size = image_size
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.dataset_kwargs = dict(dataset_kwargs or {})
        self.seed = seed
        self.augment = train_augment(name, augment, seed)  # the train split's; None: resize + center crop
        self.train_set: torch.utils.data.Dataset | None = None
        self.val_set: torch.utils.data.Dataset | None = None
        self._stream_resume: tuple[int, int] | None = None  # (epoch, batches of it already trained on)

    def _build(self, split: str) -> torch.utils.data.Dataset:
        extra = {"augment": self.augment} if split == "train" and self.augment is not None else {}
        return build_dataset(self.name, split=split, image_size=self.image_size, **self.dataset_kwargs, **extra)

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node: generate the shapes cache / fetch CIFAR there, so
        # the other ranks' setup() only reads. (The cache write is atomic anyway, so a race is harmless.)
        if self.name in _PREPARE_ONCE:
            self._build("train")
            self._build("val")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = self._build("train")
        if self.val_set is None:
            self.val_set = self._build("val")

    @property
    def class_names(self) -> list[str] | None:
        """The val set's class names (None before setup() or for caption-only data)."""
        return getattr(self.val_set, "class_names", None)

    @property
    def attribute_tasks(self) -> dict:
        """The val set's tasks beside the class label ({name: data.common.AttributeTask}; empty for most data)."""
        return dict(getattr(self.val_set, "attribute_tasks", None) or {})

    @property
    def prompt_templates(self) -> list[str] | None:
        """The val set's zero-shot templates, each with one "{}" (None before setup())."""
        return getattr(self.val_set, "prompt_templates", None)

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _batches_done(self) -> int:
        """Batches trained on so far: Lightning restores global_step before it asks for the loader (one optimizer
        step per accumulate_grad_batches batches)."""
        trainer = self.trainer
        return trainer.global_step * trainer.accumulate_grad_batches if trainer is not None else 0

    def _train_sampler(self, dataset: torch.utils.data.Dataset) -> ResumableSampler:
        rank, world_size = self._rank_world()
        keyed = active(getattr(self.train_set, "augment", None))
        sampler = ResumableSampler(dataset, seed=self.seed, rank=rank, world_size=world_size, keyed=keyed)
        per_epoch = len(sampler) // self.batch_size
        if self.trainer is not None and per_epoch:  # each epoch continues from the batch after the last one trained

            def position() -> tuple[int, int]:
                epoch, batch = divmod(self._batches_done(), per_epoch)
                return epoch, batch * self.batch_size

            sampler.position = position
        return sampler

    def _stream_epoch(self) -> None:
        """Tell the streamed train set which epoch starts (and, once after a resume, from which batch)."""
        epoch = int(getattr(self.trainer, "current_epoch", 0) or 0)
        resume = 0
        if self._stream_resume is not None and self._stream_resume[0] == epoch:
            resume, self._stream_resume = self._stream_resume[1], None
        self.train_set.set_epoch(epoch, resume)

    def _stream_train_loader(self) -> DataLoader:
        dataset = self.train_set
        _, world_size = self._rank_world()
        if hasattr(dataset, "set_batch_size"):
            dataset.set_batch_size(self.batch_size)
        length = getattr(dataset, "samples_per_epoch", 0)
        if world_size > 1 and length is None:
            raise ConfigError(
                f"data.kwargs.samples_per_epoch must be set to train on a streamed dataset ('{self.name}') with "
                f"{world_size} ranks: without it the ranks' epochs differ in length and DDP hangs; set "
                "data.kwargs.samples_per_epoch=N (N: about the number of training samples)"
            )
        if length and length // world_size < self.batch_size:
            raise ConfigError(
                f"data.kwargs.samples_per_epoch={length} gives each of the {world_size} rank(s) fewer samples than "
                f"one batch (data.batch_size={self.batch_size}); raise samples_per_epoch or lower batch_size"
            )
        if length and self.trainer is not None and hasattr(dataset, "set_epoch"):
            per_epoch = len(dataset) // self.batch_size
            self._stream_resume = divmod(self._batches_done(), per_epoch)
        loader = StreamLoader(dataset, **self._loader_kwargs(self.batch_size, drop_last=True))
        if hasattr(dataset, "set_epoch"):
            loader.before_epoch = self._stream_epoch
        return loader

    def _val_sampler(self, dataset: torch.utils.data.Dataset) -> ValSplitSampler:
        rank, world_size = self._rank_world()
        if len(dataset) < world_size:
            raise ConfigError(
                f"the validation set of '{self.name}' has {len(dataset)} item(s), fewer than the {world_size} ranks; "
                "give it at least one item per rank (e.g. data.kwargs.num_val) or train on fewer devices"
            )
        return ValSplitSampler(dataset, rank=rank, world_size=world_size)

    def _loader_kwargs(self, batch_size: int, drop_last: bool) -> dict:
        return {
            "batch_size": batch_size,
            "drop_last": drop_last,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "collate_fn": collate_samples,
            "pin_memory": torch.cuda.is_available(),
        }

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        if isinstance(self.train_set, IterableDataset):  # shuffles and splits itself across ranks/workers
            return self._stream_train_loader()
        dataset = ReplaceUnreadable(self.train_set)  # full batches on every rank
        return DataLoader(
            dataset, sampler=self._train_sampler(dataset), **self._loader_kwargs(self.batch_size, drop_last=True)
        )

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("validate")
        iterable = isinstance(self.val_set, IterableDataset)
        return DataLoader(
            self.val_set,
            sampler=None if iterable else self._val_sampler(self.val_set),
            **self._loader_kwargs(self.val_batch_size, drop_last=False),
        )
