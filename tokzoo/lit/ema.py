"""Exponential moving average (EMA) of the tokenizer's weights, as a Lightning callback (config section `ema`).

After every optimizer step: ema <- d * ema + (1 - d) * weights, one fused `torch._foreach_lerp_` over the tracked
tensors. With `ema.warmup` the decay of the t-th update (t = 1, 2, ...) is min(decay, (1 + t) / (10 + t)), the
usual warm-up (TensorFlow's ExponentialMovingAverage with num_updates), so that the EMA does not stay near the
initial weights in short runs. The EMA starts from the weights training starts with.

Tracked: the trainable parameters and the floating-point persistent buffers (e.g. an EMA-updated codebook) of the
tokenizer (`module.model`) only. The LPIPS and Inception nets, the discriminator, metric states, integer buffers
(counters, flags), constant non-persistent buffers and frozen parameters (requires_grad False) get no copy and are
never touched.

Validation runs on the EMA weights (swapped in at the start of the validation epoch, the raw ones put back at its
end, bit for bit), so val/* and the final metrics are the EMA's. With `ema.raw_metrics`, a second pass of the
module's own validation hooks over the same validation loader then runs on the raw weights, and the headline
metrics of that pass are logged as val_raw/<name> (catalogue.RAW_HEADLINE): it costs one more validation pass.

The state (EMA tensors, update count) is saved in every checkpoint, under checkpoint["callbacks"]["WeightEMA"],
and restored on resume, so that a resumed run continues the average exactly. `ema_state_dict(checkpoint)` gives
the module's state_dict with the EMA weights in place of the raw ones.

Why not Lightning's WeightAveraging / EMAWeightAveraging (2.6): its AveragedModel deep-copies the whole
LightningModule and averages all of it, one tensor at a time (EMAWeightAveraging passes a per-tensor avg_fn):
LPIPS VGG and Inception (several times the tokenizer's size, every step), the discriminator, metric states,
frozen parameters, and integer buffers (code-usage step counters, truncated to int); use_buffers=False instead
copies every buffer, metric states included, after every step. It logs no metric of the raw weights, and after
fit the module holds the average, so the runner's final checkpoint loses the raw weights.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from tokzoo.catalogue import HEADLINE, RAW_HEADLINE, absent_metrics, raw_name
from tokzoo.errors import ConfigError

STATE_KEY = "WeightEMA"


def ema_callback(config: dict[str, Any]) -> WeightEMA | None:
    """The callback for a run config, or None when the config has no EMA (section absent or ema.decay 0)."""
    ema = config.get("ema") or {}
    if not ema.get("decay"):
        return None
    return WeightEMA(ema["decay"], warmup=ema.get("warmup", True), raw_metrics=ema.get("raw_metrics", True))


def tracked_tensors(model: nn.Module, prefix: str = "") -> list[tuple[str, Tensor]]:
    """(state_dict name, tensor) of what the EMA averages: trainable parameters and floating-point persistent
    buffers, each tensor once (tied weights keep their first name)."""
    out, seen = [], set()
    for name, t in model.state_dict(keep_vars=True).items():
        keep = t.requires_grad if isinstance(t, nn.Parameter) else t.is_floating_point()
        if keep and id(t) not in seen:
            seen.add(id(t))
            out.append((prefix + name, t))
    return out


def ema_state_dict(checkpoint: dict[str, Any]) -> dict[str, Tensor]:
    """The checkpoint's module state_dict with the EMA weights in place of the raw ones (KeyError: no EMA)."""
    return {**checkpoint["state_dict"], **checkpoint["callbacks"][STATE_KEY]["ema"]}


