"""One study, many sweep processes on many hosts: heartbeats that last as long as the trials, stale-trial judgement
that never fails a live trial of another host, outcomes of trials another process failed anyway, and (slow) two
real `tokzoo sweep` processes under different hostnames (`unshare -u`) on one SQLite, journal or PostgreSQL
storage, with trials that outlive the grace period."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import optuna
import pytest
from conftest import sqlite_uri, tokzoo_command
from optuna.trial import TrialState
from test_sweep import open_study, sweep_file

from tokzoo.sweep import (
    BEAT_ATTR,
    OWNER_ATTR,
    Heartbeat,
    Requeue,
    budget_used,
    fail_stale,
    load_sweep,
    open_storage,
    owner_alive,
    process_identity,
    pruning_hook,
    record_beat,
    record_outcome,
    suggest,
)


def storage_url(kind: str, tmp_path: Path) -> str:
    if kind == "journal":
        return str(tmp_path / "study.journal")
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'optuna.db'}"
    url = os.environ.get("TOKZOO_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("TOKZOO_TEST_POSTGRES_URL is not set (.ci/run starts a PostgreSQL server and sets it)")
    return url


def new_study(url: str, interval: int = 1, grace: int = 2, retries: int = 2) -> optuna.Study:
    storage = open_storage(url, interval, grace, retries)
    return optuna.create_study(storage=storage, study_name=f"s_{uuid.uuid4().hex[:8]}", direction="maximize")


def ask_as(study: optuna.Study, owner: str) -> optuna.Trial:
    trial = study.ask({"x": optuna.distributions.IntDistribution(0, 9)})
    study._storage.set_trial_system_attr(trial._trial_id, OWNER_ATTR, owner)
    study._storage.set_trial_system_attr(trial._trial_id, BEAT_ATTR, time.time())
    return trial


def fail_as_another_process(study: optuna.Study, trial: optuna.Trial, retries: int = 2) -> None:
    """What another sweep process's fail_stale does to a trial it takes for stale: FAIL, then Requeue."""
    study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    Requeue(retries)(study, study._storage.get_trial(trial._trial_id))


# ------------------------------------------------------------------------------------------------ fast


def test_stale_trial_of_a_dead_sweep_is_failed_and_requeued(tmp_path: Path) -> None:
    spec = load_sweep(sweep_file(tmp_path))
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    study = optuna.create_study(storage=JournalStorage(JournalFileBackend(spec.storage)), study_name="tiny")
    trial = study.ask()
    params = suggest(trial, spec)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    study._storage.set_trial_system_attr(trial._trial_id, OWNER_ATTR, process_identity(dead.pid).replace("?", "x"))
    alive = study.ask()  # owned by this (live) process: left alone
    study._storage.set_trial_system_attr(alive._trial_id, OWNER_ATTR, process_identity())

    assert fail_stale(study, spec.grace_period, Requeue(max_retry=2)) == [trial.number]
    trials = study.get_trials()
    assert trials[trial.number].state == TrialState.FAIL
    assert trials[trial.number].user_attrs["fail_reason"].startswith("stale")
    assert trials[alive.number].state == TrialState.RUNNING
    (waiting,) = [t for t in trials if t.state == TrialState.WAITING]
    assert waiting.params == params and waiting.system_attrs["failed_trial"] == trial.number
    assert budget_used(trials) == 2  # the failed original does not count, its re-queued copy does
    assert study.ask().params == params  # the next ask runs the copy


def test_live_trial_of_another_host_is_not_failed_on_a_heartbeat_storage(tmp_path: Path) -> None:
    """With an RDB (native heartbeat), a trial whose owner is on another host and beats through Optuna's heartbeat
    stays RUNNING, however old tokzoo's own start-time attr is (it was failed after `grace` seconds before)."""
    spec = load_sweep(sweep_file(tmp_path, heartbeat={"interval": 1, "grace": 5}), storage=f"sqlite:///{tmp_path}/o.db")
    study = optuna.create_study(storage=open_storage(spec.storage, 1, 5), study_name="tiny")
    trial = study.ask()
    storage = study._storage
    storage.set_trial_system_attr(trial._trial_id, OWNER_ATTR, "another-host:4242:123")
    storage.set_trial_system_attr(trial._trial_id, BEAT_ATTR, time.time() - 3600)  # written once, an hour ago
    record_beat(storage, trial._trial_id)  # what the owning sweep process does every interval
    assert fail_stale(study, spec.grace_period, Requeue(max_retry=2)) == []
    assert study.get_trials()[trial.number].state == TrialState.RUNNING


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_heartbeat_keeps_another_hosts_trial_alive_past_the_grace_period(kind: str, tmp_path: Path) -> None:
    """Journal: tokzoo's own beat; SQLite: Optuna's native heartbeat. Beating, a trial of another host stays RUNNING
    for twice the grace period; once its owner falls silent, it is failed and re-queued."""
    grace = 2
    study = new_study(storage_url(kind, tmp_path), interval=1, grace=grace)
    trial = ask_as(study, "host-b:4242:1:0123456789")
    with Heartbeat(study._storage, 1, log=print) as beat:
        beat.add(trial._trial_id)
        deadline = time.time() + 2 * grace + 1
        while time.time() < deadline:
            assert fail_stale(study, grace, Requeue(2)) == []
            time.sleep(0.5)
    assert study.get_trials()[trial.number].state == TrialState.RUNNING
    time.sleep(grace + 1.5)
    assert fail_stale(study, grace, Requeue(2)) == [trial.number]
    trials = study.get_trials()
    assert trials[trial.number].state == TrialState.FAIL
    (copy,) = [t for t in trials if t.state == TrialState.WAITING]
    assert copy.params == trial.params and copy.system_attrs["retry_history"] == [trial.number]


