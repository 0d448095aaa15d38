"""The durable side of tracking_buffer: an append-only journal of the tracking calls an MLflow server could not
take (one JSON line each, fsync'd), and how its records are grouped and sent once the server answers."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

JOURNAL_NAME = "tracking-pending.jsonl"
# MLflow's limits for one log_batch request
MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100


class Journal:
    """Append-only JSON lines of tracking calls not yet on the server, and (beside it) how many lines were sent.
    Files touched only on first use, so that DDP ranks other than 0 never open the one rank 0 writes."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / JOURNAL_NAME
        self.sent_path = self.path.with_suffix(".sent")
        self.files = self.path.with_name("tracking-pending-files")  # copies of artifacts, as they were when logged
        self._lines: int | None = None
        self._sent = 0

    def _open(self) -> None:
        if self._lines is not None:
            return
        self._lines, self._sent = 0, 0
        if self.path.exists():
            data = self.path.read_bytes()
            whole = data[: data.rfind(b"\n") + 1]
            if len(whole) != len(data):  # a process died mid-line: drop the torn tail before appending after it
                with open(self.path, "r+b") as f:
                    f.truncate(len(whole))
            self._lines = whole.count(b"\n")
            if self.sent_path.exists():
                self._sent = min(int(self.sent_path.read_text() or 0), self._lines)

    @property
    def count(self) -> int:
        self._open()
        return self._lines - self._sent

    def append(self, record: dict[str, Any]) -> None:
        self._open()
        if record["op"] == "artifact":  # the file may change or go before it is sent: keep it as it is now
            src = Path(record["file"])
            copy = self.files / str(self._lines) / src.name
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, copy)
            record = {**record, "file": str(copy)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())  # durable: a crash or a killed job keeps every call made before it
        self._lines += 1

    def unsent(self) -> list[dict[str, Any]]:
        self._open()
        lines = self.path.read_text(encoding="utf-8").splitlines()[self._sent : self._lines]
        return [json.loads(line) for line in lines]

    def mark_sent(self, n: int) -> None:
        self._sent += n
        if self._sent >= self._lines:
            self.clear()
            return
        tmp = self.sent_path.with_suffix(".tmp")
        tmp.write_text(str(self._sent))
        os.replace(tmp, self.sent_path)  # atomic: a crash re-sends at most one group, which MLflow takes twice

    def clear(self) -> None:
        for path in (self.path, self.sent_path):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.files, ignore_errors=True)
        self._lines, self._sent = 0, 0


def groups(records: Iterable[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """Consecutive records, with runs of log_batch records of one run merged up to MLflow's batch limits."""
    group: list[dict[str, Any]] = []
    sizes = [0, 0, 0]
    for rec in records:
        more = [len(rec.get(k, ())) for k in ("metrics", "params", "tags")]
        fits = (
            group
            and rec["op"] == "batch"
            and group[-1]["op"] == "batch"
            and rec["run"] == group[-1]["run"]
            and sizes[0] + more[0] <= MAX_METRICS
            and sizes[1] + more[1] <= MAX_PARAMS
            and sizes[2] + more[2] <= MAX_TAGS
            and sum(sizes) + sum(more) <= MAX_METRICS
        )
        if group and not fits:
            yield group
            group, sizes = [], [0, 0, 0]
        group.append(rec)
        sizes = [a + b for a, b in zip(sizes, more)]
    if group:
        yield group


def send(client: Any, group: list[dict[str, Any]]) -> None:
    """Send one group (see groups) through a plain MlflowClient."""
    from mlflow.entities import Metric, Param, RunTag

    first = group[0]
    op, run = first["op"], first["run"]
    if op == "batch":
        metrics = [Metric(k, v, ts, step) for rec in group for k, v, ts, step in rec.get("metrics", ())]
        params = [Param(k, v) for rec in group for k, v in rec.get("params", ())]
        tags = [RunTag(k, v) for rec in group for k, v in rec.get("tags", ())]
        client.log_batch(run, metrics=metrics, params=params, tags=tags)
    elif op == "terminated":
        client.set_terminated(run, status=first["status"], end_time=first["end_time"])
    elif op == "status":
        client.update_run(run, status=first["status"])
    elif op == "artifact":
        client.log_artifact(run, first["file"], first.get("artifact_path"))
    else:
        raise ValueError(f"unknown journal record {first!r}")
