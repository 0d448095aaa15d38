"""What a variant resumes from: its earlier MLflow runs, whether one of them is complete, and its checkpoints
(the rolling one tokzoo writes, the one Lightning's SLURM auto-requeue writes), each checked against the config."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tokzoo.config import Variant, budget_dependence, config_hash
from tokzoo.errors import ConfigError, NonFiniteLossError

log = logging.getLogger("tokzoo.runner")


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def previous_runs(uri: str, experiment: str, variant: Variant) -> list[Any]:
    """Runs of this experiment for this variant and config hash, newest first (empty if none or no experiment)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    query = f"tags.`tokzoo.variant` = '{variant.name}' and tags.`tokzoo.config_hash` = '{variant.config_hash}'"
    return client.search_runs([exp.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"])


COMPLETE_TAG = "tokzoo.complete"  # set as the last step of a variant; MLflow's FINISHED alone proves nothing


def is_complete(run: Any) -> bool:
    """A run counts as done only when tokzoo recorded it: Lightning's MLflow logger marks a run FINISHED when SLURM's
    auto-requeue signal stops a job halfway (tokzoo's logger no longer does, but older runs and other loggers may),
    and the requeued job must then resume it, not skip it."""
    return run.info.status == "FINISHED" and run.data.tags.get(COMPLETE_TAG) == "true"


def checkpoint_path(experiment: str, variant: Variant) -> Path:
    """outputs/<experiment>/<variant>/checkpoints/last-<hash>.ckpt. Named by config hash: changing a value starts a
    new checkpoint instead of resuming from an unrelated one."""
    folder = Path(variant.config["output_dir"]) / safe_name(experiment) / safe_name(variant.name)
    return folder / "checkpoints" / f"last-{variant.config_hash}.ckpt"


def checked_checkpoint(path: Path, variant: Variant) -> Path:
    """A checkpoint to resume from must come from the same config; anything else is refused, never mixed in."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign files: name the file and the fix
        raise ConfigError(f"checkpoint {path} cannot be read ({type(err).__name__}); delete it to start over") from None
    saved = (state.get("hyper_parameters") or {}).get("config")
    if not isinstance(saved, dict) or config_hash(saved) != variant.config_hash:
        raise ConfigError(
            f"checkpoint {path} was written by a different config than variant '{variant.name}' "
            f"(hash {config_hash(saved) if isinstance(saved, dict) else 'unknown'} vs {variant.config_hash}); "
            f"delete it, or set output_dir to a fresh folder"
        )
    return path


def resume_checkpoint(last: Path, variant: Variant) -> Path | None:
    """The newest resumable state of a variant: its rolling checkpoint, or the one Lightning's SLURM auto-requeue
    saved into the variant folder (hpc_ckpt_N.ckpt) when that is newer. Both must come from this config."""
    found = [p for p in (last, *last.parent.parent.glob("hpc_ckpt_*.ckpt")) if p.is_file()]
    if not found:
        return None
    return checked_checkpoint(max(found, key=lambda p: p.stat().st_mtime_ns), variant)


class RollingCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that saves on SIGTERM and other interruptions, but not on a non-finite loss: the weights of
    a diverging step are no 'last good' state, so the previous rolling checkpoint is kept instead."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # nothing worth saving after a non-finite loss, nor after a start-up check failed (before any restore:
        # saving then would replace the last good state with fresh weights)
        if not isinstance(exception, (NonFiniteLossError, ConfigError)):
            super().on_exception(trainer, pl_module, exception)
            if trainer.is_global_zero:
                where = self.format_checkpoint_name(self._monitor_candidates(trainer))
                log.warning("%s at step %d: saved checkpoint %s", type(exception).__name__, trainer.global_step, where)


def continuation(experiment: str, variant: Variant, shorter: Variant | None) -> tuple[Path | None, str | None]:
    """(checkpoint, why not): the state of the same variant and seed at the next smaller budget, which this budget's
    run continues from when nothing in the config is scheduled over the budget; else None and the reason."""
    if shorter is None:
        return None, None
    reason = budget_dependence(variant.config)
    if reason is not None:
        return None, reason
    last = checkpoint_path(experiment, shorter)
    if not last.is_file():
        return None, f"the {shorter.budget}-step run left no checkpoint at {last}"
    return checked_checkpoint(last, shorter), None
