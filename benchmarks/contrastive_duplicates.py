"""Zero-shot accuracy with identical captions as positives (loss.contra_duplicates=positive) against the one-hot
InfoNCE that treats them as negatives (negative), at equal budget, on a class-template dataset (issue 13, item 3).

    nice -n 5 python benchmarks/contrastive_duplicates.py --steps 300 --seeds 0 1 2 > contrastive_duplicates.log 2>&1

The dataset: the embedded `shapes` images written as an imagefolder (root/{train,val}/<class name>/<i>.png), so the
captions are the imagefolder's prompt templates filled with the class name. By default one template (--templates
1): 10 distinct captions, so a batch of 64 holds about 7 copies of each caption (the most duplicates a class-template
dataset gives); --templates 8 uses the imagefolder's 8 photo templates.
Supervision is contra: the switch only touches the contrastive term, and contra-only runs are the cheapest.

Each variant x seed runs through the real `tokzoo fit` (an ablation written to a temp dir, MLflow in a SQLite file
there). Both variants of a seed start from the same weights and see the same batches, so the script also prints
the paired difference per seed and how far apart the two training losses are at the first and last logged step.
With a deterministic text tower identical captions have identical embeddings, and then both losses (and their
gradients) are equal: the gap stays at float rounding and the difference at seed noise (measured: benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from PIL import Image

from tokzoo.analysis.runs import load_experiment
from tokzoo.analysis.stats import mean_ci
from tokzoo.data import build_dataset
from tokzoo.data.common import PHOTO_TEMPLATES

NAME = "contrastive_duplicates"
MODES = ("negative", "positive")


def write_imagefolder(root: Path, num_train: int, num_val: int, cache: Path) -> list[str]:
    """root/<split>/<class name>/<i>.png from the shapes generator; returns the class names."""
    for split in ("train", "val"):
        data = build_dataset("shapes", split=split, num_train=num_train, num_val=num_val, cache_dir=str(cache))
        for name in data.class_names:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        for i, label in enumerate(data.labels):
            Image.fromarray(data.images[i].numpy()).save(root / split / data.class_names[label] / f"{i}.png")
    return list(data.class_names)


def ablation(folder: Path, root: Path, args: argparse.Namespace) -> Path:
    base = {
        "output_dir": str(folder / "outputs"),
        "checkpoint_every": args.steps,  # one checkpoint at the end: saving is not what is measured
        "data": {
            "name": "imagefolder",
            "batch_size": args.batch_size,
            "kwargs": {"root": str(root), "prompt_templates": PHOTO_TEMPLATES[: args.templates]},
        },
        "loss": {"supervision": "contra"},
        "trainer": {"max_steps": args.steps, "log_every_n_steps": 10},
        "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}"},
    }
    variants = {mode: {"loss": {"contra_duplicates": mode}} for mode in MODES}
    path = folder / f"{NAME}.yaml"
    path.write_text(yaml.safe_dump({"name": NAME, "seeds": args.seeds, "base": base, "variants": variants}))
    return path


def report(folder: Path, args: argparse.Namespace, wall: float) -> None:
    runs = load_experiment(NAME, f"sqlite:///{folder / 'mlflow.db'}")
    by = {(r.variant, r.seed): r for r in runs.runs}
    setting = f"{args.steps} steps, batch {args.batch_size}, {args.templates} template(s), seeds {args.seeds}"
    print(f"\n{len(runs.runs)} finished runs; {setting}, wall {wall / 60:.1f} min")
    for metric in ("val/zeroshot_acc", "val/retrieval_r1", "train/contra_positives_per_row", "perf/wall_seconds"):
        cells = []
        for mode in MODES:
            values = [by[(mode, s)].metrics.get(metric) for s in args.seeds if (mode, s) in by]
            cells.append(f"{mode}: {mean_ci(values).format()}")
        print(f"{metric:32s} " + "   ".join(cells))
    diffs = []
    for seed in args.seeds:
        neg, pos = by.get(("negative", seed)), by.get(("positive", seed))
        if neg is None or pos is None:
            continue
        acc = (pos.metrics.get("val/zeroshot_acc", math.nan), neg.metrics.get("val/zeroshot_acc", math.nan))
        diffs.append(acc[0] - acc[1])
        h_pos, h_neg = runs.history(pos.run_id, "train/loss_contra"), runs.history(neg.run_id, "train/loss_contra")
        gaps = [abs(a - b) for (_, a), (_, b) in zip(h_pos, h_neg)]
        print(f"seed {seed}: zero-shot positive {acc[0]:.4f} negative {acc[1]:.4f}; |train/loss_contra gap| first "
              f"logged step {gaps[0]:.2e}, last {gaps[-1]:.2e} (loss {h_neg[-1][1]:.4f})")  # fmt: skip
    print(f"paired zero-shot difference (positive - negative): {mean_ci(diffs).format()} over {len(diffs)} seeds")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--templates", type=int, default=1, choices=range(1, len(PHOTO_TEMPLATES) + 1))
    p.add_argument("--num-train", type=int, default=4000)
    p.add_argument("--num-val", type=int, default=512)
    p.add_argument("--dir", help="work folder (kept); default: a temp dir, removed at the end")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="tokzoo-dup-") as tmp:
        folder = Path(args.dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        root = folder / "imagefolder"
        classes = write_imagefolder(root, args.num_train, args.num_val, folder / "cache")
        print(f"imagefolder {root}: {args.num_train} train / {args.num_val} val images, classes {classes}", flush=True)
        path = ablation(folder, root, args)
        env = {**os.environ, "TOKZOO_CACHE": str(folder / "cache"), "PYTHONUNBUFFERED": "1"}
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "tokzoo.cli", "fit", str(path)], env=env, cwd=folder)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"tokzoo fit failed with exit code {proc.returncode}")
        report(folder, args, wall)


if __name__ == "__main__":
    main()
