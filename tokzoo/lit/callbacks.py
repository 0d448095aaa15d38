"""Small Lightning callbacks: training throughput, and the progress display in steps of max_steps."""

from __future__ import annotations

import math
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, TextIO

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from tokzoo.errors import ConfigError


class ImagesPerSecond(ThroughputMonitor):
    """perf/images_per_sec from Lightning's ThroughputMonitor: wall time between batch ends (data wait included,
    CUDA synchronised), over a window of the last min(100, max_steps - 1) steps, so the first step (allocator, lazy
    init) falls outside it. Lightning logs its train/* and validate/* throughput figures on the way; this logs the
    global images/s once at the end of training and keeps it in `value` for the summary table."""

    def __init__(self) -> None:
        super().__init__(batch_size_fn=lambda batch: batch["image"].shape[0])
        self.value: float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.kwargs["window_size"] = max(2, min(100, trainer.max_steps - 1)) if trainer.max_steps > 0 else 100
        super().setup(trainer, pl_module, stage)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        logged = {k: float(v) for k, v in trainer.logged_metrics.items() if k.startswith("train/")}
        per_device = logged.get("train/device/samples_per_sec")
        if per_device is None and logged.get("train/time", 0) > 0:  # too few steps for a full window
            per_device = logged["train/samples"] / logged["train/time"]
        if per_device is not None:
            self.value = per_device * trainer.world_size  # every rank trains the same batch size
            for logger in trainer.loggers:
                logger.log_metrics({"perf/images_per_sec": self.value}, step=trainer.global_step)


class SharedOutputDir(L.Callback):
    """Stops every rank with one message when the variant folder is not the same folder on every node.

    Rank 0 writes a marker file there and every rank looks for it: checkpoints are written by rank 0 alone and read
    back by all ranks on resume, so a node-local output_dir would resume nodes from different states."""

    def __init__(self, folder: Path):
        self.folder = folder

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size <= 1:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        marker = self.folder / f".tokzoo-shared-{trainer.strategy.broadcast(uuid.uuid4().hex)}"
        if trainer.is_global_zero:
            marker.write_text(socket.gethostname())
        trainer.strategy.barrier("tokzoo-shared-output-dir")
        seen = marker_visible(marker)
        hosts = [None] * trainer.world_size
        torch.distributed.all_gather_object(hosts, (socket.gethostname(), seen))
        trainer.strategy.barrier("tokzoo-shared-output-dir-read")
        if trainer.is_global_zero:
            marker.unlink(missing_ok=True)
        blind = [f"rank {rank} on {host}" for rank, (host, ok) in enumerate(hosts) if not ok]
        if blind:
            raise ConfigError(
                f"output_dir is not shared by all nodes: {self.folder} as seen by {', '.join(blind)} does not show "
                f"the file rank 0 wrote on {hosts[0][0]}; set output_dir to a folder every node mounts"
            )