def test_sweeps_started_together_all_open_a_new_database(tmp_path: Path) -> None:
    """Optuna creates its tables on first use; without retrying, all but one of the processes that start together
    on a new database (srun on many nodes) fail with "table studies already exists" or an IntegrityError."""
    url, errors = f"sqlite:///{tmp_path / 'new.db'}", []
    start = threading.Barrier(6)

    def sweep_process_opens() -> None:
        start.wait()
        try:
            open_storage(url, 1, 2)
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=sweep_process_opens) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_owner_in_another_container_with_the_same_hostname_is_not_judged_by_pid() -> None:
    """Same hostname, other pid namespace or boot (the machine key differs): its pids mean nothing here."""
    me = process_identity()
    host, pid, start, _ = me.split(":")
    assert owner_alive(me) is True
    assert owner_alive(f"{host}:{pid}:{start}:another-machine") is None
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert owner_alive(f"{host}:{dead.pid}:x") is False  # the older owner format, without a machine key
    assert owner_alive(f"elsewhere:{pid}:{start}:x") is None


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_outcome_of_a_trial_failed_by_another_process_goes_to_its_copy(kind: str, tmp_path: Path) -> None:
    study = new_study(storage_url(kind, tmp_path))
    trial = ask_as(study, process_identity())
    fail_as_another_process(study, trial)
    note = record_outcome(study, trial._trial_id, TrialState.COMPLETE, [31.5], {"mlflow_run_id": "run-1"})
    trials = study.get_trials()
    (copy,) = [t for t in trials if t.number != trial.number]
    assert f"re-queued copy, trial {copy.number}" in note
    assert copy.state == TrialState.COMPLETE and copy.values == [31.5] and copy.params == trial.params
    assert copy.user_attrs["mlflow_run_id"] == "run-1"
    assert trials[trial.number].state == TrialState.FAIL and budget_used(trials) == 1  # nothing to run again


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_outcome_when_the_copy_is_taken_or_there_is_none(kind: str, tmp_path: Path) -> None:
    study = new_study(storage_url(kind, tmp_path))
    taken = ask_as(study, process_identity())
    fail_as_another_process(study, taken)
    (copy,) = [t for t in study.get_trials() if t.state == TrialState.WAITING]
    assert study._storage.set_trial_state_values(copy._trial_id, TrialState.RUNNING)  # another process runs it
    note = record_outcome(study, taken._trial_id, TrialState.COMPLETE, [30.0], {})
    assert "runs elsewhere" in note and study.get_trials()[copy.number].state == TrialState.RUNNING

    last = ask_as(study, process_identity())
    fail_as_another_process(study, last, retries=0)  # out of retries: no copy
    note = record_outcome(study, last._trial_id, TrialState.COMPLETE, [32.0], {})
    assert "new COMPLETE trial" in note
    (added,) = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    assert added.params == last.params and added.values == [32.0]
    assert record_outcome(study, added._trial_id, TrialState.FAIL, None, {}).endswith("nothing more to record")


def test_pruning_reports_stop_quietly_once_another_process_failed_the_trial(tmp_path: Path) -> None:
    url = storage_url("sqlite", tmp_path)
    study = new_study(url)
    trial = ask_as(study, process_identity())
    meta = {"study": study.study_name, "storage": url, "trial_id": trial._trial_id,
            "pruner": {"type": "median"}, "objectives": [{"metric": "val/psnr"}]}  # fmt: skip
    hook = pruning_hook(meta, {})
    assert hook(1, {"val/psnr": 20.0}) is False
    fail_as_another_process(study, trial)
    assert hook(2, {"val/psnr": 21.0}) is False  # no UpdateFinishedTrialError: training goes on
    assert study.get_trials()[trial.number].intermediate_values == {1: 20.0}


def test_pruning_through_a_real_redis_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep and the trial side open redis:// as a journal in Redis, and the trial's reports prune it there."""
    url = os.environ.get("TOKZOO_TEST_REDIS_URL")
    if not url:
        pytest.skip("TOKZOO_TEST_REDIS_URL is not set (a redis-server on 127.0.0.1, e.g. started by .ci/run)")
    pytest.importorskip("redis", reason="the redis package (Optuna's JournalRedisBackend needs it) is not installed")
    from test_sweep import _pruned_by_the_trial_side

    name = f"redis_{uuid.uuid4().hex[:8]}"  # the server outlives the test: a study of its own
    spec = load_sweep(sweep_file(tmp_path, name=name, sampler={"type": "random", "seed": 0}, n_trials=8), storage=url)
    opened = _pruned_by_the_trial_side(monkeypatch, spec)
    assert [u for u, _ in opened] == [url, url]
    assert {type(storage).__name__ for _, storage in opened} == {"JournalStorage"}


