"""MLflow: where runs go, one run per variant, tags that make runs findable and comparable."""

from __future__ import annotations

import logging
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tokzoo.errors import ConfigError

DEFAULT_DB = "mlflow.db"

log = logging.getLogger("tokzoo.tracking")


def tracking_uri(configured: str | None = None) -> str:
    """The config's tracking.uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory.

    (MLflow 3 refuses the old ./mlruns file store, so the default is a SQLite file.)"""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path.cwd() / DEFAULT_DB}"


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: next to a SQLite database (`<db folder>/mlartifacts`), so that a
    run writes nothing into the working directory (MLflow's own default there is ./mlruns). None for servers,
    which choose their artifact store themselves."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///") :]).expanduser()
    return (db.resolve().parent / "mlartifacts").as_uri()


def check_tracking(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before any training, when runs could not be recorded."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        parent = db.parent if str(db.parent) else Path(".")
        if not parent.exists():
            raise ConfigError(f"tracking URI {uri}: folder {parent} does not exist; create it or set tracking.uri")
        if not os.access(parent, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise ConfigError(f"tracking URI {uri}: {db} is not writable; fix permissions or set tracking.uri")
    elif uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
        except (urllib.error.URLError, OSError) as err:
            raise ConfigError(
                f"MLflow tracking server {uri} is unreachable ({getattr(err, 'reason', err)}); start it "
                f"(`mlflow server ...`) or unset MLFLOW_TRACKING_URI to use sqlite:///{DEFAULT_DB}"
            ) from None
    elif uri.startswith("file:") or "://" not in uri:
        raise ConfigError(
            f"tracking URI {uri!r} is a file store, which MLflow 3 refuses; use sqlite:///path/to/mlflow.db "
            f"or an http(s):// server"
        )


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(variant: str, config_hash: str, extra: dict[str, Any] | None = None) -> dict[str, str]:
    tags = {
        "tokzoo.variant": variant,
        "tokzoo.config_hash": config_hash,
        "mlflow.source.git.commit": git_commit(),
    }  # the run's name (mlflow.runName) is the logger's run_name
    tags.update({k: str(v) for k, v in (extra or {}).items()})
    return tags


def ensure_experiment(uri: str, experiment: str) -> str:
    """The experiment's id; created first if needed, with its artifacts next to a SQLite database."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        try:
            client.create_experiment(experiment, artifact_location(uri))
        except Exception:  # another process created it in the meantime
            if client.get_experiment_by_name(experiment) is None:
                raise
        exp = client.get_experiment_by_name(experiment)
    check_artifact_store(uri, exp.artifact_location)
    return exp.experiment_id


def check_artifact_store(uri: str, location: str) -> None:
    """A server's experiments should keep artifacts in the server's store (proxied, `mlflow-artifacts:/`); a plain
    path would be written by each client on its own disk, invisible to the others."""
    if uri.startswith(("http://", "https://")) and location.startswith(("file:", "/")):
        log.warning(
            "MLflow server %s gives this experiment the artifact location %s: grids and other artifacts would be "
            "written on this machine, not on the server; start the server with --serve-artifacts "
            "--artifacts-destination DIR (and without --default-artifact-root), and use a new experiment",
            uri, location,
        )  # fmt: skip


def param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


# ---- sweeps: the study's parent run and the trials' child runs (tokzoo.sweep itself imports no mlflow) ----------


def open_parent_run(
    uri: str, experiment: str, run_name: str, tags: dict[str, str], params: dict[str, str], run_id: str | None = None
) -> str:
    """A study's parent run: `run_id` set RUNNING again when it still exists (a resumed study), else a new run in
    `experiment` (created, with its artifacts next to a SQLite database, if needed) with these tags and params."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if run_id:
        try:
            client.update_run(run_id, status="RUNNING")
            return run_id
        except Exception:  # deleted, or another tracking store: start a new parent
            pass
    run = client.create_run(ensure_experiment(uri, experiment), run_name=run_name, tags=tags)
    for key, value in params.items():
        client.log_param(run.info.run_id, key, param_value(value))
    return run.info.run_id


def tag_run(uri: str, run_id: str, tags: dict[str, str]) -> None:
    """Best effort: a tracking hiccup must not turn a trial that already finished into a failed one."""
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(uri)
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
    except Exception:
        pass


def close_run(uri: str, run_id: str, metrics: dict[str, float], tags: dict[str, str], status: str) -> None:
    """Log a run's closing metrics and tags and end it (FINISHED, KILLED); best effort, like tag_run: it runs while
    the sweep may be unwinding from an interrupt, whose error must stay the one reported."""
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(uri)
        for key, value in metrics.items():
            client.log_metric(run_id, key, value)
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        client.set_terminated(run_id, status=status)
    except Exception:
        pass
