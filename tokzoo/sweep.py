"""`tokzoo sweep`: Optuna studies over run-config keys, one training subprocess per trial.

The sweep process is the only one that samples: it asks the study for a trial, writes the trial's fully resolved
run config to `<output_dir>/<study>/trials/trial-NNNN/`, and launches `python -m tokzoo.sweep run-trial DIR`, the
real training entry point (a DDP trial re-launches that same command per rank, and every rank reads the same
config file, so the parameters are identical on every rank by construction). The trial writes `result.json`; the
sweep process reads it and tells the study. Up to `--workers` trials run at once; other sweep processes (other
terminals or machines, same storage) may join: the study is the only shared state.

A killed sweep leaves RUNNING trials behind. They are detected as stale (their owning process is gone, or their
heartbeat is older than the grace period), marked FAIL, and re-queued with the same parameters (Optuna's
`failed_trial` / `retry_history` system attrs), so re-running the command finishes the budget.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from tokzoo.config import defaults, flatten, load_variants, load_yaml, merge, parse_overrides, resolve
from tokzoo.errors import ConfigError
from tokzoo.tracking import artifact_location

SWEEP_KEYS = {
    "name", "description", "base", "ablation", "variant", "space", "objectives", "sampler", "pruner",
    "n_trials", "storage", "heartbeat", "retries",
}  # fmt: skip
SAMPLERS = ("grid", "tpe", "random", "nsga2")
PRUNERS = ("none", "median", "percentile", "successive_halving", "hyperband")
DIRECTIONS = ("minimize", "maximize")
OBJECTIVES_ATTR = "tokzoo.objectives"  # study user attr: the metric each objective actually uses, and why
OWNER_ATTR = "tokzoo.owner"  # trial system attr: host:pid:start-time of the sweep process running it
BEAT_ATTR = "tokzoo.heartbeat"  # trial system attr (journal storages): last time the owner was alive
RESULT_FILE = "result.json"
SURPLUS = "surplus: the budget was used up by another worker"  # fail reason of a trial that never ran


# ---------------------------------------------------------------------------------------------- sweep file


@dataclass
class Param:
    """One searched config key (dotted), with an optional condition on other keys of the trial's config."""

    name: str
    kind: str  # categorical | int | float
    choices: list[Any] | None = None
    options: dict[str, Any] | None = None  # categorical choices given as a mapping: label -> value set at `name`
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    when: dict[str, list[Any]] = field(default_factory=dict)

    def distribution(self) -> BaseDistribution:
        if self.kind == "categorical":
            return CategoricalDistribution(self.choices)
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(float(self.low), float(self.high), log=self.log, step=self.step)

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, self.choices)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def example(self) -> Any:
        return (
            self.value(self.choices[0])
            if self.kind == "categorical"
            else (int(self.low) if self.kind == "int" else self.low)
        )

    def value(self, suggested: Any) -> Any:
        """What the config gets for a suggested value (the mapped value for a labelled choice)."""
        return self.options[suggested] if self.options is not None else suggested

    def grid_values(self) -> list[Any]:
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int" and not self.log:
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        raise ConfigError(
            f"space key '{self.name}': the grid sampler needs categorical choices or a linear int range; "
            f"use type: categorical with explicit choices"
        )

    def active(self, config: dict[str, Any]) -> bool:
        return all(get_dotted(config, key) in values for key, values in self.when.items())


@dataclass
class Objective:
    metric: str
    direction: str
    fallback: Objective | None = None


@dataclass
class SweepSpec:
    name: str
    path: Path
    base: dict[str, Any]  # merged run config (defaults + base), before parameters and overrides
    overrides: dict[str, Any]  # command-line dot-list, applied after the parameters
    params: list[Param]
    objectives: list[Objective]
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    n_trials: int
    storage: str  # an RDB URL (sqlite:///, postgresql://...) or an absolute journal file path
    heartbeat_interval: int = 10
    grace_period: int = 60
    retries: int = 2

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def trial_config(self, params: dict[str, Any]) -> dict[str, Any]:
        """The resolved run config of a trial: base, then the trial's parameters, then the overrides."""
        return resolve(merge(self.apply(params), self.overrides))

    def apply(self, params: dict[str, Any]) -> dict[str, Any]:
        """The base with the trial's parameters merged in, in file order (unresolved)."""
        config = self.base
        by_name = {p.name: p for p in self.params}
        for name, value in params.items():
            config = merge(config, nest({name: by_name[name].value(value)}))
        return config


def get_dotted(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"model.quantizer.dim": 8} -> {"model": {"quantizer": {"dim": 8}}}."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _number(where: str, spec: dict, key: str, kind: type, required: bool = True) -> Any:
    value = spec.get(key)
    if value is None and not required:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and not float(value).is_integer())
    ):
        raise ConfigError(
            f"space key '{where}': '{key}' must be {'an integer' if kind is int else 'a number'}, got {value!r}"
        )
    return kind(value)


