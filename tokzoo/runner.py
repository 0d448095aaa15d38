"""`tokzoo fit`: train every variant of an ablation, one MLflow run each, and summarise.

Runs on every DDP rank (Lightning re-executes the command per rank); only rank 0 talks to MLflow and prints.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from tokzoo.catalogue import HEADLINE, RAW_HEADLINE, RAW_PREFIX
from tokzoo.config import Variant, flatten, load_variants
from tokzoo.data import DATASETS
from tokzoo.distributed import is_env_rank_zero
from tokzoo.errors import ConfigError, NonFiniteLossError
from tokzoo.lit.callbacks import ImagesPerSecond, SharedOutputDir, StepProgress
from tokzoo.lit.datamodule import TokzooDataModule, train_augment
from tokzoo.lit.ema import ema_callback, ema_state_dict
from tokzoo.lit.module import TokenizerModule
from tokzoo.model import UnifiedTokenizer
from tokzoo.probe_run import probe_and_log
from tokzoo.registry import check_kwargs
from tokzoo.resume import (
    COMPLETE_TAG,
    RollingCheckpoint,
    checked_checkpoint,
    checkpoint_path,
    continuation,
    is_complete,
    previous_runs,
    resume_checkpoint,
)
from tokzoo.tracking import (
    artifact_location,
    check_tracking,
    ensure_experiment,
    param_value,
    run_tags,
    tracking_uri,
)
from tokzoo.tracking_buffer import BufferedMLFlowLogger, replay_pending

log = logging.getLogger("tokzoo.runner")

# Set while Trainer.fit runs: there a SIGTERM is turned into a checkpoint and a clean stop by Lightning.
TRAINING = threading.Event()

SUMMARY_METRICS = (*HEADLINE, *RAW_HEADLINE, "perf/images_per_sec")  # val_raw/*: runs with an EMA only


@dataclass
class VariantResult:
    name: str
    bits_per_token: float
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    run_id: str | None = None
    checkpoint: str | None = None
    status: str = "trained"  # trained | resumed | done earlier | failed
    error: str | None = None
    absent: dict[str, str] = field(default_factory=dict)  # metric -> why it was not logged (the absent.* tags)


def trainer_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(config["trainer"])
    accepted = set(inspect.signature(L.Trainer.__init__).parameters) - {"self", "logger", "callbacks"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ConfigError(
            f"unknown trainer key(s) {', '.join('trainer.' + k for k in unknown)}; the trainer section takes "
            f"lightning.Trainer arguments (e.g. max_steps, devices, strategy, precision)"
        )
    if kwargs.get("val_check_interval") is None and kwargs.get("check_val_every_n_epoch") is None:
        kwargs["val_check_interval"] = kwargs["max_steps"]  # validate once, at the end of training
    kwargs.setdefault("max_epochs", -1)
    if "log_every_n_steps" in kwargs:  # a run shorter than the interval would log no training metric at all
        kwargs["log_every_n_steps"] = max(1, min(kwargs["log_every_n_steps"], kwargs["max_steps"]))
    if kwargs.get("strategy", "auto") in ("ddp", "auto") and picks_ddp(kwargs):
        # The quantizers all-reduce their own codebook state; DDP's per-forward broadcast of rank 0's buffers
        # would only cost communication and hide a rank that drifted. `auto` on several devices or nodes is DDP
        # too, and gets the same settings.
        from lightning.pytorch.strategies import DDPStrategy

        kwargs["strategy"] = DDPStrategy(broadcast_buffers=False)
    return kwargs


def picks_ddp(kwargs: dict[str, Any]) -> bool:
    """Whether Lightning resolves these trainer settings to its DDP strategy (several devices or nodes)."""
    from lightning.pytorch.strategies import DDPStrategy

    if kwargs.get("strategy") == "ddp":
        return True
    try:
        probe = throwaway_trainer(kwargs)
    except (MisconfigurationException, ValueError, TypeError, RuntimeError):
        return False  # check_variant reports the settings Lightning rejects
    return type(probe.strategy) is DDPStrategy


def build_datamodule(config: dict[str, Any]) -> TokzooDataModule:
    data = config["data"]
    return TokzooDataModule(
        name=data["name"],
        image_size=config["model"]["image_size"],
        batch_size=data["batch_size"],
        num_workers=data["num_workers"],
        val_batch_size=data["val_batch_size"],
        dataset_kwargs=data["kwargs"],
        seed=config["seed"],
        augment=data.get("augment"),
    )


class ValidationHook(L.Callback):
    """Calls fn(global_step, val metrics) on rank 0 after each validation; True from fn stops training on every
    rank (used by sweeps to report intermediate values and prune)."""

    def __init__(self, fn: Callable[[int, dict[str, float]], bool]):
        self.fn = fn

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        stop = False
        if trainer.is_global_zero:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", RAW_PREFIX))}
            stop = bool(self.fn(trainer.global_step, metrics))
        if trainer.strategy.broadcast(stop):
            trainer.should_stop = True


def result_from_run(run: Any, variant: Variant, bits: float) -> VariantResult:
    metrics = {k: v for k, v in run.data.metrics.items() if k.startswith(("val/", RAW_PREFIX, "perf/"))}
    result = VariantResult(variant.name, bits, metrics, run.data.metrics.get("perf/wall_seconds", 0.0))
    result.run_id, result.status = run.info.run_id, "done earlier"
    return result


def fit_variant(
    experiment: str,
    variant: Variant,
    uri: str,
    extra_tags: dict[str, str] | None = None,
    on_validation: Callable[[int, dict[str, float]], bool] | None = None,
    resume: bool = True,
    start_from: Path | None = None,
) -> VariantResult:
    """Train one variant into one MLflow run. With resume (default): a variant whose run already FINISHED with the
    same config hash is skipped, and an interrupted one continues from its last checkpoint into the same run.
    start_from: a shorter budget's checkpoint that a new run of this variant continues (resume.continuation)."""
    config = variant.config
    last = checkpoint_path(experiment, variant)
    out_dir = last.parent.parent
    replay_pending(uri, out_dir, rank_zero=is_env_rank_zero())  # what an earlier process could not send, first
    prior = previous_runs(uri, experiment, variant) if resume else []
    finished = next((r for r in prior if is_complete(r)), None)
    if finished is not None:
        bits = float(finished.data.params.get("model.quantizer.bits_per_token", "nan"))
        return result_from_run(finished, variant, bits)
    ckpt_path = resume_checkpoint(last, variant) if resume else None
    run_id = prior[0].info.run_id if (ckpt_path is not None and prior) else None
    continued = ckpt_path is None and start_from is not None
    ckpt_path = start_from if continued else ckpt_path

    L.seed_everything(variant.seed, workers=True, verbose=False)
    if run_id is None and is_env_rank_zero():  # Lightning's logger would create it too, with a warning
        ensure_experiment(uri, experiment)
    kwargs = trainer_kwargs(config)
    datamodule = build_datamodule(config)
    module = TokenizerModule(config)
    module.grid_path = out_dir / "recon_grid.png"
    logger = BufferedMLFlowLogger(  # keeps what an unreachable server cannot take (tracking_buffer)
        journal_folder=out_dir,
        experiment_name=experiment,
        run_name=variant.name,
        tracking_uri=uri,
        artifact_location=artifact_location(uri),
        run_id=run_id,
        tags=None
        if run_id
        else run_tags(variant.name, variant.config_hash, {"tokzoo.experiment": experiment, **(extra_tags or {})}),
    )
    throughput = ImagesPerSecond()
    # One rolling checkpoint: every `checkpoint_every` steps, on any exception (SIGTERM, NaN), and at the end.
    checkpoint = RollingCheckpoint(
        dirpath=last.parent,
        filename=last.stem,
        every_n_train_steps=config["checkpoint_every"],
        save_on_exception=True,
        enable_version_counter=False,
    )
    callbacks = [throughput, checkpoint, LearningRateMonitor(logging_interval="step")]
    ema = ema_callback(config)  # None unless ema.decay > 0; before ValidationHook, which then sees val_raw/*
    if ema is not None:
        callbacks.append(ema)
    if on_validation is not None:
        callbacks.append(ValidationHook(on_validation))
    if kwargs.get("enable_progress_bar", True):  # in steps of max_steps (Lightning's bars count epochs' batches)
        callbacks.append(StepProgress(variant.name))
    callbacks.append(SharedOutputDir(out_dir))
    trainer = L.Trainer(logger=logger, callbacks=callbacks, default_root_dir=str(out_dir), **kwargs)
    if trainer.is_global_zero and run_id is not None:  # a resumed run is running again (a requeue marked it FINISHED)
        logger.experiment.update_run(run_id, status="RUNNING")
    if trainer.is_global_zero and run_id is None:
        params = {k: param_value(v) for k, v in flatten(config).items()}
        params["model.quantizer.bits_per_token"] = module.model.quantizer.bits_per_token
        params["model.quantizer.shape_label"] = module.model.quantizer.shape_label  # read by the plots' labels
        logger.log_hyperparams(params)
        for part, report in module.model.weight_reports().items():  # pretrained towers: what the file filled
            logger.experiment.set_tag(logger.run_id, f"tokzoo.weights.{part}", report[:5000])
    result = VariantResult(variant.name, module.model.quantizer.bits_per_token)
    if ckpt_path is not None:
        result.status = "continued" if continued else "resumed"
    start = time.perf_counter()
    TRAINING.set()  # Lightning's own SIGTERM handling is active inside fit (see cli.cmd_fit)
    try:
        with warnings.catch_warnings():
            # Lightning warns that a mid-epoch resume replays the epoch from its start; ours does not: the train
            # sampler continues from the restored global_step (TokzooDataModule._train_sampler).
            warnings.filterwarnings("ignore", message=".*checkpoint that ended before the epoch ended.*")
            # a longer budget continues a shorter one's checkpoint into its own folder; tokzoo keeps no "best" model
            warnings.filterwarnings("ignore", message=r"The dirpath has changed from")
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except NonFiniteLossError as err:
        # Lightning already marked the run failed and saved the last good state; record why and move on.
        result.status, result.error = "failed", str(err)
        if trainer.is_global_zero:
            logger.experiment.set_tag(logger.run_id, "tokzoo.fail_reason", str(err)[:5000])
            result.run_id = logger.run_id
        logger.flush_pending()
        return result
    finally:
        TRAINING.clear()
    result.seconds = time.perf_counter() - start
    trainer.save_checkpoint(last, weights_only=False)  # the whole final state (resumable), whatever checkpoint_every

    result.metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", RAW_PREFIX))}
    if throughput.value is not None:
        result.metrics["perf/images_per_sec"] = throughput.value
    if trainer.is_global_zero:
        client, run_id = logger.experiment, logger.run_id
        result.run_id = run_id
        client.log_metric(run_id, "perf/wall_seconds", result.seconds)
        result.absent = {m: why for m, why in sorted(module.absent.items()) if m not in result.metrics}
        for metric, reason in result.absent.items():
            client.set_tag(run_id, f"absent.{metric}", reason[:5000])
        for metric, level in module.chance.items():  # plots draw it (accuracy panels)
            if math.isfinite(level):
                client.set_tag(run_id, f"chance.{metric}", f"{level:.6g}")
        if module.grid_path.exists():
            client.log_artifact(run_id, str(module.grid_path))
        result.checkpoint = str(last)
        client.set_tag(run_id, "tokzoo.checkpoint", str(last.resolve()))  # `tokzoo probe-gen` reads it back
        if config["eval"]["generation"]["steps"] > 0:  # rank 0 alone: one result per run, also under DDP
            if config["ema"]["decay"] > 0:  # like validation, the probe judges the EMA weights
                module.load_state_dict(ema_state_dict(torch.load(last, map_location="cpu", weights_only=True)))
            where = (client, run_id, trainer.global_step, out_dir, trainer.strategy.root_device)
            result.metrics.update(probe_and_log(module.model, datamodule, config, *where))
        client.set_tag(run_id, COMPLETE_TAG, "true")  # last: a rerun skips this variant from here on
    logger.flush_pending()  # a server still down: the journal waits for the rerun
    for stale in out_dir.glob("hpc_ckpt_*.ckpt"):  # the rolling checkpoint now holds the final state
        stale.unlink(missing_ok=True)
    return result


