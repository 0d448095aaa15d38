"""Load an experiment's runs from MLflow into plain records (and a tidy pandas table on request).

What `tokzoo fit` writes, one MLflow run per variant and seed: tags `tokzoo.variant` ("mcq/seed1", or "mcq" when
the ablation has one seed), `tokzoo.config_hash`, `absent.<metric>` (why a metric is not logged); params = the
flattened resolved config ("model.quantizer.name", "seed", ...) plus "model.quantizer.bits_per_token"; metrics =
the names in ARCHITECTURE.md. A record keeps the last logged value of each metric; histories are fetched on demand.

Only FINISHED runs count. When a variant/seed was run more than once (an ablation re-run into the same
experiment), the most recent run wins; the others are counted in `superseded`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokzoo.errors import TokzooError
from tokzoo.tracking import tracking_uri

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient

SEED_SUFFIX = re.compile(r"/seed(-?\d+)$")
Series = list[tuple[int, float]]  # (step, value), sorted by step


@dataclass
class RunRecord:
    run_id: str
    variant: str  # base variant name, without the "/seed<k>" suffix
    label: str  # the run's tokzoo.variant tag as the runner wrote it
    seed: int | None
    status: str
    start_time: int  # ms since the epoch
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # last logged value of each metric
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def bits_per_token(self) -> float | None:
        """log2 of the effective vocabulary (inf for a continuous 'none' quantizer), None if not logged."""
        raw = self.params.get("model.quantizer.bits_per_token")
        try:
            return float(raw) if raw is not None else None
        except ValueError:
            return None

    @property
    def absent(self) -> dict[str, str]:
        """metric name -> reason it was not logged (from the run's absent.<metric> tags)."""
        return {k[len("absent.") :]: v for k, v in self.tags.items() if k.startswith("absent.")}


def split_label(label: str) -> tuple[str, int | None]:
    """'mcq/seed2' -> ('mcq', 2); 'mcq' -> ('mcq', None)."""
    match = SEED_SUFFIX.search(label)
    if match is None:
        return label, None
    return label[: match.start()], int(match.group(1))


def _client(uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _check_readable(uri: str) -> None:
    # MLflow would silently create an empty database at a mistyped path; reading must not write.
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        if not db.is_file():
            raise TokzooError(
                f"no MLflow database at {db} (tracking URI {uri}); run `tokzoo fit` first, or pass "
                f"--tracking-uri / set MLFLOW_TRACKING_URI to where the runs were logged"
            )


def list_experiments(uri: str | None = None) -> list[str]:
    """Names of the active experiments at the tracking URI (MLflow's 'Default' only when it holds runs)."""
    from mlflow.entities import ViewType

    uri = tracking_uri(uri)
    _check_readable(uri)
    client = _client(uri)
    names, token = [], None
    while True:
        page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, page_token=token)
        for exp in page:
            if exp.name == "Default" and not client.search_runs([exp.experiment_id], max_results=1):
                continue
            names.append(exp.name)
        token = page.token
        if not token:
            return sorted(names)


class ExperimentRuns:
    """The finished runs of one MLflow experiment, ordered by variant (ablation order) then seed."""

    def __init__(self, name: str, uri: str, experiment_id: str, runs: list[RunRecord], client: MlflowClient):
        self.name, self.uri, self.experiment_id = name, uri, experiment_id
        self.runs = runs
        self.client = client
        self.skipped: dict[str, int] = {}  # status -> count of runs left out (RUNNING, FAILED, KILLED)
        self.superseded = 0  # older duplicates of a variant/seed
        self._history: dict[tuple[str, str], Series] = {}

    @property
    def variants(self) -> list[str]:
        """Base variant names in the order the ablation ran them (first start time)."""
        seen: dict[str, None] = {}
        for run in sorted(self.runs, key=lambda r: r.start_time):
            seen.setdefault(run.variant, None)
        return list(seen)

    def runs_of(self, variant: str) -> list[RunRecord]:
        return [r for r in self.runs if r.variant == variant]

    def metric_names(self) -> list[str]:
        return sorted({k for r in self.runs for k in r.metrics})

    def history(self, run_id: str, metric: str) -> Series:
        """Every logged (step, value) of a metric in one run, by step (the last write wins at a repeated step)."""
        key = (run_id, metric)
        if key not in self._history:
            points = sorted(self.client.get_metric_history(run_id, metric), key=lambda m: (m.step, m.timestamp))
            by_step = {int(m.step): float(m.value) for m in points if math.isfinite(float(m.value))}
            self._history[key] = sorted(by_step.items())
        return self._history[key]

    def histories(self, metric: str) -> dict[str, list[Series]]:
        """variant -> one series per seed, for the runs that logged the metric (variants in ablation order)."""
        out: dict[str, list[Series]] = {}
        for variant in self.variants:
            series = [self.history(r.run_id, metric) for r in self.runs_of(variant) if metric in r.metrics]
            series = [s for s in series if s]
            if series:
                out[variant] = series
        return out

    def table(self, metrics: list[str] | None = None, params: list[str] | None = None) -> pd.DataFrame:
        """Tidy table, one row per run: variant, seed, label, run_id, bits_per_token, then `params.<key>` and
        `metrics.<key>` columns (MLflow's naming); NaN where a run did not log a metric. pandas comes with mlflow."""
        import pandas as pd

        metric_keys = metrics if metrics is not None else self.metric_names()
        param_keys = params if params is not None else sorted({k for r in self.runs for k in r.params})
        rows: list[dict[str, Any]] = []
        for r in self.runs:
            row: dict[str, Any] = {
                "variant": r.variant,
                "seed": r.seed,
                "label": r.label,
                "run_id": r.run_id,
                "bits_per_token": r.bits_per_token,
            }
            row.update({f"params.{k}": r.params.get(k) for k in param_keys})
            row.update({f"metrics.{k}": r.metrics.get(k, math.nan) for k in metric_keys})
            rows.append(row)
        return pd.DataFrame(rows)

    def history_table(self, metric: str) -> pd.DataFrame:
        """Long table of one metric's history: variant, seed, run_id, step, value."""
        import pandas as pd

        rows = [
            {"variant": r.variant, "seed": r.seed, "run_id": r.run_id, "step": step, "value": value}
            for r in self.runs
            if metric in r.metrics
            for step, value in self.history(r.run_id, metric)
        ]
        return pd.DataFrame(rows, columns=["variant", "seed", "run_id", "step", "value"])


def _record(run: Any) -> RunRecord:
    tags = dict(run.data.tags)
    label = tags.get("tokzoo.variant") or tags.get("mlflow.runName") or run.info.run_id
    variant, suffix_seed = split_label(label)
    params = dict(run.data.params)
    try:
        seed: int | None = int(params["seed"])
    except (KeyError, ValueError):
        seed = suffix_seed
    return RunRecord(
        run_id=run.info.run_id,
        variant=variant,
        label=label,
        seed=seed,
        status=run.info.status,
        start_time=int(run.info.start_time or 0),
        params=params,
        metrics={k: float(v) for k, v in run.data.metrics.items()},
        tags=tags,
    )


def load_experiment(name: str, uri: str | None = None) -> ExperimentRuns:
    """The finished runs of experiment `name` at `uri` (default: $MLFLOW_TRACKING_URI, else ./mlflow.db).

    Raises TokzooError naming the known experiments when `name` is not one of them, or when it has no finished run.
    """
    from mlflow.entities import ViewType

    uri = tracking_uri(uri)
    _check_readable(uri)
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage != "active":
        known = list_experiments(uri)
        listing = ", ".join(known) if known else "none (run `tokzoo fit ABLATION.yaml` first)"
        raise TokzooError(f"no MLflow experiment named '{name}' at {uri}; known experiments: {listing}")
    raw, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], run_view_type=ViewType.ACTIVE_ONLY, page_token=token)
        raw.extend(page)
        token = page.token
        if not token:
            break
    # A sweep's parent run (tag tokzoo.role=study) holds no training result: its trials are the rows.
    records = [_record(run) for run in raw if run.data.tags.get("tokzoo.role") != "study"]
    skipped: dict[str, int] = {}
    latest: dict[tuple[str, int | None], RunRecord] = {}
    superseded = 0
    for rec in records:
        if rec.status != "FINISHED":
            skipped[rec.status] = skipped.get(rec.status, 0) + 1
            continue
        # One run per (variant, seed): seeds may come from the ablation's `seeds:` or from a `seed=` override.
        key = (rec.variant, rec.seed)
        old = latest.get(key)
        if old is not None:
            superseded += 1
            if old.start_time >= rec.start_time:
                continue
        latest[key] = rec
    if not latest:
        states = ", ".join(f"{n} {s}" for s, n in sorted(skipped.items())) or "none"
        raise TokzooError(f"experiment '{name}' at {uri} has no finished run (runs: {states})")
    kept = sorted(latest.values(), key=lambda r: r.start_time)
    first_start: dict[str, int] = {}
    for rec in kept:
        first_start.setdefault(rec.variant, rec.start_time)
    kept.sort(key=lambda r: (first_start[r.variant], r.seed if r.seed is not None else -1, r.start_time))
    out = ExperimentRuns(name, uri, exp.experiment_id, kept, client)
    out.skipped, out.superseded = skipped, superseded
    return out