def parse_param(name: str, spec: Any) -> Param:
    if not isinstance(spec, dict) or spec.get("type") not in ("categorical", "int", "float"):
        raise ConfigError(
            f"space key '{name}' must be a mapping with type: categorical (choices: [...]), int (low, high, log, "
            f"step) or float (low, high, log); got {spec!r}"
        )
    allowed = (
        {"type", "when", "choices"} if spec["type"] == "categorical" else {"type", "when", "low", "high", "log", "step"}
    )
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ConfigError(
            f"space key '{name}' has unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )
    when = spec.get("when") or {}
    if not isinstance(when, dict):
        raise ConfigError(f"space key '{name}': 'when' must map config keys to a value or a list of values")
    when = {str(k): (v if isinstance(v, list) else [v]) for k, v in when.items()}
    if spec["type"] == "categorical":
        choices = spec.get("choices")
        if isinstance(choices, dict) and choices:  # labelled choices: Optuna sees the labels, the config the values
            options = {str(k): v for k, v in choices.items()}
            return Param(name, "categorical", choices=list(options), options=options, when=when)
        if not isinstance(choices, list) or not choices:
            raise ConfigError(
                f"space key '{name}': 'choices' must be a non-empty list, or a mapping label -> value (e.g. "
                f"'2x8192': {{num_codebooks: 2, codebook_size: 8192}})"
            )
        for c in choices:
            if c is not None and not isinstance(c, (bool, int, float, str)):
                raise ConfigError(
                    f"space key '{name}': choice {c!r} must be a number, string, bool or null "
                    f"(Optuna stores choices as plain values)"
                )
        return Param(name, "categorical", choices=choices, when=when)
    kind = int if spec["type"] == "int" else float
    low, high = _number(name, spec, "low", kind), _number(name, spec, "high", kind)
    step = _number(name, spec, "step", kind, required=False)
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"space key '{name}': 'log' must be true or false, got {log!r}")
    if low > high or (log and low <= 0) or (log and step not in (None, 1)) or (step is not None and step <= 0):
        raise ConfigError(
            f"space key '{name}': need low <= high, low > 0 with log: true, a positive step, and no "
            f"step other than 1 with log: true; got {spec!r}"
        )
    return Param(name, spec["type"], low=low, high=high, step=step, log=log, when=when)


def parse_objective(spec: Any, where: str) -> Objective:
    if not isinstance(spec, dict) or not isinstance(spec.get("metric"), str):
        raise ConfigError(
            f"{where} must be a mapping with 'metric' (e.g. val/psnr) and 'direction' (minimize|maximize); got {spec!r}"
        )
    direction = spec.get("direction", "maximize")
    if direction not in DIRECTIONS:
        raise ConfigError(f"{where}: direction '{direction}' is not one of {', '.join(DIRECTIONS)}")
    unknown = sorted(set(spec) - {"metric", "direction", "fallback"})
    if unknown:
        raise ConfigError(f"{where} has unknown field(s) {', '.join(unknown)}; allowed: metric, direction, fallback")
    fallback = parse_objective(spec["fallback"], f"{where}.fallback") if spec.get("fallback") else None
    return Objective(spec["metric"], direction, fallback)


