"""Tracking that outlives an MLflow server outage: calls the server could not take are kept in a durable journal in
the variant's folder and sent, in their original order and with their original steps and timestamps, once it
answers again (during training, at the end of the variant, or when the same command is run again).

    logger = BufferedMLFlowLogger(journal_folder=out_dir, experiment_name=..., tracking_uri=uri, ...)
    client = logger.experiment          # log_metric/log_batch/set_tag/log_artifact/... are kept when the server is down
    logger.flush_pending()              # end of a variant: wait (bounded) for the server to take what is pending
    replay_pending(uri, out_dir)        # start of a variant: send what an earlier process left behind

Only http(s) servers are buffered: a SQLite store is a local file, with nothing to wait for. Reads and run creation
always go to the server: before a run exists, an unreachable server stops the command (tracking.check_tracking).
"""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from tokzoo.errors import ConfigError
from tokzoo.tracking_journal import JOURNAL_NAME, Journal, groups, send

log = logging.getLogger("tokzoo.tracking")

RETRY_ENV = "TOKZOO_TRACKING_RETRY_S"  # seconds without any call to a server that just failed (default 30)
WAIT_ENV = "TOKZOO_TRACKING_WAIT_S"  # how long the end or start of a variant waits for the server (default 600)


def env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name, str(default))
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # negative, unreadable or NaN
        raise ConfigError(f"${name}={text!r}: expected a number of seconds >= 0")
    return value


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def server_answers(uri: str, timeout_s: float = 5.0) -> bool:
    """One plain request to the server's /health, without MLflow's retries (which can take minutes)."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def why(err: BaseException) -> str:
    """The root of an error chain ("[Errno 111] Connection refused"), not MLflow's wrapping of it."""
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    return " ".join(str(err).split())[:300] or type(err).__name__


def now_ms() -> int:
    return int(time.time() * 1000)


def clock() -> str:
    return time.strftime("%H:%M:%S")


class BufferedClient:
    """The MlflowClient calls tokzoo makes while a run trains, kept in a Journal while the server does not answer.
    After a failure the server is left alone for $TOKZOO_TRACKING_RETRY_S seconds (every call in between goes
    straight to the journal, so training does not wait on retries); then one /health request decides whether the
    journal is sent. While anything is pending, new calls queue behind it: the server sees them in order."""

    def __init__(self, uri: str, folder: Path):
        from mlflow import MlflowClient

        self.uri = uri
        self.client = MlflowClient(uri)
        self.journal = Journal(folder)
        self.retry_s = env_seconds(RETRY_ENV, 30.0)
        self.wait_s = env_seconds(WAIT_ENV, 600.0)  # read now: a bad value fails before training, not after it
        self.next_try = 0.0  # time.monotonic() before which the server is not contacted
        self.down_since: str | None = None
        self.last_report = 0.0

    def __getattr__(self, name: str) -> Any:  # reads and run creation: straight to the server
        if name == "client":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.client, name)

    # ---- the writes tokzoo makes during and after training -----------------------------------------------------
    def log_batch(self, run_id: str, metrics=(), params=(), tags=(), synchronous: bool | None = None) -> None:
        record = {
            "op": "batch",
            "run": run_id,
            "metrics": [[m.key, m.value, m.timestamp, m.step] for m in metrics],
            "params": [[p.key, p.value] for p in params],
            "tags": [[t.key, t.value] for t in tags],
        }
        self.submit(record)

    def log_metric(self, run_id: str, key: str, value: float, timestamp: int | None = None, step: int | None = None,
                   synchronous: bool | None = None) -> None:  # fmt: skip
        # the time of the call, not of the send: the history stays as it happened
        self.submit({"op": "batch", "run": run_id, "metrics": [[key, float(value), timestamp or now_ms(), step or 0]]})

    def log_param(self, run_id: str, key: str, value: Any, synchronous: bool | None = None) -> Any:
        self.submit({"op": "batch", "run": run_id, "params": [[key, str(value)]]})
        return value

    def set_tag(self, run_id: str, key: str, value: Any, synchronous: bool | None = None) -> None:
        self.submit({"op": "batch", "run": run_id, "tags": [[key, str(value)]]})

    def set_terminated(self, run_id: str, status: str | None = None, end_time: int | None = None) -> None:
        end_time = end_time or now_ms()  # when it ended, not when the server heard of it
        self.submit({"op": "terminated", "run": run_id, "status": status or "FINISHED", "end_time": end_time})

    def update_run(self, run_id: str, status: str | None = None, name: str | None = None) -> None:
        if name is not None:  # tokzoo never renames a run; keep the journal to what it can replay
            raise ValueError("BufferedClient.update_run does not rename runs")
        self.submit({"op": "status", "run": run_id, "status": status})

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        if Path(local_path).is_dir():
            raise ValueError(f"BufferedClient.log_artifact takes files, not folders: {local_path}")
        self.submit({"op": "artifact", "run": run_id, "file": str(local_path), "artifact_path": artifact_path})

    # ---- the machinery -------------------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        return self.journal.count

    def submit(self, record: dict[str, Any]) -> None:
        if self.try_flush():
            try:
                send(self.client, [record])
                return
            except Exception as err:
                if not self.is_outage(err):
                    raise
                self.went_down(err)
        self.journal.append(record)

    def try_flush(self) -> bool:
        """True when nothing is pending (any more); sends the journal if the back-off is over and the server answers."""
        if self.pending == 0:
            return True
        if time.monotonic() < self.next_try:
            return False
        if not server_answers(self.uri):
            self.still_down()
            return False
        count = self.pending
        try:
            for group in groups(self.journal.unsent()):
                send(self.client, group)
                self.journal.mark_sent(len(group))
        except Exception as err:
            if not self.is_outage(err):
                raise
            self.went_down(err)
            return False
        log.warning(
            "MLflow server %s answers again at %s: sent %d pending tracking call(s) (unreachable since %s)",
            self.uri, clock(), count, self.down_since or "an earlier process",
        )  # fmt: skip
        self.down_since = None
        return True

    def is_outage(self, err: Exception) -> bool:
        """A server-side or connection failure (MLflow reports both as HTTP 5xx), or no answer on /health. Anything
        else (a rejected value, an unknown run) is a real error and raised as it would be without the journal."""
        from mlflow.exceptions import MlflowException

        if isinstance(err, MlflowException) and err.get_http_status_code() >= 500:
            return True
        return not server_answers(self.uri)

    def went_down(self, err: Exception) -> None:
        self.next_try = time.monotonic() + self.retry_s
        if self.down_since is None:
            self.down_since, self.last_report = clock(), time.monotonic()
            log.warning(
                "MLflow server %s unreachable at %s (%s): training goes on; tracking calls are kept in %s and sent "
                "when it answers (checked every %.0f s)",
                self.uri, self.down_since, why(err), self.journal.path, self.retry_s,
            )  # fmt: skip
        else:
            self.still_down()

    def still_down(self) -> None:
        self.next_try = time.monotonic() + self.retry_s
        if time.monotonic() - self.last_report >= 60:  # one line a minute, not one per check
            self.last_report = time.monotonic()
            log.warning(
                "MLflow server %s still unreachable at %s: %d tracking call(s) pending in %s",
                self.uri, clock(), self.pending, self.journal.path,
            )  # fmt: skip

    def flush(self, wait_s: float) -> bool:
        """Send what is pending, waiting up to wait_s for the server (health checked every few seconds)."""
        deadline = time.monotonic() + wait_s
        waiting = False
        while True:
            self.next_try = 0.0  # the caller waits anyway: no back-off
            if self.try_flush():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if not waiting:
                waiting = True
                log.warning("waiting up to %.0f s for MLflow server %s to take %d pending tracking call(s)",
                            wait_s, self.uri, self.pending)  # fmt: skip
            time.sleep(min(5.0, left))


class BufferedMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger whose client keeps what an unreachable server could not take (BufferedClient)."""

    def __init__(self, *args: Any, journal_folder: Path, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if is_server(self._tracking_uri or ""):
            self._mlflow_client = BufferedClient(self._tracking_uri, journal_folder)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if status == "finished":
            # Lightning's SLURM requeue handler (its only "finished" caller) runs inside a signal handler, which may
            # have interrupted this process's own write to a SQLite store ("database is locked" then kills the job
            # before it saves and requeues). The run is to be resumed, so RUNNING is its true status: leave it.
            return
        # Lightning's own finalize asks the server for the run first, which fails while it is down
        if self._initialized:
            status = {"success": "FINISHED", "finished": "FINISHED", "failed": "FAILED"}.get(status, status)
            self.experiment.set_terminated(self.run_id, status)

    @rank_zero_only
    def flush_pending(self) -> None:
        """End of a variant: wait up to $TOKZOO_TRACKING_WAIT_S for the server; what it still cannot take stays in
        the journal, which the same command sends when it runs again."""
        client = self._mlflow_client
        if isinstance(client, BufferedClient) and not client.flush(client.wait_s):
            log.warning(
                "MLflow server %s still unreachable: %d tracking call(s) of run %s stay in %s; run the same command "
                "again once the server answers to complete the run", client.uri, client.pending, self.run_id,
                client.journal.path,
            )  # fmt: skip


def replay_pending(uri: str, folder: Path, rank_zero: bool = True) -> None:
    """Start of a variant: send the calls an earlier process left in `folder`'s journal, before the runs are looked
    up (its last call may be the completion tag). Other DDP ranks wait for rank 0 to do it (the folder is shared)."""
    path = Path(folder) / JOURNAL_NAME
    if not is_server(uri):
        return
    if not rank_zero:
        # Ranks started together (torchrun, srun) must see the runs as rank 0 leaves them. Bounded: a rank that
        # Lightning starts inside rank 0's fit can find rank 0's own new journal there, which no wait here empties.
        deadline = time.monotonic() + min(env_seconds(WAIT_ENV, 600.0), 60.0)
        while path.exists() and time.monotonic() < deadline:
            time.sleep(1.0)
        return
    from mlflow.exceptions import MlflowException

    client = BufferedClient(uri, folder)
    count = client.pending
    if count == 0:  # nothing to send; a server that went away after an earlier variant is waited for, bounded
        client.journal.clear()
        if not server_answers(uri):
            log.warning("waiting up to %.0f s for MLflow server %s to answer", client.wait_s, uri)
            deadline = time.monotonic() + client.wait_s
            while not server_answers(uri):
                if time.monotonic() >= deadline:
                    raise ConfigError(f"MLflow server {uri} unreachable; run the same command again once it answers")
                time.sleep(5.0)
        return
    log.warning("sending %d tracking call(s) left pending by an earlier run (%s)", count, path)
    try:
        sent = client.flush(client.wait_s)
    except (MlflowException, ValueError) as err:  # refused by the server, or a line that is not JSON
        raise ConfigError(
            f"MLflow server {uri} could not take a tracking call kept in {path} ({' '.join(str(err).split())[:300]}); "
            f"delete that file (and {path.with_suffix('.sent').name}) to drop the calls kept there"
        ) from None
    if not sent:
        raise ConfigError(
            f"MLflow server {uri} unreachable: {client.pending} tracking call(s) of an earlier run are pending in "
            f"{path}; run the same command again once the server answers"
        )