def marker_visible(marker: Path, wait_s: float = 5.0) -> bool:
    """Looks for the file for a few seconds: a network filesystem may cache "no such file" briefly."""
    deadline = time.monotonic() + wait_s
    while True:
        if marker.name in os.listdir(marker.parent):  # a directory read, not a cached lookup of the name
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def clock(seconds: float) -> str:
    """1:02:03 / 2:03 (a rate of 0 gives no finite ETA: '?')."""
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class StepProgress(ProgressBar):
    """Progress of one variant in optimizer steps of trainer.max_steps, with rate, loss and ETA.

    tokzoo's data module is step-based (max_epochs=-1), so Lightning's own bars, which count the batches of an
    epoch, read "Epoch 4/-2". On a terminal this draws one live rich bar; otherwise (CI logs, `| tee`, a sweep
    trial's log.txt) it prints a plain line `<name>: step k/N (p%) | loss | it/s | images/s | elapsed | ETA` at
    every multiple of `every` steps (default: a tenth of the run), at the last step, and after `max_silence_s`
    without a line. Only rank 0 shows anything (Lightning disables the bar elsewhere).
    """

    def __init__(
        self,
        name: str,
        live: bool | None = None,
        every: int | None = None,
        max_silence_s: float = 300.0,
        console: Console | None = None,
        stream: TextIO | None = None,
    ):
        super().__init__()
        self.name = name
        self.console = console or Console()
        self.live = self.console.is_terminal if live is None else live
        self.every = every
        self.max_silence_s = max_silence_s
        self.stream = stream
        self._enabled = True
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        self._val_task: TaskID | None = None
        self._start, self._start_step, self._images = 0.0, 0, 0
        self._last_step, self._last_time = -1, 0.0
        self._every = every or 1  # set from max_steps at the start of training

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print(self, line: str) -> None:
        print(line, file=self.stream or sys.stdout, flush=True)

    def _stats(self, trainer: L.Trainer) -> dict[str, Any]:
        step, total = trainer.global_step, trainer.max_steps
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        rate = (step - self._start_step) / elapsed
        loss = trainer.progress_bar_metrics.get("train/loss")
        return {
            "step": step,
            "total": total,
            "rate": rate,
            "images": self._images / elapsed,
            "elapsed": elapsed,
            "eta": (total - step) / rate if rate > 0 else math.inf,
            "loss": None if loss is None else float(loss),
        }

    def line(self, trainer: L.Trainer) -> str:
        s = self._stats(trainer)
        parts = [f"{self.name}: step {s['step']}/{s['total']} ({100 * s['step'] // max(s['total'], 1)}%)"]
        if s["loss"] is not None:
            parts.append(f"loss {s['loss']:.4g}")
        parts += [f"{s['rate']:.2f} it/s", f"{s['images']:.0f} images/s"]
        parts += [f"elapsed {clock(s['elapsed'])}", f"ETA {clock(s['eta'])}"]
        return " | ".join(parts)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled:
            return
        self._start, self._start_step, self._images = time.perf_counter(), trainer.global_step, 0
        self._last_step, self._last_time = trainer.global_step, self._start
        total = trainer.max_steps
        self._every = self.every or max(1, math.ceil(total / 10))
        if self.live:
            self._bar = Progress(
                TextColumn("[cyan]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[unit]}"),
                TimeElapsedColumn(),
                TextColumn("{task.fields[eta]}"),
                TextColumn("{task.fields[info]}"),
                console=self.console,
            )
            self._bar.start()
            self._task = self._bar.add_task(
                self.name, total=total, completed=trainer.global_step, unit="steps", eta="ETA ?", info=""
            )
        else:
            start = trainer.global_step
            what = f"resuming at step {start}/{total}" if start else f"training for {total} steps"
            self._print(f"{self.name}: {what}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._enabled:
            return
        images = batch.get("image") if isinstance(batch, dict) else None
        self._images += (images.shape[0] if images is not None else 0) * trainer.world_size
        step, now = trainer.global_step, time.perf_counter()
        if self._bar is not None and self._task is not None:
            s = self._stats(trainer)
            loss = "" if s["loss"] is None else f" | loss {s['loss']:.4g}"
            info = f"{s['rate']:.2f} it/s | {s['images']:.0f} images/s{loss}"
            self._bar.update(self._task, completed=step, eta=f"ETA {clock(s['eta'])}", info=info)
        elif step != self._last_step and (
            step % self._every == 0 or step >= trainer.max_steps or now - self._last_time >= self.max_silence_s
        ):
            self._print(self.line(trainer))
            self._last_step, self._last_time = step, now

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled or trainer.sanity_checking:
            return
        counts = trainer.num_val_batches
        batches = sum(counts) if isinstance(counts, list) else counts
        if self._bar is not None:
            total = batches if math.isfinite(batches) else None
            self._val_task = self._bar.add_task("validating", total=total, unit="batches", eta="", info="")
        else:
            count = f" ({batches} batches)" if math.isfinite(batches) else ""
            self._print(f"{self.name}: validating at step {trainer.global_step}{count}")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._bar is not None and self._val_task is not None:
            self._bar.advance(self._val_task)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._bar is not None and self._val_task is not None:
            self._bar.remove_task(self._val_task)
            self._val_task = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled and self._bar is None and trainer.global_step != self._last_step:
            self._print(self.line(trainer))  # stopped early (a pruned trial): where it stopped
            self._last_step = trainer.global_step
        self._stop()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._stop()  # the terminal gets its cursor back before the error is printed

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar, self._task, self._val_task = None, None, None
