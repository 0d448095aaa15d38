"""Which sweep process owns a RUNNING trial, whether it is still alive, and what happens when it is not.

Many sweep processes, on many hosts, share one storage. Each one beats for the trials it runs, on a thread of its
own (`Heartbeat`), for as long as they run:
- on an RDB storage with Optuna's heartbeat (open_storage turns it on): `storage.record_heartbeat`; Optuna's
  `fail_stale_trials` fails trials with no beat within the grace period (measured on the database server's clock),
  and calls the storage's `heartbeat_stale_trial_callback` (our `Requeue`);
- on a journal (file, Redis) or any storage without it: tokzoo's own `tokzoo.heartbeat` trial attr, a timestamp
  of the owning host's clock (so hosts must agree on the time to well within the grace period).
A trial owned by a process of this machine is judged at once by whether that process still exists.

A process whose trial was failed by another one anyway (a network partition, a machine suspended past the grace
period) does not lose its finished work: `record_outcome` gives the result to the trial's re-queued copy.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

OWNER_ATTR = "tokzoo.owner"  # trial system attr: host:pid:start-time:machine of the sweep process running it
BEAT_ATTR = "tokzoo.heartbeat"  # trial system attr (storages without Optuna's heartbeat): owner's last beat


def process_identity(pid: int | None = None) -> str:
    """host:pid:start-time:machine. The start time tells a recycled pid from the owner; the machine key (boot id and
    pid namespace) tells apart containers that share a hostname but not their processes."""
    pid = pid or os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_time(pid)}:{_machine()}"


def _start_time(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def _machine() -> str:
    parts = []
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(Path(path).read_text() if "boot" in path else str(os.stat(path).st_ino))
        except OSError:
            parts.append("")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:10]


def owner_alive(owner: str) -> bool | None:
    """True/False for a process whose pids this process can see; None (unknown) for another host or container."""
    host, _, rest = owner.partition(":")
    pid_s, _, rest = rest.partition(":")
    start, _, machine = rest.partition(":")
    if host != socket.gethostname() or (machine and machine != _machine()):
        return None
    try:
        pid = int(pid_s)
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return _start_time(pid) == start


def native_heartbeat(storage: optuna.storages.BaseStorage) -> bool:
    """Whether the storage keeps Optuna's heartbeat (an RDBStorage opened with heartbeat_interval)."""
    interval = getattr(storage, "get_heartbeat_interval", None)
    return interval is not None and interval() is not None


def record_beat(storage: optuna.storages.BaseStorage, trial_id: int) -> None:
    """The owner is alive: Optuna's own heartbeat where the storage has it, else our timestamp attr."""
    if native_heartbeat(storage):
        storage.record_heartbeat(trial_id)
    else:
        storage.set_trial_system_attr(trial_id, BEAT_ATTR, time.time())


class Heartbeat:
    """Beats every `interval` seconds for this process's running trials, on its own thread: a main loop held up by
    a slow call (MLflow retrying, a storage hiccup) must not make other hosts take its trials for dead."""

    def __init__(self, storage: optuna.storages.BaseStorage, interval: float, log: Callable[[str], None]):
        self.storage, self.interval, self.log = storage, interval, log
        self._ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tokzoo-heartbeat", daemon=True)
        self._failing = False

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def add(self, trial_id: int) -> None:
        record_beat(self.storage, trial_id)  # at once: Optuna judges only trials that have beaten at least once
        with self._lock:
            self._ids.add(trial_id)

    def discard(self, trial_id: int) -> None:
        with self._lock:
            self._ids.discard(trial_id)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                ids = sorted(self._ids)
            for trial_id in ids:
                try:
                    record_beat(self.storage, trial_id)
                except UpdateFinishedTrialError:
                    pass  # finished meanwhile (here, or failed by another process: record_outcome handles that)
                except Exception as err:  # the storage is unreachable: keep trying, say so once
                    if not self._failing:
                        self.log(f"[red]heartbeat failed[/red] ({type(err).__name__}: {err}); retrying")
                    self._failing = True
                else:
                    self._failing = False