def load_sweep(
    path: str | Path, overrides: Sequence[str] = (), storage: str | None = None, n_trials: int | None = None
) -> SweepSpec:
    """Read and check a sweep file; the base config with the overrides is resolved once here to fail early."""
    path = Path(path).resolve()
    data = load_yaml(path)
    unknown = sorted(set(data) - SWEEP_KEYS)
    if unknown:
        raise ConfigError(
            f"sweep file '{path}' has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(SWEEP_KEYS))}"
        )
    name = str(data.get("name") or path.stem)
    if "ablation" in data:
        if "base" in data or not isinstance(data.get("variant"), str):
            raise ConfigError(f"sweep file '{path}': give either 'base' or 'ablation' + 'variant' (a variant name)")
        ablation = path.parent / data["ablation"]
        _, variants = load_variants(ablation)
        found = [v for v in variants if v.name == data["variant"]]
        if not found:
            raise ConfigError(
                f"sweep file '{path}': ablation '{ablation}' has no variant '{data['variant']}'; "
                f"variants: {', '.join(v.name for v in variants)}"
            )
        base = found[0].config
    else:
        raw = data.get("base") or {}
        if isinstance(raw, str):
            raw = load_yaml(path.parent / raw)
        if not isinstance(raw, dict):
            raise ConfigError(f"sweep file '{path}': 'base' must be a run config mapping or a path to one")
        base = merge(defaults(), raw)
    over = parse_overrides(list(overrides))

    space = data.get("space")
    if not isinstance(space, dict) or not space:
        raise ConfigError(
            f"sweep file '{path}': 'space' must map dotted config keys to search ranges, e.g. "
            f"model.quantizer.num_codebooks: {{type: categorical, choices: [1, 2, 4]}}"
        )
    params = [parse_param(str(k), v) for k, v in space.items()]
    clash = sorted(k for k in flatten(over) if any(k == p.name or k.startswith(p.name + ".") for p in params))
    if clash:
        raise ConfigError(
            f"override(s) {', '.join(clash)} set a searched key; remove them or remove the key from 'space' in '{path}'"
        )
    for p in params:
        merge(base, nest({p.name: p.example()}))  # an unknown key fails here, naming the allowed ones
    resolve(merge(base, over))

    objectives = data.get("objectives")
    if not isinstance(objectives, list) or not objectives:
        raise ConfigError(
            f"sweep file '{path}': 'objectives' must be a non-empty list of {{metric: val/psnr, direction: maximize}}"
        )
    objs = [parse_objective(o, f"objectives[{i}]") for i, o in enumerate(objectives)]

    sampler = data.get("sampler") or {"type": "tpe"}
    if isinstance(sampler, str):
        sampler = {"type": sampler}
    if not isinstance(sampler, dict) or sampler.get("type") not in SAMPLERS:
        raise ConfigError(f"sweep file '{path}': sampler.type must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    pruner = data.get("pruner") or {"type": "none"}
    if isinstance(pruner, str):
        pruner = {"type": pruner}
    if not isinstance(pruner, dict) or pruner.get("type") not in PRUNERS:
        raise ConfigError(f"sweep file '{path}': pruner.type must be one of {', '.join(PRUNERS)}, got {pruner!r}")

    n = n_trials if n_trials is not None else data.get("n_trials")
    if sampler["type"] == "grid":
        if any(p.when for p in params):
            raise ConfigError(f"sweep file '{path}': the grid sampler does not support conditional ('when') keys")
        size = math.prod(len(p.grid_values()) for p in params)
        n = size if n is None else min(int(n), size)  # more would only re-evaluate grid points
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"sweep file '{path}': n_trials must be a positive integer (or pass --n-trials), got {n!r}")

    storage = storage or data.get("storage") or f"{name}.journal"
    if "://" not in storage:
        storage = str((path.parent / storage).resolve())
    beat = data.get("heartbeat") or {}
    retries = data.get("retries", 2)
    if not isinstance(retries, int) or retries < 0:
        raise ConfigError(f"sweep file '{path}': retries must be a non-negative integer, got {retries!r}")
    return SweepSpec(
        name=name, path=path, base=base, overrides=over, params=params, objectives=objs, sampler=dict(sampler),
        pruner=dict(pruner), n_trials=n, storage=storage, heartbeat_interval=int(beat.get("interval", 10)),
        grace_period=int(beat.get("grace", 60)), retries=retries,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ optuna objects


def metric_absence(metric: str, config: dict[str, Any]) -> str | None:
    """Why a validation metric will not be logged for this config, known before training; None if it will be."""
    supervision = config["loss"]["supervision"]
    fidelity = {"val/psnr", "val/ssim", "val/lpips", "val/rfid"}
    if metric in fidelity and supervision == "contra":
        return "supervision=contra trains no decoder"
    if metric == "val/zeroshot_acc" and (supervision == "recon" or not config["eval"]["zero_shot"]):
        return "no text tower (supervision=recon) or eval.zero_shot=false"
    if metric == "val/retrieval_r1" and (supervision == "recon" or not config["eval"]["retrieval"]):
        return "no text tower (supervision=recon) or eval.retrieval=false"
    weights = {"val/rfid": ("rfid", "inception_fid"), "val/lpips": ("lpips", "lpips_vgg")}
    if metric in weights:
        flag, name = weights[metric]
        if not config["eval"][flag]:
            return f"eval.{flag}=false"
        from tokzoo.weights import weights_available

        ok, reason = weights_available(name)
        if not ok:
            return reason
    return None


def resolve_objectives(objectives: list[Objective], config: dict[str, Any]) -> list[dict[str, str]]:
    """Pick, for each objective, the first metric of its fallback chain that this config can produce."""
    out = []
    for obj in objectives:
        chosen, notes = obj, []
        while (why := metric_absence(chosen.metric, config)) and chosen.fallback is not None:
            why = why if len(why) <= 120 else why[:117] + "..."  # the run's absent.* tag has the full reason
            notes.append(f"{chosen.metric} absent ({why}); using {chosen.fallback.metric}")
            chosen = chosen.fallback
        out.append(
            {"metric": chosen.metric, "direction": chosen.direction, "requested": obj.metric, "note": "; ".join(notes)}
        )
    return out


def make_storage(spec: SweepSpec) -> optuna.storages.BaseStorage:
    if "://" not in spec.storage:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        Path(spec.storage).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(spec.storage))
    if spec.storage.startswith("redis"):
        from optuna.storages.journal import JournalRedisBackend, JournalStorage

        return JournalStorage(JournalRedisBackend(spec.storage))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(
                spec.storage,
                engine_kwargs={"pool_pre_ping": True},
                heartbeat_interval=spec.heartbeat_interval,
                grace_period=spec.grace_period,
                heartbeat_stale_trial_callback=Requeue(spec.retries),
            )
        except Exception as err:  # sqlalchemy / driver errors: one readable message
            raise ConfigError(f"cannot open Optuna storage {spec.storage}: {type(err).__name__}: {err}") from None


class AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler whose after_trial does not call study.stop() (only allowed inside optimize); the sweep stops
    asking by itself once the budget (at most the grid size) is used."""

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        pass


def make_sampler(spec: SweepSpec, n_existing: int) -> optuna.samplers.BaseSampler:
    kind, seed = spec.sampler["type"], spec.sampler.get("seed")
    if kind == "grid":  # the same seed in every process, so that they share one grid order
        return AskTellGridSampler({p.name: p.grid_values() for p in spec.params}, seed=seed)
    if seed is not None:
        seed = int(seed) + n_existing  # a resumed study does not replay the suggestions it already made
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        n_startup = int(spec.sampler.get("n_startup_trials", 10))
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True, n_startup_trials=n_startup)  # workers


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    kind = spec.pruner["type"]
    kwargs = {k: v for k, v in spec.pruner.items() if k != "type"}
    if kind == "none" or spec.multi_objective:
        return optuna.pruners.NopPruner()
    classes = {
        "median": optuna.pruners.MedianPruner,
        "percentile": optuna.pruners.PercentilePruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
    }
    try:
        return classes[kind](**kwargs)
    except TypeError as err:
        raise ConfigError(f"pruner '{kind}': {err}") from None


def suggest(trial: optuna.Trial, spec: SweepSpec) -> dict[str, Any]:
    """Suggest the active parameters in file order; a `when` condition sees the parameters suggested before it."""
    params: dict[str, Any] = {}
    for p in spec.params:
        if p.when and not p.active(spec.apply(params)):
            continue
        params[p.name] = p.suggest(trial)
    return params


class Requeue:
    """Re-queue a failed stale trial (same parameters, grid point and attributes) as WAITING, up to max_retry
    times; the copy carries Optuna's `failed_trial` / `retry_history` system attrs."""

    def __init__(self, max_retry: int):
        self.max_retry = max_retry

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        system = {k: v for k, v in trial.system_attrs.items() if k not in (OWNER_ATTR, BEAT_ATTR)}
        system.setdefault("failed_trial", trial.number)
        system["retry_history"] = [*system.get("retry_history", []), trial.number]
        if len(system["retry_history"]) > self.max_retry:
            return
        user = {
            k: v for k, v in trial.user_attrs.items() if k not in ("fail_reason", "mlflow_run_id", "metrics", "folder")
        }
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
                user_attrs=user, system_attrs=system,
            )
        )  # fmt: skip


def process_identity(pid: int | None = None) -> str:
    """host:pid:start-time, so that a recycled pid is not mistaken for the process that owned a trial."""
    pid = pid or os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_time(pid)}"


