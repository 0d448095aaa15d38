"""`tokzoo fit`: train every variant of an ablation, one MLflow run each, and summarise.

Runs on every DDP rank (Lightning re-executes the command per rank); only rank 0 talks to MLflow and prints.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger

from tokzoo.config import Variant, flatten, load_variants
from tokzoo.data import DATASETS
from tokzoo.errors import ConfigError
from tokzoo.lit.callbacks import ImagesPerSecond
from tokzoo.lit.datamodule import TokzooDataModule
from tokzoo.lit.module import TokenizerModule
from tokzoo.model import UnifiedTokenizer
from tokzoo.tracking import check_tracking, param_value, run_tags, tracking_uri

SUMMARY_METRICS = (
    "val/psnr",
    "val/ssim",
    "val/lpips",
    "val/rfid",
    "val/zeroshot_acc",
    "val/linprobe_acc",
    "val/codebook_usage",
    "val/perplexity",
    "perf/images_per_sec",
)


@dataclass
class VariantResult:
    name: str
    bits_per_token: float
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    run_id: str | None = None
    checkpoint: str | None = None


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


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
    return kwargs


def build_datamodule(config: dict[str, Any]) -> TokzooDataModule:
    data = config["data"]
    return TokzooDataModule(
        name=data["name"],
        image_size=config["model"]["image_size"],
        batch_size=data["batch_size"],
        num_workers=data["num_workers"],
        val_batch_size=data["val_batch_size"],
        dataset_kwargs=data["kwargs"],
    )


def fit_variant(experiment: str, variant: Variant, uri: str) -> VariantResult:
    config = variant.config
    L.seed_everything(variant.seed, workers=True, verbose=False)
    kwargs = trainer_kwargs(config)
    datamodule = build_datamodule(config)
    module = TokenizerModule(config)
    out_dir = Path(config["output_dir"]) / safe_name(experiment) / safe_name(variant.name)
    module.grid_path = out_dir / "recon_grid.png"
    logger = MLFlowLogger(
        experiment_name=experiment,
        run_name=variant.name,
        tracking_uri=uri,
        tags=run_tags(variant.name, variant.config_hash, {"tokzoo.experiment": experiment}),
    )
    throughput = ImagesPerSecond()
    checkpoint = ModelCheckpoint(dirpath=out_dir / "checkpoints", filename="last")
    callbacks = [throughput, checkpoint, LearningRateMonitor(logging_interval="step")]
    if kwargs.get("enable_progress_bar", True):
        from lightning.pytorch.callbacks import RichProgressBar

        callbacks.append(RichProgressBar())
    trainer = L.Trainer(logger=logger, callbacks=callbacks, default_root_dir=str(out_dir), **kwargs)
    if trainer.is_global_zero:
        params = {k: param_value(v) for k, v in flatten(config).items()}
        params["model.quantizer.bits_per_token"] = module.model.quantizer.bits_per_token
        logger.log_hyperparams(params)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start

    result = VariantResult(variant.name, module.model.quantizer.bits_per_token, seconds=seconds)
    result.metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if throughput.value is not None:
        result.metrics["perf/images_per_sec"] = throughput.value
    if trainer.is_global_zero:
        client, run_id = logger.experiment, logger.run_id
        result.run_id = run_id
        client.log_metric(run_id, "perf/wall_seconds", seconds)
        for metric, reason in sorted(module.absent.items()):
            if metric not in result.metrics:
                client.set_tag(run_id, f"absent.{metric}", reason[:5000])
        if module.grid_path.exists():
            client.log_artifact(run_id, str(module.grid_path))
        result.checkpoint = checkpoint.best_model_path or checkpoint.last_model_path or None
    return result


def check_variant(variant: Variant) -> None:
    """Build everything a variant names, without training, so that a bad variant fails before any run starts."""
    config = variant.config
    trainer_kwargs(config)
    DATASETS.get(config["data"]["name"])
    supervision = config["loss"]["supervision"]
    with torch.device("meta"):  # registry names, argument names and dims are checked; no memory is allocated
        UnifiedTokenizer(config["model"], use_decoder=supervision != "contra", use_text=supervision != "recon")


def fit(path: str, overrides: list[str]) -> tuple[str, list[VariantResult]]:
    experiment, variants = load_variants(path, overrides)
    uri = tracking_uri(variants[0].config["tracking"]["uri"])
    check_tracking(uri)
    for variant in variants:
        try:
            check_variant(variant)
        except ConfigError as err:
            raise ConfigError(f"variant '{variant.name}': {err}") from None
    results = []
    for variant in variants:
        results.append(fit_variant(experiment, variant, uri))
    return experiment, results
