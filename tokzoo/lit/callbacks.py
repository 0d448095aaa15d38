"""Small Lightning callbacks: training throughput."""

from __future__ import annotations

import time

import lightning as L


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
