"""The generation probe around a run: after a variant trains (runner.fit_variant) and on a finished run
(`tokzoo probe-gen`, tokzoo/probe_gen.py), logging into that variant's MLflow run.

    metrics = probe_and_log(module.model, datamodule, config, client, run_id, step, out_dir, device)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tokzoo.generation.probe import run_probe


def dataset_identity(config: dict[str, Any]) -> dict[str, Any]:
    """What keys the reference classifier's cache: the dataset and its arguments at this image size."""
    data = config["data"]
    return {"data": data["name"], "kwargs": data["kwargs"], "image_size": config["model"]["image_size"]}


def probe_and_log(
    model: torch.nn.Module,
    datamodule: Any,
    config: dict[str, Any],
    client: Any,
    run_id: str,
    step: int,
    out_dir: Path,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Run the probe on `model` (on `device`, then back where it was), log metrics, absence tags and the sample
    grid into the run; returns the metrics."""
    home = next(model.parameters()).device
    model.to(device)
    try:
        result = run_probe(model, datamodule, config, dataset_identity(config))
    finally:
        model.to(home)
    for name, value in result.metrics.items():
        client.log_metric(run_id, name, float(value), step=step)
    for name, reason in result.absent.items():
        client.set_tag(run_id, f"absent.{name}", reason[:5000])
    if result.grid is not None and len(result.grid):
        from torchvision.utils import save_image

        path = out_dir / "gen_samples.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        per_row = config["eval"]["generation"]["grid_per_class"] or 8
        save_image(result.grid, path, nrow=per_row)  # one row per class
        client.log_artifact(run_id, str(path))
    return result.metrics
