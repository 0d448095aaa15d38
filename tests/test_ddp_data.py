"""Data under DDP, through the real `tokzoo fit` with 2 gloo ranks in a subprocess (a timeout turns a hang into a
failure):

- streamed shards served by a loopback HTTP server, one corrupt jpg inside: training finishes, every step on both
  ranks, the replaced sample counted on the MLflow run (train/skipped_samples, summed over ranks);
- map-style data (imagefolder) with a corrupt train image and a validation set of 9 images on 2 ranks: the ranks
  score exactly the 9 (val/num_images), not DistributedSampler's padded 10, with one val batch more on rank 0.
"""

from __future__ import annotations

import functools
import http.server
import io
import tarfile
import threading
from pathlib import Path

from conftest import DDP_MARKS, DDP_OVERRIDES, run_tokzoo, sqlite_uri, write_yaml
from PIL import Image

pytestmark = DDP_MARKS

COLORS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
STEPS = 12
CORRUPT = b"\xff\xd8 this is not a jpeg"
# a tiny tokenizer: the point is the data path, not the model
BASE = {
    "model": {
        "encoder": {"name": "vit_tiny"},
        "quantizer": {"name": "mcq", "dim": 32, "num_codebooks": 4, "codebook_size": 64},
    },
    "trainer": {"max_steps": STEPS, "log_every_n_steps": 1},
    "eval": {"grid_images": 2},
}


def _jpeg(color: tuple[int, int, int], i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (36, 32), tuple(min(255, c + 5 * i) for c in color)).save(buf, format="JPEG")
    return buf.getvalue()


def _write_shard(path: Path, n: int, corrupt: int | None = None) -> None:
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            name = list(COLORS)[i % 3]
            jpg = CORRUPT if i == corrupt else _jpeg(COLORS[name], i)
            for ext, data in (("jpg", jpg), ("txt", f"a {name} square".encode()), ("cls", str(i % 3).encode())):
                info = tarfile.TarInfo(f"{path.stem}_{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _fit(folder: Path, name: str, data: dict) -> tuple:
    import mlflow

    config = {"name": name, "base": {**BASE, "output_dir": str(folder / "outputs"), "data": data},
              "variants": {"v": {}}}  # fmt: skip
    path = write_yaml(folder / f"{name}.yaml", config)
    proc = run_tokzoo(["fit", str(path), *DDP_OVERRIDES], cwd=folder, timeout=300)
    assert proc.returncode == 0, (
        f"DDP tokzoo fit failed (rc={proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    )
    client = mlflow.MlflowClient(sqlite_uri(folder))
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    return proc, client, run


def test_streamed_http_shards_with_a_corrupt_jpg_train_on_two_ranks(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shard(shards / "train-0.tar", 10, corrupt=4)
    _write_shard(shards / "train-1.tar", 10)
    _write_shard(shards / "val-0.tar", 7)  # one shard, 2 ranks: split by sample, 4 + 3
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=shards))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        data = {
            "name": "webdataset",
            "batch_size": 4,
            "num_workers": 1,  # a persistent worker per rank: the epoch must reach it
            "kwargs": {
                "urls": url + "/train-{0..1}.tar",
                "val_urls": url + "/val-0.tar",
                "samples_per_epoch": 24,  # 12 per rank: 3 batches an epoch, so 12 steps cross 4 epochs
                "shuffle_buffer": 8,
                "class_names": list(COLORS),
            },
        }
        proc, client, run = _fit(tmp_path, "stream", data)
    finally:
        server.shutdown()
        server.server_close()
    assert run.info.status == "FINISHED"
    assert "train-0.tar:train-0_004.jpg" in proc.stderr  # the corrupt jpg was read, warned about, replaced
    history = client.get_metric_history(run.info.run_id, "train/skipped_samples")
    assert [m.step for m in history] == list(range(STEPS))  # logged at every step: every step ran on both ranks
    # each pass over train-0 meets the corrupt jpg once; 12 steps x 4 images x 2 ranks read each shard >= 2 times
    assert history[-1].value >= 2 and history[-1].value == max(m.value for m in history)
    assert run.data.metrics["val/num_images"] == 7
    for metric in ("val/psnr", "val/linprobe_acc", "val/zeroshot_acc", "val/retrieval_r1"):
        assert metric in run.data.metrics, sorted(run.data.metrics)


def test_ddp_validation_scores_exactly_the_validation_set(tmp_path):
    root = tmp_path / "images"
    for split, per_class in (("train", 6), ("val", 3)):
        for name, color in COLORS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                (root / split / name / f"{i}.jpg").write_bytes(_jpeg(color, i))
    (root / "train" / "red" / "broken.jpg").write_bytes(CORRUPT)  # 19 train files, one unreadable
    data = {"name": "imagefolder", "batch_size": 4, "val_batch_size": 4, "kwargs": {"root": str(root)}}
    proc, client, run = _fit(tmp_path, "valsplit", data)
    assert run.info.status == "FINISHED"
    # 9 images on 2 ranks: 5 (2 batches) + 4 (1 batch); DistributedSampler would have scored 10, one twice
    assert run.data.metrics["val/num_images"] == 9
    assert "broken.jpg" in proc.stderr  # warned about, replaced by the next image: full batches
    assert run.data.metrics["train/skipped_samples"] >= 1
