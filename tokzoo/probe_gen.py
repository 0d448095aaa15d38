"""`tokzoo probe-gen EXPERIMENT [--variant NAME] [--steps N]`: the generation probe on finished runs, from their final
checkpoints (the EMA weights when the run kept an EMA), logged into the same MLflow runs."""

from __future__ import annotations

from pathlib import Path

import torch

from tokzoo.errors import ConfigError
from tokzoo.lit.ema import ema_state_dict
from tokzoo.lit.module import TokenizerModule
from tokzoo.probe_run import probe_and_log
from tokzoo.runner import build_datamodule


def probe_experiment(
    experiment: str, variant: str | None, uri: str, steps: int | None = None
) -> list[tuple[str, dict]]:
    """`tokzoo probe-gen`: the probe on each FINISHED run of `experiment` (or the one named `variant`), from its
    final checkpoint. Returns (variant, metrics) per run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"no MLflow experiment '{experiment}' at {uri}; run `tokzoo fit` first or fix --tracking-uri")
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'")
    names = sorted({r.data.tags.get("tokzoo.variant", r.info.run_name) for r in runs})
    if variant is not None:
        runs = [r for r in runs if r.data.tags.get("tokzoo.variant", r.info.run_name) == variant]
        if not runs:
            raise ConfigError(
                f"experiment '{experiment}' has no finished variant '{variant}'; it has: {', '.join(names)}"
            )
    out = []
    for run in runs:
        name = run.data.tags.get("tokzoo.variant", run.info.run_name)
        ckpt = run.data.tags.get("tokzoo.checkpoint")
        if not ckpt or not Path(ckpt).is_file():
            raise ConfigError(
                f"variant '{name}' of '{experiment}': its final checkpoint {ckpt or '(not recorded)'} is not on this "
                f"machine; rerun `tokzoo fit` for it here"
            )
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        config = state["hyper_parameters"]["config"]
        weights = ema_state_dict(state) if config["ema"]["decay"] > 0 else state["state_dict"]
        if steps is not None:
            config["eval"]["generation"]["steps"] = steps
        elif config["eval"]["generation"]["steps"] == 0:
            raise ConfigError(f"variant '{name}' was trained with eval.generation.steps=0; pass --steps N")
        module = TokenizerModule(config)
        module.load_state_dict(weights)
        step = int(state.get("global_step", 0))
        out_dir = Path(ckpt).parent.parent
        metrics = probe_and_log(module.model, build_datamodule(config), config, client, run.info.run_id, step, out_dir)
        out.append((name, metrics))
    return out
