"""Everything the sweep and its trial processes ask of Optuna: the one storage opener and the one pruner map (both
sides use them, so a storage or pruner that works for the sweep works for its trials), samplers, re-queueing,
owner liveness, stale trials and the budget count."""

from __future__ import annotations

import os
import socket
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tokzoo.errors import ConfigError
from tokzoo.sweep.spec import PRUNER_CLASSES, SweepSpec

OBJECTIVES_ATTR = "tokzoo.objectives"  # study user attr: the metric each objective actually uses, and why
OWNER_ATTR = "tokzoo.owner"  # trial system attr: host:pid:start-time of the sweep process running it
BEAT_ATTR = "tokzoo.heartbeat"  # trial system attr (journal storages): last time the owner was alive
SURPLUS = "surplus: the budget was used up by another worker"  # fail reason of a trial that never ran


def open_storage(
    url: str, heartbeat_interval: int = 10, grace_period: int = 60, retries: int = 2
) -> optuna.storages.BaseStorage:
    """A journal file (a path), a journal in Redis (redis://...) or an RDB (any other URL, with Optuna's heartbeat:
    a trial whose sweep process stops beating is failed and re-queued up to `retries` times)."""
    if "://" not in url:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(url))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            if url.startswith("redis"):  # Optuna's RDB layer would read this as a database dialect and fail
                from optuna.storages.journal import JournalRedisBackend, JournalStorage

                return JournalStorage(JournalRedisBackend(url))
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs={"pool_pre_ping": True},
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=Requeue(retries),
            )
        except Exception as err:  # sqlalchemy / driver / missing redis package: one readable message
            raise ConfigError(f"cannot open Optuna storage {url}: {type(err).__name__}: {err}") from None


def make_pruner(pruner: dict[str, Any], multi_objective: bool = False) -> optuna.pruners.BasePruner:
    """The sweep file's `pruner` mapping ({type, **kwargs}) as an Optuna pruner; Optuna prunes one objective only."""
    kind = pruner.get("type", "none")
    if kind == "none" or multi_objective:
        return optuna.pruners.NopPruner()
    kwargs = {k: v for k, v in pruner.items() if k != "type"}
    try:
        return PRUNER_CLASSES[kind](**kwargs)
    except TypeError as err:
        raise ConfigError(f"pruner '{kind}': {err}") from None


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


def record_beat(storage: optuna.storages.BaseStorage, trial_id: int) -> None:
    """The owner is alive: Optuna's own heartbeat on an RDB, our timestamp attr on a journal."""
    from optuna.storages._heartbeat import is_heartbeat_enabled

    if is_heartbeat_enabled(storage):
        storage.record_heartbeat(trial_id)
    else:
        storage.set_trial_system_attr(trial_id, BEAT_ATTR, time.time())


def fail_stale(study: optuna.Study, spec: SweepSpec, requeue: Requeue) -> list[int]:
    """Fail (and re-queue) RUNNING trials whose sweep process is gone; returns their numbers."""
    storage = study._storage  # storage-level calls: a trial of another process cannot be told through a Trial
    from optuna.storages._heartbeat import is_heartbeat_enabled

    native = is_heartbeat_enabled(storage)
    if native:
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
        # Another host's trial: on an RDB only Optuna's heartbeat (refreshed by record_beat) judges it; our attr is
        # written once there, so reading it would fail live trials of other hosts once the grace period passed.
        old_beat = not native and beat is not None and now - beat > spec.grace_period
        stale = alive is False or (alive is None and old_beat)
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