def _start_time(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def owner_alive(owner: str) -> bool | None:
    """True/False for a process of this host; None (unknown) for another host."""
    host, _, rest = owner.partition(":")
    if host != socket.gethostname():
        return None
    pid_s, _, start = rest.partition(":")
    try:
        pid = int(pid_s)
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return _start_time(pid) == start


def fail_stale(study: optuna.Study, spec: SweepSpec, requeue: Requeue) -> list[int]:
    """Fail (and re-queue) RUNNING trials whose sweep process is gone; returns their numbers."""
    storage = study._storage  # storage-level calls: a trial of another process cannot be told through a Trial
    from optuna.storages._heartbeat import is_heartbeat_enabled

    if is_heartbeat_enabled(storage):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # RDB heartbeat: fails and calls Requeue
    failed = []
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.system_attrs.get(OWNER_ATTR)
        if owner is None or owner == process_identity():
            continue
        alive = owner_alive(owner)
        beat = t.system_attrs.get(BEAT_ATTR)
        stale = alive is False or (alive is None and beat is not None and now - beat > spec.grace_period)
        if not stale:
            continue
        reason = f"stale: its sweep process {owner} is gone (killed or crashed)"
        try:
            storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
            if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                failed.append(t.number)
                requeue(study, storage.get_trial(t._trial_id))
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another process got there first
    return failed


def retried_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    out: set[int] = set()
    for t in trials:
        out.update(t.system_attrs.get("retry_history", []))
    return out


def budget_used(trials: Sequence[FrozenTrial], before: int | None = None) -> int:
    """Trials that count toward n_trials (those numbered below `before`, if given): all but the failed ones that
    were re-queued (their copy counts instead) or never ran (surplus)."""
    retried = retried_numbers(trials)

    def counts(t: FrozenTrial) -> bool:
        if t.state != TrialState.FAIL:
            return True
        return t.number not in retried and t.user_attrs.get("fail_reason") != SURPLUS

    return sum(1 for t in trials if (before is None or t.number < before) and counts(t))


# ------------------------------------------------------------------------------------------------- MLflow


def parent_run(uri: str, experiment: str, spec: SweepSpec, study: optuna.Study) -> str:
    """The study's MLflow run (created once, found again on resume through the study's user attrs)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run_id = study.user_attrs.get("mlflow_parent_run_id")
    if run_id:
        with contextlib.suppress(Exception):
            client.update_run(run_id, status="RUNNING")
            return run_id
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location(uri))
    run = client.create_run(exp_id, run_name=f"study:{spec.name}", tags={
        "tokzoo.role": "study", "tokzoo.study": spec.name, "optuna.storage": spec.storage,
        "optuna.directions": ",".join(d.name.lower() for d in study.directions),
        "tokzoo.objectives": json.dumps(
            [{"metric": o["metric"], "direction": o["direction"]} for o in study.user_attrs.get(OBJECTIVES_ATTR, [])]
        ),
    })  # fmt: skip
    client.log_param(run.info.run_id, "sweep.sampler", json.dumps(spec.sampler))
    client.log_param(
        run.info.run_id, "sweep.space", json.dumps({p.name: p.distribution().__repr__() for p in spec.params})[:6000]
    )
    study.set_user_attr("mlflow_parent_run_id", run.info.run_id)
    study.set_user_attr("mlflow_experiment", experiment)
    return run.info.run_id


# --------------------------------------------------------------------------------------------- the parent


@dataclass
class Running:
    trial: optuna.Trial
    params: dict[str, Any]
    folder: Path
    proc: subprocess.Popen
    gpus: list[int]
    started: float


@dataclass
class SweepOutcome:
    name: str
    study: optuna.Study
    objectives: list[dict[str, str]]
    notes: list[str]


def _pdeathsig() -> None:
    """In the trial process: die with the sweep process (Linux), so a killed sweep leaves no orphan trainers."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def gpu_ids() -> list[int]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [int(x) for x in visible.split(",") if x.strip().isdigit()]
    try:
        import torch

        return list(range(torch.cuda.device_count()))
    except Exception:
        return []


def trial_devices(config: dict[str, Any]) -> int:
    devices = config["trainer"].get("devices", 1)
    if isinstance(devices, int):
        return max(devices, 1)
    if isinstance(devices, (list, tuple)):
        return len(devices)
    return 1


class Sweep:
    def __init__(self, spec: SweepSpec, workers: int, log: Callable[[str], None]):
        from tokzoo.tracking import check_tracking, tracking_uri

        self.spec, self.workers, self.log = spec, max(1, workers), log
        self.uri = tracking_uri(spec.base["tracking"]["uri"])
        check_tracking(self.uri)
        self.experiment = spec.base["tracking"].get("experiment") or spec.name
        self.identity = process_identity()
        self.requeue = Requeue(spec.retries)
        self.notes: list[str] = []
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.base_config = spec.trial_config({})  # the run config with no parameter applied
        self.storage = make_storage(spec)
        self.study = self._open_study()
        self.parent_run_id = parent_run(self.uri, self.experiment, spec, self.study)
        self.free_gpus: list[int] | None = None  # detected at the first trial that may use a GPU (imports torch)
        self.n_gpus = 0
        self.interrupted = False
        self.running: dict[int, Running] = {}
        self.root = Path(spec.base["output_dir"]).resolve() / spec.name / "trials"

    def _open_study(self) -> optuna.Study:
        spec = self.spec
        objectives = resolve_objectives(spec.objectives, self.base_config)
        directions = [o["direction"] for o in objectives]
        try:
            study = optuna.create_study(
                storage=self.storage, study_name=spec.name, directions=directions, load_if_exists=True,
                sampler=make_sampler(spec, 0), pruner=make_pruner(spec),
            )  # fmt: skip
        except Exception as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(
                f"cannot open study '{spec.name}' in {spec.storage}: {type(err).__name__}: {err}"
            ) from None
        recorded = study.user_attrs.get(OBJECTIVES_ATTR)
        if recorded is None:
            study.set_user_attr(OBJECTIVES_ATTR, objectives)
            study.set_user_attr("sweep_file", str(spec.path))
            recorded = objectives
        elif [o["requested"] for o in recorded] != [o.metric for o in spec.objectives]:
            raise ConfigError(
                f"study '{spec.name}' in {spec.storage} optimises {[o['requested'] for o in recorded]}, the sweep "
                f"file asks for {[o.metric for o in spec.objectives]}; use another 'name' or storage"
            )
        if [d.name.lower() for d in study.directions] != [o["direction"] for o in recorded]:
            raise ConfigError(
                f"study '{spec.name}' in {spec.storage} has directions "
                f"{[d.name.lower() for d in study.directions]}; the sweep file gives {directions}"
            )
        self.objectives = recorded
        for o in recorded:
            if o["note"]:
                self.notes.append(f"objective {o['requested']}: {o['note']}")
        n_existing = len(study.get_trials(deepcopy=False))
        if n_existing and spec.sampler["type"] != "grid":
            study.sampler = make_sampler(spec, n_existing)
        if spec.multi_objective:
            ignored = f" (pruner '{spec.pruner['type']}' ignored)" if spec.pruner["type"] != "none" else ""
            self.notes.append(f"pruning is off: Optuna does not prune multi-objective studies{ignored}")
        return study

    # --- trial lifecycle -------------------------------------------------------------------------------

    def _can_start(self) -> bool:
        trials = self.study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        return waiting or budget_used(trials) < self.spec.n_trials

    def _devices_free(self) -> bool:
        """With GPUs, a trial starts only when trainer.devices GPUs are free (so --workers is capped by them)."""
        base = self.base_config
        if base["trainer"].get("accelerator") not in ("gpu", "cuda", "auto"):
            return True
        if self.free_gpus is None:
            self.free_gpus = gpu_ids()
            self.n_gpus = len(self.free_gpus)
        return self.n_gpus == 0 or len(self.free_gpus) >= min(trial_devices(base), self.n_gpus)

    def _start(self) -> None:
        with warnings.catch_warnings():  # RDB heartbeats outside optimize() are ours to record: no warning
            warnings.simplefilter("ignore")
            trial = self.study.ask()
        storage = self.study._storage
        storage.set_trial_system_attr(trial._trial_id, OWNER_ATTR, self.identity)
        storage.set_trial_system_attr(trial._trial_id, BEAT_ATTR, time.time())
        trials = self.study.get_trials(deepcopy=False)
        is_retry = "failed_trial" in storage.get_trial(trial._trial_id).system_attrs  # a copy is already counted
        if not is_retry and budget_used(trials, before=trial.number) >= self.spec.n_trials:  # taken by another worker
            trial.set_user_attr("fail_reason", SURPLUS)
            self.study.tell(trial, state=TrialState.FAIL)
            return
        folder = self.root / f"trial-{trial.number:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            params = suggest(trial, self.spec)
            config = self.spec.trial_config(params)
        except ConfigError as err:
            self._finish_failed(trial, f"ConfigError: {err}", folder)
            return
        (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (folder / "trial.json").write_text(json.dumps({
            "study": self.spec.name, "storage": self.spec.storage, "trial_id": trial._trial_id,
            "number": trial.number, "experiment": self.experiment, "uri": self.uri,
            "parent_run_id": self.parent_run_id, "params": params, "objectives": self.objectives,
            "pruner": self.spec.pruner if not self.spec.multi_objective else {"type": "none"},
        }, indent=1, default=str))  # fmt: skip
        (folder / RESULT_FILE).unlink(missing_ok=True)
        env = dict(os.environ)
        k = trial_devices(config)
        gpus: list[int] = []
        if config["trainer"].get("accelerator") in ("gpu", "cuda", "auto") and self.free_gpus:
            gpus, self.free_gpus = self.free_gpus[:k], self.free_gpus[k:]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        else:
            env["CUDA_VISIBLE_DEVICES"] = ""
            threads = max(1, (os.cpu_count() or 1) // (self.workers * k))
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                env[var] = str(threads)
        env["PYTHONUNBUFFERED"] = "1"
        log = open(folder / "log.txt", "ab")  # noqa: SIM115 - closed by the child's exit (inherited fd)
        proc = subprocess.Popen(
            [sys.executable, "-m", "tokzoo.sweep", "run-trial", str(folder)], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=env, start_new_session=True, preexec_fn=_pdeathsig,
        )  # fmt: skip
        log.close()
        trial.set_user_attr("folder", str(folder))
        self.running[trial.number] = Running(trial, params, folder, proc, gpus, time.time())
        where = f"GPU {env['CUDA_VISIBLE_DEVICES']}" if gpus else "CPU"
        self.log(f"trial {trial.number} started on {where}: {_fmt_params(params)}")

    def _finish_failed(self, trial: optuna.Trial, reason: str, folder: Path) -> None:
        trial.set_user_attr("fail_reason", reason[:2000])
        self.study.tell(trial, state=TrialState.FAIL)
        self.log(f"[red]trial {trial.number} FAIL[/red]: {reason.splitlines()[0][:300]}  (log: {folder})")

    def _collect(self, run: Running) -> None:
        code = run.proc.returncode
        if run.gpus:
            self.free_gpus = [*(self.free_gpus or []), *run.gpus]
        trial = run.trial
        result = _read_json(run.folder / RESULT_FILE)
        if result.get("run_id"):
            trial.set_user_attr("mlflow_run_id", result["run_id"])
        if result.get("metrics"):
            trial.set_user_attr("metrics", result["metrics"])
        if code != 0 or "error" in result:
            if "error" in result:
                reason = result["error"]
            elif code < 0:
                reason = f"killed by signal {signal.Signals(-code).name}"
            else:
                reason = f"exit code {code}: {_tail(run.folder / 'log.txt')}"
            self._finish_failed(trial, reason, run.folder)
            self._tag_child(result.get("run_id"), "FAIL", None)
            return
        if result.get("pruned"):
            self.study.tell(trial, state=TrialState.PRUNED)
            self.log(f"[yellow]trial {trial.number} PRUNED[/yellow] at step {result.get('pruned_step')}")
            self._tag_child(result.get("run_id"), "PRUNED", None)
            return
        metrics = result.get("metrics", {})
        values, missing = [], []
        for o in self.objectives:
            v = metrics.get(o["metric"])
            if v is None or not math.isfinite(v):
                missing.append(f"{o['metric']} ({result.get('absent', {}).get(o['metric'], 'not logged')})")
            values.append(v)
        if missing:
            self._finish_failed(trial, f"objective metric(s) absent: {', '.join(missing)}", run.folder)
            self._tag_child(result.get("run_id"), "FAIL", None)
            return
        self.study.tell(trial, values)
        shown = ", ".join(f"{o['metric']}={v:.4g}" for o, v in zip(self.objectives, values))
        self.log(f"[green]trial {trial.number} COMPLETE[/green] in {time.time() - run.started:.0f} s: {shown}")
        self._tag_child(result.get("run_id"), "COMPLETE", values)

    def _tag_child(self, run_id: str | None, state: str, values: list[float] | None) -> None:
        if not run_id:
            return
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        with contextlib.suppress(Exception):
            client.set_tag(run_id, "optuna.state", state)
            for o, v in zip(self.objectives, values or []):
                client.set_tag(run_id, f"optuna.objective.{o['metric']}", f"{v:.6g}")

    def _beat(self) -> None:
        from optuna.storages._heartbeat import is_heartbeat_enabled

        storage = self.study._storage
        for run in self.running.values():
            if is_heartbeat_enabled(storage):
                storage.record_heartbeat(run.trial._trial_id)
            else:
                storage.set_trial_system_attr(run.trial._trial_id, BEAT_ATTR, time.time())

    def stop_all(self, reason: str) -> None:
        """Interrupted: stop the trial processes, fail their trials and re-queue them for the next run."""
        for run in self.running.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.proc.pid, signal.SIGTERM)
        for run in self.running.values():
            try:
                run.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(run.proc.pid, signal.SIGKILL)
                run.proc.wait()
            with contextlib.suppress(Exception):
                run.trial.set_user_attr("fail_reason", reason)
                frozen = self.study.tell(run.trial, state=TrialState.FAIL)
                self.requeue(self.study, frozen)
        self.running.clear()

    def run(self) -> SweepOutcome:
        for note in self.notes:
            self.log(f"[bold]note[/bold]: {note}")
        stale = fail_stale(self.study, self.spec, self.requeue)
        if stale:
            self.log(f"re-queued stale trial(s) {stale} (their sweep process is gone)")
        used = budget_used(self.study.get_trials(deepcopy=False))
        self.log(
            f"study '{self.spec.name}' ({self.spec.storage}): {used}/{self.spec.n_trials} trials used, "
            f"{self.workers} worker(s), MLflow {self.uri} run {self.parent_run_id}"
        )
        last_beat = last_stale = time.time()
        try:
            while True:
                slots = self.workers - len(self.running)
                if slots > 0 and self._devices_free() and self._can_start():
                    self._start()
                    continue
                if not self.running:
                    break
                for number, run in list(self.running.items()):
                    if run.proc.poll() is not None:
                        del self.running[number]
                        self._collect(run)
                now = time.time()
                if now - last_beat > self.spec.heartbeat_interval:
                    self._beat()
                    last_beat = now
                if now - last_stale > self.spec.heartbeat_interval * 3:
                    fail_stale(self.study, self.spec, self.requeue)
                    last_stale = now
                time.sleep(0.2)
        except BaseException:
            self.interrupted = True
            self.stop_all("interrupted: the sweep process was stopped; re-queued")
            raise
        finally:
            self._close_parent()
        return SweepOutcome(self.spec.name, self.study, self.objectives, self.notes)

    def _close_parent(self) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        with contextlib.suppress(Exception):
            trials = self.study.get_trials(deepcopy=False)
            for state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED):
                client.log_metric(
                    self.parent_run_id, f"sweep/n_{state.name.lower()}", sum(t.state == state for t in trials)
                )
            for i, t in enumerate(best_trials(self.study)[:1] if not self.spec.multi_objective else []):
                client.log_metric(self.parent_run_id, f"best/{self.objectives[i]['metric']}", t.values[0])
            client.set_tag(
                self.parent_run_id, "optuna.best_trials", ",".join(str(t.number) for t in best_trials(self.study))
            )
            client.set_terminated(self.parent_run_id, status="KILLED" if self.interrupted else "FINISHED")


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The Pareto front for several objectives; the best trial for one (empty when nothing completed)."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    return list(study.best_trials) if len(study.directions) > 1 else [study.best_trial]


def sweep_table(outcome: SweepOutcome, top: int = 10) -> Any:
    """Rich table of the best trials: the Pareto front (multi-objective) or the top `top` (single objective)."""
    from rich.table import Table

    study = outcome.study
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if len(outcome.objectives) > 1:
        rows, title = sorted(best_trials(study), key=lambda t: t.number), "Pareto front"
    else:
        sign = 1.0 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1.0
        rows, title = sorted(complete, key=lambda t: sign * t.values[0])[:top], f"best {min(top, len(complete))}"
    counts = ", ".join(
        f"{sum(t.state == s for t in trials)} {s.name.lower()}"
        for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING)
        if any(t.state == s for t in trials)
    )
    table = Table(title=f"tokzoo sweep: {outcome.name} - {title} ({counts})", header_style="bold")
    names = sorted({k for t in rows for k in t.params})
    table.add_column("trial", style="cyan", justify="right")
    for name in names:
        table.add_column(name.rsplit(".", 1)[-1], justify="right")
    for o in outcome.objectives:
        arrow = "^" if o["direction"] == "maximize" else "v"
        table.add_column(f"{o['metric']} {arrow}", justify="right", style="bold")
    table.add_column("time (s)", justify="right")
    table.add_column("MLflow run")
    for t in rows:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else 0.0
        table.add_row(
            str(t.number),
            *[str(t.params.get(n, "-")) for n in names],
            *[f"{v:.4g}" for v in t.values],
            f"{seconds:.0f}",
            str(t.user_attrs.get("mlflow_run_id", "-")),
        )
    notes = [f"{o['requested']} -> {o['metric']}: {o['note']}" for o in outcome.objectives if o["note"]]
    table.caption = "; ".join(notes + [n for n in outcome.notes if n.startswith("pruning")]) or None
    return table


