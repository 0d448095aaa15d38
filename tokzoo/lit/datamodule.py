"""TokzooDataModule: any registered dataset as Lightning train/val loaders of collate_samples batches."""

from __future__ import annotations

import lightning
import torch
from torch.utils.data import DataLoader, IterableDataset

from tokzoo.data import build_dataset, collate_samples
from tokzoo.errors import ConfigError

# datasets whose first build does real work worth doing once, before the ranks start (cache, download)
_PREPARE_ONCE = ("shapes", "cifar10", "cifar100")


class TokzooDataModule(lightning.LightningDataModule):
    def __init__(
        self,
        name: str,
        image_size: int,
        batch_size: int,
        num_workers: int = 0,
        val_batch_size: int | None = None,
        dataset_kwargs: dict | None = None,
    ):
        super().__init__()
        for key, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size or 1)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"data.{key} must be a positive integer, got {value!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"data.num_workers must be an integer >= 0, got {num_workers!r}")
        self.name = name
        self.image_size = image_size
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.dataset_kwargs = dict(dataset_kwargs or {})
        self.train_set: torch.utils.data.Dataset | None = None
        self.val_set: torch.utils.data.Dataset | None = None

    def _build(self, split: str) -> torch.utils.data.Dataset:
        return build_dataset(self.name, split=split, image_size=self.image_size, **self.dataset_kwargs)

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

    def _loader(self, dataset: torch.utils.data.Dataset, batch_size: int, train: bool) -> DataLoader:
        iterable = isinstance(dataset, IterableDataset)  # shuffles and splits itself across ranks/workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train and not iterable,
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
