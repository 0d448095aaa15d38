"""The sweep process: a pool of up to `--workers` trial processes over one Optuna study.

The sweep process is the only one that samples: it asks the study for a trial, writes the trial's fully resolved
run config to `<output_dir>/<study>/trials/trial-NNNN/`, and launches `python -m tokzoo.sweep run-trial DIR`, the
real training entry point (a DDP trial re-launches that same command per rank, and every rank reads the same
config file, so the parameters are identical on every rank by construction). The trial writes `result.json`; the
sweep process reads it and tells the study. Other sweep processes (other terminals or machines, same storage) may
join: the study is the only shared state.

A killed sweep leaves RUNNING trials behind. They are detected as stale (their owning process is gone, or their
heartbeat is older than the grace period; see liveness), marked FAIL, and re-queued with the same parameters
(Optuna's `failed_trial` / `retry_history` system attrs), so re-running the command finishes the budget. A live
sweep process beats for its trials on a thread of its own for as long as they run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from tokzoo import tracking
from tokzoo.errors import ConfigError
from tokzoo.sweep import optuna_side
from tokzoo.sweep.launch import (
    Running,
    gpu_ids,
    launch,
    log_tail,
    read_result,
    trial_devices,
    trial_env,
    uses_gpus,
    write_trial_folder,
)
from tokzoo.sweep.liveness import BEAT_ATTR, OWNER_ATTR, Heartbeat, fail_stale, process_identity, record_outcome
from tokzoo.sweep.optuna_side import (
    OBJECTIVES_ATTR,
    SURPLUS,
    Requeue,
    budget_used,
    make_pruner,
    make_sampler,
    suggest,
)
from tokzoo.sweep.report import SweepOutcome, best_trials
from tokzoo.sweep.spec import SweepSpec, load_sweep, resolve_objectives
from tokzoo.sweep.warm import WarmLauncher, WarmTrial, starts_warm

LAUNCHERS = ("warm", "fresh")

PARENT_SETTLE_S = 2.0  # longer than creating an MLflow run takes


def parent_run(uri: str, experiment: str, spec: SweepSpec, study: optuna.Study) -> str:
    """The study's MLflow run (created once, found again on resume through the study's user attrs)."""
    tags = {
        "tokzoo.role": "study", "tokzoo.study": spec.name, "optuna.storage": spec.storage,
        "optuna.directions": ",".join(d.name.lower() for d in study.directions),
        "tokzoo.objectives": json.dumps(
            [{"metric": o["metric"], "direction": o["direction"]} for o in study.user_attrs.get(OBJECTIVES_ATTR, [])]
        ),
    }  # fmt: skip
    params = {
        "sweep.sampler": json.dumps(spec.sampler),
        "sweep.space": json.dumps({p.name: p.distribution().__repr__() for p in spec.params})[:6000],
    }
    known = study.user_attrs.get("mlflow_parent_run_id")
    run_id = tracking.open_parent_run(uri, experiment, f"study:{spec.name}", tags, params, run_id=known)
    if run_id == known:
        return run_id
    study.set_user_attr("mlflow_parent_run_id", run_id)
    study.set_user_attr("mlflow_experiment", experiment)
    # Sweep processes started together (srun on many nodes) each find no parent run and create one; the study attr
    # keeps the last one written. Read it back once all have written, and take that one: one parent per study.
    time.sleep(PARENT_SETTLE_S)
    chosen = study.user_attrs.get("mlflow_parent_run_id", run_id)
    if chosen != run_id:
        tracking.close_run(uri, run_id, {}, {"tokzoo.superseded_by": chosen}, "KILLED")
        run_id = tracking.open_parent_run(uri, experiment, f"study:{spec.name}", tags, params, run_id=chosen)
    return run_id


class Sweep:
    def __init__(self, spec: SweepSpec, workers: int, log: Callable[[str], None], launcher: str = "warm"):
        if launcher not in LAUNCHERS:
            raise ConfigError(f"unknown trial launcher '{launcher}'; choose one of {', '.join(LAUNCHERS)}")
        self.spec, self.workers, self.log = spec, max(1, workers), log
        self.base_config = spec.trial_config({})  # the run config with no parameter applied
        # warm: CPU trials are forks of one pre-imported process (sweep/warm.py). Started first when the trials will
        # be CPU ones, so that its imports overlap the storages' and the parent run's set-up; else at such a trial.
        self.launcher = launcher
        self.warm: WarmLauncher | None = None
        if launcher == "warm" and not uses_gpus(self.base_config) and starts_warm(self.base_config, []):
            self.warm = WarmLauncher()
        self.uri = tracking.tracking_uri(spec.base["tracking"]["uri"])
        tracking.check_tracking(self.uri)
        self.experiment = spec.base["tracking"].get("experiment") or spec.name
        self.identity = process_identity()
        self.requeue = Requeue(spec.retries)
        self.notes: list[str] = []
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # through the module, so that the trial side demonstrably opens storages the same way (tests patch it)
        self.storage = optuna_side.open_storage(spec.storage, spec.heartbeat_interval, spec.grace_period, spec.retries)
        self.study = self._open_study()
        self.parent_run_id = parent_run(self.uri, self.experiment, spec, self.study)
        self.free_gpus: list[str] | None = None  # detected at the first trial that may use a GPU (imports torch)
        self.n_gpus = 0
        self.interrupted = False
        self.running: dict[int, Running] = {}
        self.heartbeat = Heartbeat(self.study._storage, spec.heartbeat_interval, log)
        self.root = Path(spec.base["output_dir"]).resolve() / spec.name / "trials"

    def _open_study(self) -> optuna.Study:
        spec = self.spec
        objectives = resolve_objectives(spec.objectives, self.base_config)
        directions = [o["direction"] for o in objectives]
        try:
            study = optuna.create_study(
                storage=self.storage, study_name=spec.name, directions=directions, load_if_exists=True,
                sampler=make_sampler(spec, 0), pruner=make_pruner(spec.pruner, spec.multi_objective),
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
        if not uses_gpus(base):
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
        self.heartbeat.add(trial._trial_id)
        trials = self.study.get_trials(deepcopy=False)
        is_retry = "failed_trial" in storage.get_trial(trial._trial_id).system_attrs  # a copy is already counted
        if not is_retry and budget_used(trials, before=trial.number) >= self.spec.n_trials:  # taken by another worker
            self._record(trial, TrialState.FAIL, None, {"fail_reason": SURPLUS})
            return
        folder = self.root / f"trial-{trial.number:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            params = suggest(trial, self.spec)
            config = self.spec.trial_config(params)
        except ConfigError as err:
            self._finish_failed(trial, f"ConfigError: {err}", folder)
            return
        write_trial_folder(folder, config, {
            "study": self.spec.name, "storage": self.spec.storage, "trial_id": trial._trial_id,
            "number": trial.number, "experiment": self.experiment, "uri": self.uri,
            "parent_run_id": self.parent_run_id, "params": params, "objectives": self.objectives,
            "pruner": self.spec.pruner if not self.spec.multi_objective else {"type": "none"},
        })  # fmt: skip
        env, gpus = trial_env(config, self.free_gpus, self.workers)
        if gpus:
            self.free_gpus = [g for g in self.free_gpus or [] if g not in gpus]
        if self.launcher == "warm" and starts_warm(config, gpus):
            self.warm = self.warm or WarmLauncher()
            proc: Any = self.warm.launch(folder, env, threads=int(env["OMP_NUM_THREADS"]))
        else:
            proc = launch(folder, env)
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # failed meanwhile: _collect copes
            storage.set_trial_user_attr(trial._trial_id, "folder", str(folder))
        self.running[trial.number] = Running(trial, params, folder, proc, gpus, time.time())
        where = f"GPU {env['CUDA_VISIBLE_DEVICES']}" if gpus else "CPU"
        where += " (forked from the warm process)" if isinstance(proc, WarmTrial) else ""
        self.log(f"trial {trial.number} started on {where}: {_fmt_params(params)}")

    def _record(self, trial: optuna.Trial, state: TrialState, values: list[float] | None, attrs: dict) -> None:
        """Tell the study (or, where another process failed this trial meanwhile, its re-queued copy)."""
        self.heartbeat.discard(trial._trial_id)
        note = record_outcome(self.study, trial._trial_id, state, values, attrs)
        if note:
            self.log(f"[yellow]note[/yellow]: {note}")

    def _finish_failed(self, trial: optuna.Trial, reason: str, folder: Path, attrs: dict | None = None) -> None:
        self._record(trial, TrialState.FAIL, None, {**(attrs or {}), "fail_reason": reason[:2000]})
        self.log(f"[red]trial {trial.number} FAIL[/red]: {reason.splitlines()[0][:300]}  (log: {folder})")

    def _collect(self, run: Running) -> None:
        code = run.proc.returncode
        if run.gpus:
            self.free_gpus = [*(self.free_gpus or []), *run.gpus]
        trial = run.trial
        result = read_result(run.folder)
        attrs: dict[str, Any] = {"folder": str(run.folder)}  # the trial's (or its copy's: record_outcome)
        if result.get("run_id"):
            attrs["mlflow_run_id"] = result["run_id"]
        if result.get("metrics"):
            attrs["metrics"] = result["metrics"]
        if code != 0 or "error" in result:
            if "error" in result:
                reason = result["error"]
            elif code < 0:
                reason = f"killed by signal {signal.Signals(-code).name}"
            else:
                reason = f"exit code {code}: {log_tail(run.folder)}"
            self._finish_failed(trial, reason, run.folder, attrs)
            self._tag_child(result.get("run_id"), "FAIL", None)
            return
        if result.get("pruned"):
            self._record(trial, TrialState.PRUNED, None, attrs)
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
            self._finish_failed(trial, f"objective metric(s) absent: {', '.join(missing)}", run.folder, attrs)
            self._tag_child(result.get("run_id"), "FAIL", None)
            return
        self._record(trial, TrialState.COMPLETE, values, attrs)
        shown = ", ".join(f"{o['metric']}={v:.4g}" for o, v in zip(self.objectives, values))
        self.log(f"[green]trial {trial.number} COMPLETE[/green] in {time.time() - run.started:.0f} s: {shown}")
        self._tag_child(result.get("run_id"), "COMPLETE", values)

    def _tag_child(self, run_id: str | None, state: str, values: list[float] | None) -> None:
        if not run_id:
            return
        tags = {"optuna.state": state}
        tags.update({f"optuna.objective.{o['metric']}": f"{v:.6g}" for o, v in zip(self.objectives, values or [])})
        tracking.tag_run(self.uri, run_id, tags)

    def stop_all(self, reason: str) -> None:
        """Interrupted: stop the trial processes, fail their trials and re-queue them for the next run."""
        for run in self.running.values():
            _signal_trial(run.proc.pid, signal.SIGTERM)
        for run in self.running.values():
            try:
                run.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                _signal_trial(run.proc.pid, signal.SIGKILL)
                run.proc.wait()
            self.heartbeat.discard(run.trial._trial_id)
            with contextlib.suppress(Exception):  # another process may have failed (and re-queued) it already
                run.trial.set_user_attr("fail_reason", reason)
                frozen = self.study.tell(run.trial, state=TrialState.FAIL)
                self.requeue(self.study, frozen)
        self.running.clear()

    def run(self) -> SweepOutcome:
        for note in self.notes:
            self.log(f"[bold]note[/bold]: {note}")
        stale = fail_stale(self.study, self.spec.grace_period, self.requeue)
        if stale:
            self.log(f"re-queued stale trial(s) {stale} (their sweep process is gone)")
        used = budget_used(self.study.get_trials(deepcopy=False))
        self.log(
            f"study '{self.spec.name}' ({self.spec.storage}): {used}/{self.spec.n_trials} trials used, "
            f"{self.workers} worker(s), MLflow {self.uri} run {self.parent_run_id}"
        )
        with self.heartbeat:  # beats also while stop_all waits for the trials to stop
            try:
                self._loop(time.time())
            except BaseException:
                self.interrupted = True
                self.stop_all("interrupted: the sweep process was stopped; re-queued")
                raise
            finally:
                self._close_parent()
        return SweepOutcome(self.spec.name, self.study, self.objectives, self.notes)

    def _loop(self, last_stale: float) -> None:
        while True:
            slots = self.workers - len(self.running)
            if slots > 0 and self._devices_free() and self._can_start():
                self._start()
                continue
            if not self.running:
                return
            for number, run in list(self.running.items()):
                if run.proc.poll() is not None:
                    del self.running[number]
                    self._collect(run)
            now = time.time()
            if now - last_stale > self.spec.heartbeat_interval * 3:
                stale = fail_stale(self.study, self.spec.grace_period, self.requeue)
                if stale:
                    self.log(f"re-queued stale trial(s) {stale} (no heartbeat from their sweep process)")
                last_stale = now
            time.sleep(0.2)

    def _close_parent(self) -> None:
        metrics: dict[str, float] = {}
        tags: dict[str, str] = {}
        with contextlib.suppress(Exception):  # a storage error here must not hide the one that stopped the sweep
            trials = self.study.get_trials(deepcopy=False)
            for state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED):
                metrics[f"sweep/n_{state.name.lower()}"] = sum(t.state == state for t in trials)
            best = best_trials(self.study)
            for i, t in enumerate(best[:1] if not self.spec.multi_objective else []):
                metrics[f"best/{self.objectives[i]['metric']}"] = t.values[0]
            tags["optuna.best_trials"] = ",".join(str(t.number) for t in best)
        status = "KILLED" if self.interrupted else "FINISHED"
        tracking.close_run(self.uri, self.parent_run_id, metrics, tags, status)


def run_sweep(
    path: str | Path,
    overrides: Sequence[str] = (),
    workers: int = 1,
    storage: str | None = None,
    n_trials: int | None = None,
    log: Callable[[str], None] | None = None,
    launcher: str = "warm",
) -> SweepOutcome:
    if log is None:
        from rich.console import Console

        log = Console().print
    spec = load_sweep(path, overrides, storage=storage, n_trials=n_trials)
    return Sweep(spec, workers, log, launcher).run()


def _signal_trial(pid: int, sig: signal.Signals) -> None:
    """Signal the trial's process group (it and its DataLoader workers); the process itself where its group does
    not exist yet (a forked trial that has not reached its setsid)."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _fmt_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in params.items()) or "(no parameters)"