def run_sweep(
    path: str | Path,
    overrides: Sequence[str] = (),
    workers: int = 1,
    storage: str | None = None,
    n_trials: int | None = None,
    log: Callable[[str], None] | None = None,
) -> SweepOutcome:
    if log is None:
        from rich.console import Console

        log = Console().print
    spec = load_sweep(path, overrides, storage=storage, n_trials=n_trials)
    return Sweep(spec, workers, log).run()


def _fmt_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in params.items()) or "(no parameters)"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(line.strip() for line in text[-lines:])[:1000]


# ------------------------------------------------------------------------------------------ the trial side


def rank() -> int:
    return int(os.environ.get("NODE_RANK", "0")) * 1000 + int(os.environ.get("LOCAL_RANK", "0"))


def run_trial(folder: str | Path) -> int:
    """Train one trial from its folder (every DDP rank runs this); rank 0 writes result.json."""
    from tokzoo.config import Variant, config_hash
    from tokzoo.runner import check_variant, fit_variant

    folder = Path(folder)
    meta = json.loads((folder / "trial.json").read_text())
    config = resolve(yaml.safe_load((folder / "config.yaml").read_text()))
    # what this rank trains, for audits (and the DDP test): the same file on every rank
    (folder / f"rank{rank()}.json").write_text(json.dumps({"params": meta["params"], "hash": config_hash(config)}))
    result: dict[str, Any] = {}
    try:
        variant = Variant(name=f"trial-{meta['number']:04d}", config=config, seed=config["seed"])
        check_variant(variant)
        tags = {
            "mlflow.parentRunId": meta["parent_run_id"], "tokzoo.study": meta["study"],
            "tokzoo.trial": str(meta["number"]), "optuna.trial_number": str(meta["number"]),
            **{f"optuna.param.{k}": str(v) for k, v in meta["params"].items()},
        }  # fmt: skip
        hook = _pruning_hook(meta, result) if meta["pruner"].get("type", "none") != "none" else None
        # resume=False: a trial is one fresh run; an equal config in an older study of the same experiment is no result
        out = fit_variant(meta["experiment"], variant, meta["uri"], extra_tags=tags, on_validation=hook, resume=False)
    except Exception as err:
        if rank() == 0:
            result["error"] = f"{type(err).__name__}: {err}"
            (folder / RESULT_FILE).write_text(json.dumps(result, default=str))
        raise
    if rank() == 0:
        result.update(metrics=out.metrics, run_id=out.run_id, seconds=out.seconds)
        if out.run_id:
            with contextlib.suppress(Exception):
                from mlflow.tracking import MlflowClient

                tags = MlflowClient(meta["uri"]).get_run(out.run_id).data.tags
                result["absent"] = {k[len("absent.") :]: v for k, v in tags.items() if k.startswith("absent.")}
        (folder / RESULT_FILE).write_text(json.dumps(result, default=str))
    return 0