def fail_stale(
    study: optuna.Study, grace_period: float, requeue: Callable[[optuna.Study, FrozenTrial], None]
) -> list[int]:
    """Fail (and re-queue) RUNNING trials whose sweep process is gone; returns their numbers.

    With Optuna's heartbeat only Optuna judges trials of other hosts (on the database's clock); without it, a trial
    of another host is stale once its tokzoo.heartbeat is older than the grace period. A process of this machine
    is judged by its pid either way."""
    storage = study._storage  # storage-level calls: a trial of another process cannot be told through a Trial
    native = native_heartbeat(storage)
    failed = []
    if native:
        running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        with warnings.catch_warnings():  # fail_stale_trials is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # fails them and calls the storage's callback (Requeue)
        now_failed = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
        failed = sorted(running & now_failed)
    now, me = time.time(), process_identity()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.system_attrs.get(OWNER_ATTR)
        if owner is None or owner == me:
            continue
        alive = owner_alive(owner)
        beat = t.system_attrs.get(BEAT_ATTR)
        if alive is False:
            reason = f"stale: its sweep process {owner} is gone (killed or crashed)"
        elif alive is None and not native and beat is not None and now - beat > grace_period:
            reason = (
                f"stale: no heartbeat from its sweep process {owner} for {now - beat:.0f} s (grace {grace_period} s)"
            )
        else:
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
            if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                failed.append(t.number)
                requeue(study, storage.get_trial(t._trial_id))
        except UpdateFinishedTrialError:
            pass  # another process got there first
    return failed


# --- recording the outcome of a trial this process ran ---------------------------------------------------------


def record_outcome(
    study: optuna.Study,
    trial_id: int,
    state: TrialState,
    values: Sequence[float] | None,
    user_attrs: dict[str, Any],
) -> str:
    """Tell the study how a trial of this process ended; returns a note for the log ("" when the trial itself got
    the outcome).

    If another process has failed the trial meanwhile (it took it for stale), telling it would raise "Cannot tell a
    FAIL trial". The outcome goes instead to the copy that process re-queued, claimed from WAITING so that nobody
    runs it again; if there is no copy (out of retries), a finished result becomes a new COMPLETE trial."""
    storage = study._storage
    trial = storage.get_trial(trial_id)
    if trial.state == TrialState.RUNNING and _tell(study, trial, state, values, user_attrs):
        return ""
    trial = storage.get_trial(trial_id)
    lost = f"trial {trial.number} was marked {trial.state.name} by another sweep process"
    copies = [t for t in study.get_trials(deepcopy=False) if _retry_of(t) == trial.number]
    for copy in copies:
        if copy.state == TrialState.WAITING and storage.set_trial_state_values(copy._trial_id, TrialState.RUNNING):
            if _tell(study, storage.get_trial(copy._trial_id), state, values, user_attrs):
                return f"{lost}; its outcome is recorded in its re-queued copy, trial {copy.number}"
    if copies:
        return f"{lost}; its re-queued copy runs elsewhere, so this outcome stays in MLflow only"
    if state != TrialState.COMPLETE:
        return f"{lost}; nothing more to record"
    system = {k: v for k, v in trial.system_attrs.items() if k not in (OWNER_ATTR, BEAT_ATTR)}
    study.add_trial(
        optuna.trial.create_trial(
            values=list(values or []), params=trial.params, distributions=trial.distributions,
            user_attrs={**trial.user_attrs, **user_attrs}, system_attrs=system,
        )
    )  # fmt: skip
    return f"{lost} (no retries left); its result is recorded as a new COMPLETE trial"


def _retry_of(trial: FrozenTrial) -> int | None:
    """The trial this one is the re-queued copy of (Requeue appends it to retry_history)."""
    history = trial.system_attrs.get("retry_history") or [None]
    return history[-1]


def _tell(
    study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None, attrs: dict[str, Any]
) -> bool:
    """study.tell, False where another process finished the trial first (the race after our state check)."""
    storage = study._storage
    try:
        for key, value in attrs.items():
            storage.set_trial_user_attr(trial._trial_id, key, value)
        if state == TrialState.COMPLETE:
            study.tell(trial.number, list(values or []))
        else:
            study.tell(trial.number, state=state)
        return True
    except UpdateFinishedTrialError:
        return False
    except ValueError:
        if storage.get_trial(trial._trial_id).state != TrialState.RUNNING:  # "Cannot tell a FAIL trial"
            return False
        raise
