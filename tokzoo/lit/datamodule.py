"""TokzooDataModule: any registered dataset as Lightning train/val loaders of collate_samples batches."""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterator

import lightning
import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from tokzoo.checks import int_at_least, positive_int
from tokzoo.data import DATASETS, build_dataset, collate_samples
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
    epoch and the item alone (tokzoo.data.transforms)."""

    def __init__(
        self, dataset: torch.utils.data.Dataset, seed: int, rank: int = 0, world_size: int = 1, keyed: bool = False
    ):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self._resume: tuple[int, int] | None = None  # (epoch, samples of that epoch already consumed)
        self.keyed = keyed

    def resume_at(self, epoch: int, consumed: int) -> None:
        self.set_epoch(epoch)
        self._resume = (epoch, consumed) if consumed else None

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        order = super().__iter__()
        if self.keyed:
            epoch = self.epoch
            order = ((epoch, i) for i in order)
        if self._resume is not None and self._resume[0] == self.epoch:
            consumed, self._resume = self._resume[1], None  # only the first pass over the resumed epoch skips
            return itertools.islice(order, consumed, None)
        return order


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
    def prompt_templates(self) -> list[str] | None:
        """The val set's zero-shot templates, each with one "{}" (None before setup())."""
        return getattr(self.val_set, "prompt_templates", None)

    def _train_sampler(self) -> ResumableSampler:
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        keyed = active(getattr(self.train_set, "augment", None))
        sampler = ResumableSampler(self.train_set, seed=self.seed, rank=rank, world_size=world_size, keyed=keyed)
        if trainer is not None:
            # Lightning restores global_step before it asks for the loader: continue from the batch after the
            # last one trained on (one optimizer step per accumulate_grad_batches batches).
            batches_done = trainer.global_step * trainer.accumulate_grad_batches
            per_epoch = len(sampler) // self.batch_size
            if per_epoch:
                sampler.resume_at(batches_done // per_epoch, (batches_done % per_epoch) * self.batch_size)
        return sampler

    def _loader(self, dataset: torch.utils.data.Dataset, batch_size: int, train: bool) -> DataLoader:
        iterable = isinstance(dataset, IterableDataset)  # shuffles and splits itself across ranks/workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self._train_sampler() if train and not iterable else None,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_samples,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        return self._loader(self.train_set, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("validate")
        return self._loader(self.val_set, self.val_batch_size, train=False)