def _pruning_hook(meta: dict[str, Any], result: dict[str, Any]) -> Callable[[int, dict[str, float]], bool]:
    """Report the objective after each validation to the study and ask the study's pruner (rank 0 only)."""
    spec_pruner = meta["pruner"]
    kwargs = {k: v for k, v in spec_pruner.items() if k != "type"}
    pruner = {
        "median": optuna.pruners.MedianPruner, "percentile": optuna.pruners.PercentilePruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner, "hyperband": optuna.pruners.HyperbandPruner,
    }[spec_pruner["type"]](**kwargs)  # fmt: skip
    storage = meta["storage"]
    if "://" not in storage:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        storage = JournalStorage(JournalFileBackend(storage))
    study = optuna.load_study(study_name=meta["study"], storage=storage, pruner=pruner)
    trial = optuna.trial.Trial(study, meta["trial_id"])
    metric = meta["objectives"][0]["metric"]

    def hook(step: int, metrics: dict[str, float]) -> bool:
        if metric not in metrics:
            return False
        trial.report(metrics[metric], step)
        if trial.should_prune():
            result.update(pruned=True, pruned_step=step)
            return True
        return False

    return hook


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] != "run-trial":
        print("usage: python -m tokzoo.sweep run-trial TRIAL_FOLDER", file=sys.stderr)
        return 2
    return run_trial(argv[1])


if __name__ == "__main__":
    sys.exit(main())
