"""Small Lightning callbacks: training throughput, and the progress display in steps of max_steps."""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn


class ImagesPerSecond(L.Callback):
    """perf/images_per_sec over training batches, skipping the first `warmup` (allocator, lazy init).

    Measures wall time between batch starts and ends on rank 0 and multiplies by the world size (every rank
    processes the same batch size). Logged at the end of training; `value` keeps it for the summary table.
    """

    def __init__(self, warmup: int = 5):
        self.warmup = warmup
        self.seen = 0
        self.images = 0
        self.seconds = 0.0
        self._start = 0.0
        self.value: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen += 1
        # a run shorter than the warmup still measures its last batch (else the metric would silently vanish)
        if self.seen > min(self.warmup, trainer.max_steps - 1 if trainer.max_steps > 0 else self.warmup):
            self.seconds += time.perf_counter() - self._start
            self.images += batch["image"].shape[0] * trainer.world_size

    def on_train_end(self, trainer, pl_module) -> None:
        if self.seconds > 0:
            self.value = self.images / self.seconds
            for logger in trainer.loggers:
                logger.log_metrics({"perf/images_per_sec": self.value}, step=trainer.global_step)


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