# ------------------------------------------------------------------------------------ the real command

# One grid point per host: a second round would double the test's time and add nothing the first does not check.
POINTS = {"model.quantizer.codebook_size": {"type": "categorical", "choices": [8, 16]}}
# Only val/psnr is needed: the other evaluations would only make each trial slower.
QUICK_EVAL = [
    "eval.zero_shot=false", "eval.retrieval=false", "eval.lpips=false", "eval.rfid=false",
    "eval.token_diagnostics=false", "eval.stability_images=0", "loss.lpips_weight=0",
]  # fmt: skip
# Trials must outlive the grace period plus the stale-check period side by side: warm trials (sweep/warm.py) of
# 2 steps end in ~4 s, ~5 s sooner than fresh ones, so these train 60 steps (>= 5 s more on 2 cores).
LONG_ENOUGH = "trainer.max_steps=60"


def _unshare_reason() -> str | None:
    if os.geteuid() != 0:
        return "not root: unshare -u (a hostname per sweep process) needs CAP_SYS_ADMIN"
    if not shutil.which("unshare"):
        return "no unshare command (util-linux)"
    probe = subprocess.run(["unshare", "-u", "sh", "-c", "hostname host-probe && hostname"], capture_output=True)
    if probe.returncode != 0 or probe.stdout.strip() != b"host-probe":
        return f"unshare -u failed here: {probe.stderr.decode(errors='replace').strip()[:200]}"
    return None


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "journal", "postgres"])
def test_two_hosts_share_one_study(kind: str, tmp_path: Path) -> None:
    """Two sweep processes as hostA and hostB, one storage, a 1 s heartbeat with a 3 s grace and trials that run
    longer than that: each judges the other's trials only by their heartbeat, and none is failed."""
    reason = _unshare_reason()
    if reason:
        pytest.skip(reason)
    url = storage_url(kind, tmp_path)
    name = f"hosts_{kind}_{uuid.uuid4().hex[:6]}"
    interval, grace = 1, 3
    path = sweep_file(tmp_path, name=name, space=POINTS, heartbeat={"interval": interval, "grace": grace})
    env = {**os.environ, "MLFLOW_TRACKING_URI": sqlite_uri(tmp_path), "PYTHONUNBUFFERED": "1"}
    from mlflow.tracking import MlflowClient

    MlflowClient(sqlite_uri(tmp_path)).search_experiments()  # create the store once: two first users race on it
    procs = {}
    for host in ("hostA", "hostB"):
        cmd = ["unshare", "-u", "sh", "-c", f'hostname {host} && exec "$@"', "sh"]
        cmd += [*tokzoo_command(), "sweep", str(path), "--storage", url, "--workers", "1", *QUICK_EVAL, LONG_ENOUGH]
        log = open(tmp_path / f"{host}.log", "w")  # noqa: SIM115 - closed below
        procs[host] = (subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    try:
        for proc, log in procs.values():
            proc.wait(timeout=300)
            log.close()
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
    logs = {host: (tmp_path / f"{host}.log").read_text() for host in procs}
    for host, (proc, _) in procs.items():
        assert proc.returncode == 0, f"{host}:\n{logs[host][-3000:]}"
        assert "Cannot tell" not in logs[host] and "stale" not in logs[host], logs[host][-3000:]

    trials = open_study(url, name).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2, [(t.number, t.state, t.user_attrs) for t in trials]
    assert sorted(t.params["model.quantizer.codebook_size"] for t in trials) == [8, 16]  # each grid point once
    hosts = {t.system_attrs[OWNER_ATTR].split(":")[0] for t in trials}
    assert hosts == {"hostA", "hostB"} and socket.gethostname() not in hosts
    spans = [
        (t.datetime_start.timestamp(), t.datetime_complete.timestamp(), t.system_attrs[OWNER_ATTR]) for t in trials
    ]
    assert all(end - start > grace for start, end, _ in spans), spans  # every trial outlived the grace period
    overlap = max(
        min(a[1], b[1]) - max(a[0], b[0]) for a in spans for b in spans if a[2].split(":")[0] != b[2].split(":")[0]
    )
    # side by side for longer than the grace plus the 3-interval stale-check period: each process judged the other's
    # trial at least once when its start was older than the grace period
    assert overlap > grace + 3 * interval, spans

    client = MlflowClient(sqlite_uri(tmp_path))
    parent = open_study(url, name).user_attrs["mlflow_parent_run_id"]  # one parent run, although both created one
    assert client.get_run(parent).info.status == "FINISHED"
    assert {client.get_run(t.user_attrs["mlflow_run_id"]).data.tags["mlflow.parentRunId"] for t in trials} == {parent}
