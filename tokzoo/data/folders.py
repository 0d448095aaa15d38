"""Datasets read from local files: `imagefolder` (root/class_x/img.jpg) and `captions` (CSV / JSONL)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tokzoo.data.common import (
    DATASETS,
    IMAGE_EXTENSIONS,
    PHOTO_TEMPLATES,
    FileListDataset,
    check_image_size,
    check_split,
    check_templates,
    deterministic_split,
    write_example_images,
)
from tokzoo.data.transforms import Augment
from tokzoo.errors import ConfigError, DataError


def _class_dirs(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _readable_names(folders: list[str], class_names_file: str | None) -> list[str]:
    """Folder names as class names ("golden_retriever" -> "golden retriever"), or a mapping from a file:
    JSON {folder: name} or text with one name per line in sorted folder order (e.g. ImageNet wnids)."""
    if class_names_file is None:
        return [f.replace("_", " ") for f in folders]
    path = Path(class_names_file).expanduser()
    if not path.is_file():
        raise DataError(f"data.kwargs.class_names_file {path} does not exist")
    if path.suffix.lower() == ".json":
        mapping = json.loads(path.read_text())
        missing = [f for f in folders if f not in mapping]
        if missing:
            raise DataError(f"data.kwargs.class_names_file {path} has no name for class folder(s) {missing[:5]}")
        return [str(mapping[f]) for f in folders]
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) != len(folders):
        raise DataError(f"data.kwargs.class_names_file {path} has {len(names)} names for {len(folders)} class folders")
    return names


def _imagefolder_example(folder: Path) -> dict:
    """root/<class>/<image>: two classes (one with an underscore in its folder name) of three images."""
    root = folder / "imagefolder"
    for name in ("cat", "golden_retriever"):
        write_example_images(root / name, 3)
    return {"root": str(root)}


@DATASETS.register("imagefolder", example=_imagefolder_example)
def imagefolder(
    root: str,
    split: str = "train",
    image_size: int = 64,
    val_fraction: float = 0.1,
    seed: int = 0,
    class_names_file: str | None = None,
    prompt_templates: list[str] | None = None,
    augment: Augment | None = None,
) -> FileListDataset:
    """root/<class>/<image>; uses root/train and root/val when both exist, else a seeded split of root.

    label = index of the class folder (sorted); caption = a prompt template filled with the class name.
    augment: the train split's (data.augment; the val split is always resized and center-cropped).
    """
    check_split(split)
    check_image_size(image_size)
    templates = check_templates(prompt_templates, PHOTO_TEMPLATES)
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"imagefolder root {base} does not exist or is not a directory; set data.kwargs.root")
    presplit = (base / "train").is_dir() and (base / "val").is_dir()
    # classes come from both splits so labels mean the same thing in train and val
    folders = (
        sorted(set(_class_dirs(base / "train")) | set(_class_dirs(base / "val"))) if presplit else _class_dirs(base)
    )
    if not folders:
        raise DataError(f"imagefolder root {base} has no class sub-directories (expected root/<class>/<image>)")
    names = _readable_names(folders, class_names_file)

    split_root = base / split if presplit else base
    items = [(str(p), label) for label, f in enumerate(folders) for p in _images_under(split_root / f)]
    if not presplit:
        items = [items[i] for i in deterministic_split(len(items), split, val_fraction, seed, str(base))]
    if not items:
        raise DataError(f"imagefolder {split_root} has no images for split '{split}' (extensions {IMAGE_EXTENSIONS})")
    paths = [p for p, _ in items]
    labels = [label for _, label in items]
    # rotate through the templates so captions vary a little across a class
    captions = [templates[i % len(templates)].format(names[label]) for i, label in enumerate(labels)]
    return FileListDataset(paths, captions, labels, image_size, names, templates, augment if split == "train" else None)


def _read_rows(path: Path) -> list[dict[str, str]]:
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exn:
                    raise DataError(f"captions file {path} line {lineno} is not valid JSON: {exn}") from exn
        return rows
    raise ConfigError(f"captions file {path} must end in .csv or .jsonl")


def _read_captions(path: Path) -> tuple[list[str], list[str], list[str] | None]:
    if not path.is_file():
        raise DataError(f"captions file {path} does not exist; set data.kwargs.path")
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"captions file {path} has no rows")
    for n, r in enumerate(rows, 1):
        missing = [k for k in ("image", "caption") if r.get(k) is None]
        if missing:
            raise DataError(f"captions file {path} row {n} lacks {missing}; each row needs image, caption[, label]")
    # image paths are relative to the captions file, so a dataset folder can be moved as a whole
    paths = [str(path.parent / str(r["image"])) for r in rows]
    captions = [str(r["caption"]) for r in rows]
    if not any("label" in r for r in rows):
        return paths, captions, None
    return paths, captions, ["" if r.get("label") is None else str(r["label"]).strip() for r in rows]


def _is_int(s: str) -> bool:
    return s.lstrip("-").isdigit()


def _text_label_names(*raws: list[str] | None) -> list[str] | None:
    """Sorted text labels over all files, or None when every label is an integer (or absent)."""
    present = {s for raw in raws if raw for s in raw if s}
    return None if all(_is_int(s) for s in present) else sorted(present)


def _encode_labels(raw: list[str] | None, class_names: list[str] | None) -> list[int]:
    """Integer labels stay as they are; text labels become indices into class_names; empty -> -1."""
    if raw is None:
        return []
    if all(_is_int(s) for s in raw if s):
        return [int(s) if s else -1 for s in raw]
    index = {n: i for i, n in enumerate(class_names or [])}
    unknown = sorted({s for s in raw if s and s not in index})
    if unknown:
        raise DataError(f"captions labels {unknown[:5]} are not in data.kwargs.class_names {class_names}")
    return [index[s] if s else -1 for s in raw]


def _captions_example(folder: Path) -> dict:
    """A CSV of six image-caption pairs with text labels, image paths relative to the file."""
    root = folder / "captions"
    paths = write_example_images(root / "img", 6)
    rows = ["image,caption,label"] + [
        f"img/{p.name},picture number {i},{'dog' if i % 2 else 'cat'}" for i, p in enumerate(paths)
    ]
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return {"path": str(root / "pairs.csv")}


@DATASETS.register("captions", example=_captions_example)
def captions(
    path: str,
    split: str = "train",
    image_size: int = 64,
    val_path: str | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    class_names: list[str] | None = None,
    prompt_templates: list[str] | None = None,
    augment: Augment | None = None,
) -> FileListDataset:
    """Image-text pairs listed in a CSV (columns image, caption[, label]) or JSONL (same keys) file.

    Paths are relative to the file. The val split is `val_path` if given, else a seeded split of `path`.
    label: an integer, or a class name (mapped to its index in class_names, default the sorted names).
    augment: the train split's (data.augment; the val split is always resized and center-cropped).
    """
    check_split(split)
    check_image_size(image_size)
    templates = check_templates(prompt_templates, PHOTO_TEMPLATES)
    main = Path(path).expanduser()
    paths, caps, raw = _read_captions(main)
    vpaths, vcaps, vraw = _read_captions(Path(val_path).expanduser()) if val_path else ([], [], None)
    if class_names is None:
        # names from both files, so train and val share one class index
        class_names = _text_label_names(raw, vraw)
    if val_path:
        if split == "val":
            paths, caps, raw = vpaths, vcaps, vraw
        idx = list(range(len(paths)))
    else:
        idx = deterministic_split(len(paths), split, val_fraction, seed, str(main)).tolist()
    labels = _encode_labels(raw, class_names) or [-1] * len(paths)
    if not idx:
        raise DataError(f"captions file {main} has too few rows to make a '{split}' split")
    return FileListDataset(
        [paths[i] for i in idx],
        [caps[i] for i in idx],
        [labels[i] for i in idx],
        image_size,
        class_names,
        templates,
        augment if split == "train" else None,
    )