def check_variant(variant: Variant) -> int:
    """Build everything a variant names, without training, so that a bad variant fails before any run starts."""
    config = variant.config
    kwargs = trainer_kwargs(config)
    try:  # values (precision, accelerator, devices) are checked by Lightning itself; nothing is launched here
        throwaway_trainer(kwargs)
    except (MisconfigurationException, ValueError, TypeError, RuntimeError) as err:
        message = " ".join(str(err).split())
        named = [f"trainer.{k}={kwargs[k]!r}" for k in config["trainer"] if k.replace("_", " ") in message.lower()]
        where = f" ({', '.join(named)})" if named else ""
        raise ConfigError(f"trainer settings rejected by Lightning{where}: {message}") from None
    data = config["data"]
    check_kwargs(
        DATASETS.get(data["name"]),
        {"split": "train", "image_size": config["model"]["image_size"], **data["kwargs"]},
        f"dataset '{data['name']}' (data.kwargs)",
    )
    train_augment(data["name"], data.get("augment"), config["seed"])  # a dataset that cannot augment fails here
    supervision = config["loss"]["supervision"]
    with torch.device("meta"):  # registry names, argument names and dims are checked; no memory is allocated
        model = UnifiedTokenizer(config["model"], use_decoder=supervision != "contra", use_text=supervision != "recon")
    return sum(p.numel() for p in model.parameters())


