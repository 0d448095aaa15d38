"""`tokzoo sweep`: Optuna studies over run-config keys, one training subprocess per trial.

spec: the sweep file and its checks; optuna_side: storages, pruners, samplers, the budget (shared by the sweep and
its trials); liveness: trial owners, heartbeats, stale trials and outcomes of trials another process failed; pool:
the sweep process and its worker pool; launch: starting a trial process (devices, environment); trial:
the trial process (`python -m tokzoo.sweep run-trial DIR`); report: best trials and the final table. The names
below are the package's public ones (the CLI, tests and notebooks import them from here).
"""

from tokzoo.sweep.launch import RESULT_FILE, Running, gpu_ids, trial_devices, trial_env, visible_entries
from tokzoo.sweep.liveness import (
    BEAT_ATTR,
    OWNER_ATTR,
    Heartbeat,
    fail_stale,
    native_heartbeat,
    owner_alive,
    process_identity,
    record_beat,
    record_outcome,
)
from tokzoo.sweep.optuna_side import (
    OBJECTIVES_ATTR,
    PRUNER_CLASSES,
    SURPLUS,
    AskTellGridSampler,
    Requeue,
    budget_used,
    make_pruner,
    make_sampler,
    open_storage,
    retried_numbers,
    suggest,
)
from tokzoo.sweep.pool import Sweep, parent_run, run_sweep
from tokzoo.sweep.report import SweepOutcome, best_trials, sweep_table
from tokzoo.sweep.spec import (
    DIRECTIONS,
    PRUNERS,
    SAMPLERS,
    SWEEP_KEYS,
    Objective,
    Param,
    SweepSpec,
    get_dotted,
    load_sweep,
    nest,
    parse_objective,
    parse_param,
    resolve_objectives,
)
from tokzoo.sweep.trial import main, pruning_hook, run_trial

__all__ = [
    "BEAT_ATTR", "DIRECTIONS", "OBJECTIVES_ATTR", "OWNER_ATTR", "PRUNERS", "PRUNER_CLASSES", "RESULT_FILE", "SAMPLERS",
    "SURPLUS", "SWEEP_KEYS", "AskTellGridSampler", "Heartbeat", "Objective", "Param", "Requeue", "Running", "Sweep",
    "SweepOutcome", "SweepSpec", "best_trials", "budget_used", "fail_stale", "get_dotted", "gpu_ids", "load_sweep",
    "main", "make_pruner", "make_sampler", "native_heartbeat", "nest", "open_storage", "owner_alive", "parent_run",
    "parse_objective", "parse_param", "process_identity", "pruning_hook", "record_beat", "record_outcome",
    "resolve_objectives", "retried_numbers", "run_sweep", "run_trial", "suggest", "sweep_table", "trial_devices",
    "trial_env", "visible_entries",
]  # fmt: skip
