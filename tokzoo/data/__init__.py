"""Datasets by registry name: shapes (embedded), imagefolder, captions, webdataset, cifar10, cifar100.

from tokzoo.data import build_dataset, list_datasets, collate_samples
ds = build_dataset("shapes", split="train", image_size=32, num_train=4000)
ds[0]  # {"image": (3, H, W) float in [-1, 1], "caption": str, "label": int (-1 if unknown)} or None
ds.class_names, ds.prompt_templates  # for zero-shot / linear probe (class_names may be None)
"""

from tokzoo.data import folders, shapes, torchvision_sets, webdataset  # noqa: F401  (register the datasets)
from tokzoo.data.common import DATASETS, build_dataset, collate_samples, default_cache_dir, list_datasets

__all__ = ["DATASETS", "build_dataset", "collate_samples", "default_cache_dir", "list_datasets"]
