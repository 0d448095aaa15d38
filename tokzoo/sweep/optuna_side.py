"""Everything the sweep and its trial processes ask of Optuna: the one storage opener and the one pruner map (both
sides use them, so a storage or pruner that works for the sweep works for its trials), samplers, re-queueing and
the budget count. Owners, heartbeats and stale trials: liveness."""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tokzoo.errors import ConfigError
from tokzoo.sweep.liveness import BEAT_ATTR, OWNER_ATTR
from tokzoo.sweep.spec import PRUNER_CLASSES, SweepSpec

OBJECTIVES_ATTR = "tokzoo.objectives"  # study user attr: the metric each objective actually uses, and why
SURPLUS = "surplus: the budget was used up by another worker"  # fail reason of a trial that never ran


def open_storage(
    url: str, heartbeat_interval: int | None = 10, grace_period: int = 60, retries: int = 2
) -> optuna.storages.BaseStorage:
    """A journal file (a path), a journal in Redis (redis://...), Optuna's gRPC storage proxy (grpc://HOST:PORT)
    or an RDB (any other URL). An RDB gets Optuna's heartbeat (unless heartbeat_interval is None, as on the trial
    side, which never judges other trials): a trial whose sweep process stops beating for grace_period seconds is
    failed and re-queued up to `retries` times. The others have tokzoo's heartbeat (liveness)."""
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
            if url.startswith("grpc://"):
                return _grpc_proxy(url)
            beat: dict[str, Any] = {}
            if heartbeat_interval is not None:
                beat = dict(heartbeat_interval=heartbeat_interval, grace_period=grace_period)
                beat["heartbeat_stale_trial_callback"] = Requeue(retries)
            return _rdb(url, beat)
        except ConfigError:
            raise
        except Exception as err:  # sqlalchemy / driver / missing redis or grpcio package: one readable message
            raise ConfigError(f"cannot open Optuna storage {url}: {type(err).__name__}: {err}") from None


def _rdb(url: str, beat: dict[str, Any], attempts: int = 4) -> optuna.storages.RDBStorage:
    """RDBStorage, tried again a few times on a database error: sweep processes started together on a new database
    race to create Optuna's tables, and all but the first see "table already exists"."""
    import sqlalchemy.exc

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, **beat)
        except sqlalchemy.exc.DBAPIError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def _grpc_proxy(url: str) -> optuna.storages.BaseStorage:
    """grpc://HOST:PORT: a client of `optuna.storages.run_grpc_proxy_server` (one server in front of the database,
    so that hundreds of workers do not each hold database connections)."""
    from urllib.parse import urlsplit

    where = urlsplit(url)
    if not where.hostname or where.port is None or where.path not in ("", "/"):
        raise ConfigError(f"gRPC storage '{url}': give grpc://HOST:PORT (the proxy server's address)")
    proxy = optuna.storages.GrpcStorageProxy(host=where.hostname, port=where.port)
    proxy.wait_server_ready(timeout=30)
    return proxy


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