def throwaway_trainer(kwargs: dict[str, Any]) -> L.Trainer:
    """A Trainer built only to let Lightning check and resolve the settings (no logger, nothing launched)."""
    with quiet_lightning():
        return L.Trainer(**{**kwargs, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False})


@contextlib.contextmanager
def quiet_lightning():
    """Silence Lightning's info banners (GPU available, tips) for throwaway pre-flight Trainers."""
    log = logging.getLogger("lightning.pytorch")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def check_output_dir(folder: Path, needed_bytes: int) -> None:
    """Fail before training when checkpoints could not be written: unwritable folder or too little free disk."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".tokzoo-write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"output_dir {folder} is not writable ({err.strerror or err}); set output_dir to a writable folder"
        ) from None
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise ConfigError(
            f"output_dir {folder} has {free / 2**20:.0f} MiB free but a checkpoint needs about "
            f"{needed_bytes / 2**20:.0f} MiB; free some space or set output_dir elsewhere"
        )


def create_store_once(uri: str) -> None:
    """Create a new SQLite store's tables while holding a lock on its folder: processes that torchrun or srun start
    together would otherwise all try to create them at once, and all but one fail ("table ... already exists").
    The lock is on the folder itself, so no lock file is left beside the store."""
    if not uri.startswith("sqlite:///"):
        return
    import fcntl

    from mlflow import MlflowClient

    folder = os.open(Path(uri[len("sqlite:///") :]).parent or ".", os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # a filesystem without flock: the store is created unlocked, as before
            fcntl.flock(folder, fcntl.LOCK_EX)
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    finally:
        os.close(folder)  # releases the lock


def fit(path: str, overrides: list[str]) -> tuple[str, list[VariantResult]]:
    experiment, variants = load_variants(path, overrides)
    uri = tracking_uri(variants[0].config["tracking"]["uri"])
    check_tracking(uri)
    create_store_once(uri)
    largest = 0
    for variant in variants:
        try:
            largest = max(largest, check_variant(variant))
            existing = checkpoint_path(experiment, variant)
            if existing.exists():  # a foreign or truncated checkpoint fails now, not after other variants trained
                checked_checkpoint(existing, variant)
        except ConfigError as err:
            raise ConfigError(f"variant '{variant.name}': {err}") from None
    # A checkpoint holds fp32 weights, two AdamW moments and the EMA if any; keep room for the file being replaced.
    copies = 3 + any(ema_callback(v.config) is not None for v in variants)
    for folder in {Path(v.config["output_dir"]) for v in variants}:
        check_output_dir(folder, needed_bytes=2 * copies * 4 * largest)
    results, by_name, told = [], {v.name: v for v in variants}, False
    for variant in variants:
        try:
            start, why_not = continuation(experiment, variant, by_name.get(variant.shorter))
            tags = {} if variant.budget is None else {"tokzoo.budget": str(variant.budget)}
            if start is not None:
                tags["tokzoo.continued_from"] = variant.shorter
            elif why_not is not None:
                tags["tokzoo.budget_restart"] = why_not[:5000]
                if not told:  # once: the reason is the same for every budget of this ablation
                    log.warning("budgets train from step 0, not from the shorter budget's checkpoint: %s", why_not)
                    told = True
            results.append(fit_variant(experiment, variant, uri, extra_tags=tags, start_from=start))
        except ConfigError as err:
            raise ConfigError(f"variant '{variant.name}': {err}") from None
    return experiment, results