class WeightEMA(L.Callback):
    def __init__(self, decay: float, warmup: bool = True, raw_metrics: bool = True):
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"ema.decay must lie in (0, 1) for an EMA, got {decay!r}")
        self.decay, self.warmup, self.raw_metrics = float(decay), bool(warmup), bool(raw_metrics)
        self.updates = 0  # EMA updates so far, one per optimizer step
        self.step = 0  # trainer.global_step at the last update (with gradient accumulation, batches > steps)
        self.names: list[str] = []
        self.ema: list[Tensor] = []  # fp32 copies, in the order of names
        self._live: list[Tensor] = []  # the module's tensors they average (the objects: .to() keeps them)
        self._fused: tuple[list[Tensor], list[Tensor]] = ([], [])  # (ema, live) pairs of one dtype: one lerp
        self._cast: list[tuple[Tensor, Tensor]] = []  # half-precision weights (precision *-true): fp32 average
        self._pending: dict[str, Any] | None = None  # loaded from a checkpoint before the copies exist
        self._stash: list[Tensor] | None = None  # the raw values while the EMA is swapped in

    @property
    def state_key(self) -> str:
        return STATE_KEY

    def decay_at(self, t: int) -> float:
        """The decay of the t-th update (t >= 1)."""
        return min(self.decay, (1 + t) / (10 + t)) if self.warmup else self.decay

    # ---- the average ------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Here the weights are on their device and, on resume, restored (by every strategy); a loaded EMA then
        # replaces the copies of the restored weights.
        pairs = tracked_tensors(pl_module.model, prefix="model.")
        self.names = [n for n, _ in pairs]
        self._live = [t for _, t in pairs]
        self.ema = [t.detach().float().clone() for t in self._live]
        same = [(e, p) for e, p in zip(self.ema, self._live) if p.dtype == e.dtype]
        self._fused = ([e for e, _ in same], [p for _, p in same])
        self._cast = [(e, p) for e, p in zip(self.ema, self._live) if p.dtype != e.dtype]
        if self._pending is not None:
            self._restore(self._pending)
            self._pending = None
        if self.raw_metrics:
            pl_module.absent.update(absent_metrics(pl_module.config, prefix="val_raw/"))

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step <= self.step:
            return  # accumulating gradients: no optimizer step in this batch
        self.step = trainer.global_step
        self.updates += 1
        weight = 1.0 - self.decay_at(self.updates)
        if self._fused[0]:
            torch._foreach_lerp_(*self._fused, weight)  # e += weight * (p - e): a frozen e == p stays exact
        for e, p in self._cast:
            e.lerp_(p.float(), weight)

    # ---- validation on the EMA, then on the raw weights ---------------------------------------------------------
    @torch.no_grad()
    def _swap_in(self) -> None:
        self._stash = [p.detach().clone() for p in self._live]
        for p, e in zip(self._live, self.ema):
            p.detach().copy_(e)

    @torch.no_grad()
    def _swap_out(self) -> None:
        if self._stash is not None:
            for p, raw in zip(self._live, self._stash):
                p.detach().copy_(raw)
            self._stash = None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.ema and not trainer.sanity_checking:
            self._swap_in()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the module's epoch end and Lightning's logging of val/*, before checkpoint callbacks (always last).
        was_swapped = self._stash is not None
        self._swap_out()
        if not (was_swapped and self.raw_metrics):
            return
        metrics = {raw_name(k): v for k, v in raw_validation(trainer, pl_module).items() if raw_name(k) in RAW_HEADLINE}
        for name in HEADLINE:
            # reasons validation found (no labels, too few images for rFID)
            if raw_name(name) in RAW_HEADLINE and name in pl_module.absent:
                pl_module.absent.setdefault(raw_name(name), pl_module.absent[name])
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        if trainer.is_global_zero and metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._swap_out()  # a SIGTERM during validation: the checkpoint written next must hold the raw weights

    # ---- checkpoints --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if not self.ema and self._pending is not None:
            return self._pending  # saved before training started: keep what was loaded
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "updates": self.updates,
            "step": self.step,
            "ema": dict(zip(self.names, self.ema)),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.ema:
            self._restore(state_dict)
        else:
            self._pending = state_dict

    @torch.no_grad()
    def _restore(self, state: dict[str, Any]) -> None:
        saved = state["ema"]
        if set(saved) != set(self.names):
            diff = sorted(set(saved) ^ set(self.names))
            raise ConfigError(
                f"the checkpoint's EMA does not match the model ({len(diff)} tensor(s) differ, e.g. {diff[:3]}); "
                f"delete the checkpoint to start over"
            )
        for name, e in zip(self.names, self.ema):
            e.copy_(saved[name])
        self.updates, self.step = int(state["updates"]), int(state["step"])


@torch.no_grad()
def raw_validation(trainer: L.Trainer, module: L.LightningModule) -> dict[str, float]:
    """One more pass of the module's own validation hooks over the trainer's validation loader, with the weights
    in place now; returns what the module would log. The global RNG is left as it was (the loader's iterator
    draws a seed from it), so that this pass changes nothing in training."""
    logged: dict[str, float] = {}
    loader = trainer.val_dataloaders
    loader = loader[0] if isinstance(loader, (list, tuple)) else loader
    limit = trainer.num_val_batches[0] if trainer.num_val_batches else math.inf
    grid, was_training = module.grid_path, module.training
    module.grid_path = None  # the grid shows the EMA's reconstructions
    module.log = lambda name, value, **_: logged.__setitem__(name, float(value))  # Lightning forbids self.log here
    module.eval()
    devices = [module.device] if module.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            module.on_validation_epoch_start()
            for i, batch in enumerate(loader):
                if i >= limit:
                    break
                trainer.strategy.validation_step(trainer.strategy.batch_to_device(batch), i)
            module.on_validation_epoch_end()
    finally:
        del module.log
        module.grid_path = grid
        module.train(was_training)
    return logged
