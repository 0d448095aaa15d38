"""The trial process: `python -m tokzoo.sweep run-trial DIR` trains one trial from the folder the sweep wrote.

Every DDP rank runs it (Lightning re-executes the command per rank) and reads the same config.yaml; rank 0 writes
result.json, which the sweep process reads. With a pruner, rank 0 reports the objective to the study after each
validation, through the same storage opener and pruner map as the sweep process (optuna_side).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml

from tokzoo.config import resolve
from tokzoo.sweep import optuna_side
from tokzoo.sweep.launch import RESULT_FILE, die_with_the_sweep


def run_trial(folder: str | Path) -> int:
    """Train one trial from its folder (every DDP rank runs this); rank 0 writes result.json."""
    import multiprocessing
    import os

    import torch

    from tokzoo.config import Variant, config_hash
    from tokzoo.distributed import env_rank  # imports torch: only here, not in the sweep process
    from tokzoo.output import configure_output
    from tokzoo.runner import check_variant, fit_variant

    configure_output()  # log.txt holds tokzoo's lines (its tail is a failed trial's reason); verbose: $TOKZOO_VERBOSE

    folder = Path(folder)
    meta = json.loads((folder / "trial.json").read_text())
    config = resolve(yaml.safe_load((folder / "config.yaml").read_text()))
    # what this rank trains and how it was started, for audits (and the tests): params and hash equal on every rank
    audit = {
        "params": meta["params"], "hash": config_hash(config), "pid": os.getpid(), "threads": torch.get_num_threads(),
        "forked": multiprocessing.parent_process() is not None,  # from the warm process (sweep/warm.py)
    }  # fmt: skip
    (folder / f"rank{env_rank()}.json").write_text(json.dumps(audit))
    result: dict[str, Any] = {}
    try:
        variant = Variant(name=f"trial-{meta['number']:04d}", config=config, seed=config["seed"])
        check_variant(variant)
        tags = {
            "mlflow.parentRunId": meta["parent_run_id"], "tokzoo.study": meta["study"],
            "tokzoo.trial": str(meta["number"]), "optuna.trial_number": str(meta["number"]),
            **{f"optuna.param.{k}": str(v) for k, v in meta["params"].items()},
        }  # fmt: skip
        hook = pruning_hook(meta, result) if meta["pruner"].get("type", "none") != "none" else None
        # resume=False: a trial is one fresh run; an equal config in an older study of the same experiment is no result
        out = fit_variant(meta["experiment"], variant, meta["uri"], extra_tags=tags, on_validation=hook, resume=False)
    except Exception as err:
        if env_rank() == 0:
            result["error"] = f"{type(err).__name__}: {err}"
            (folder / RESULT_FILE).write_text(json.dumps(result, default=str))
        raise
    if env_rank() == 0:
        # absent: why an objective was not logged, as the module decided it (also the run's absent.* tags)
        result.update(metrics=out.metrics, run_id=out.run_id, seconds=out.seconds, absent=dict(out.absent))
        if out.status == "failed":  # a non-finite loss stopped it: the real reason, not "objective absent"
            result["error"] = f"NonFiniteLossError: {out.error}"
        (folder / RESULT_FILE).write_text(json.dumps(result, default=str))
    return 0


def pruning_hook(meta: dict[str, Any], result: dict[str, Any]) -> Callable[[int, dict[str, float]], bool]:
    """Report the objective after each validation to the study and ask the study's pruner (called on rank 0)."""
    pruner = optuna_side.make_pruner(meta["pruner"])
    # no heartbeat here: the sweep process beats for this trial and is the one that judges others
    storage = optuna_side.open_storage(meta["storage"], heartbeat_interval=None)
    study = optuna.load_study(study_name=meta["study"], storage=storage, pruner=pruner)
    trial = optuna.trial.Trial(study, meta["trial_id"])
    metric = meta["objectives"][0]["metric"]
    reporting = [True]

    def hook(step: int, metrics: dict[str, float]) -> bool:
        if metric not in metrics or not reporting[0]:
            return False
        try:
            trial.report(metrics[metric], step)
        except optuna.exceptions.UpdateFinishedTrialError:
            # another sweep process failed this trial (it took it for stale) and re-queued a copy: training goes
            # on unpruned, and the sweep process records the outcome in that copy
            print(f"trial {trial.number} was finished by another process: no more pruning reports", flush=True)
            reporting[0] = False
            return False
        if trial.should_prune():
            result.update(pruned=True, pruned_step=step)
            return True
        return False

    return hook


def main(argv: Sequence[str] | None = None) -> int:
    die_with_the_sweep()
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] != "run-trial":
        print("usage: python -m tokzoo.sweep run-trial TRIAL_FOLDER", file=sys.stderr)
        return 2
    return run_trial(argv[1])
