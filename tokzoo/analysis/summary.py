"""Per-variant summaries of an experiment's runs: mean and t-interval over seeds for every catalogue column."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from tokzoo import catalogue
from tokzoo.analysis.runs import ExperimentRuns, RunRecord
from tokzoo.analysis.stats import Summary, mean_ci


@dataclass(frozen=True)
class Column:
    key: str  # column id in CSV / summaries
    label: str  # header in the rich and Markdown tables
    metric: str  # MLflow metric it is computed from
    reduce: str = "last"  # per run: "last" logged value, or "mean" over every logged step


def column(metric: str) -> Column:
    """The table column of a catalogue metric: a per-run mean for metrics logged over steps, else the last value."""
    entry = catalogue.metric(metric)
    key = f"{metric}:mean_over_steps" if entry.reduce == "mean" else metric
    return Column(key, catalogue.header(metric), metric, entry.reduce)


COLUMNS = tuple(column(m) for m in catalogue.TABLE)


@dataclass
class VariantSummary:
    variant: str
    runs: list[RunRecord]
    stats: dict[str, Summary] = field(default_factory=dict)  # Column.key -> summary over seeds

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.runs]

    @property
    def params(self) -> dict[str, str]:
        """Params every run of the variant shares (the seed and anything else that differs is left out)."""
        common = dict(self.runs[0].params)
        for run in self.runs[1:]:
            common = {k: v for k, v in common.items() if run.params.get(k) == v}
        return common

    @property
    def bits_per_token(self) -> float | None:
        return self.runs[0].bits_per_token

    @property
    def absent(self) -> dict[str, str]:
        """metric -> reason it was not logged, from the runs' tags (first reason seen)."""
        out: dict[str, str] = {}
        for run in self.runs:
            for metric, reason in run.absent.items():
                out.setdefault(metric, reason)
        return out

    @property
    def capacity(self) -> str:
        """'mcq 4x256 + attention': the quantizer, its vocabulary as the quantizer describes it, the factorization."""
        p = self.params
        shape = p.get("model.quantizer.shape_label")
        if shape is None:  # a run logged before the quantizer described itself
            return self.variant
        if shape.startswith("continuous"):
            return f"{shape} + {p.get('model.factorization.name', '?')}"
        return f"{p.get('model.quantizer.name', '?')} {shape} + {p.get('model.factorization.name', '?')}"

    @property
    def codebook_shape(self) -> str:
        return self.params.get("model.quantizer.shape_label") or self.variant

    def metric_values(self, metric: str) -> list[float]:
        """Per-seed last values of an MLflow metric (e.g. 'val/codebook_usage/2'), finite ones only."""
        return [r.metrics[metric] for r in self.runs if metric in r.metrics and math.isfinite(r.metrics[metric])]

    def summary(self, metric: str, confidence: float = 0.95) -> Summary:
        """Summary over seeds of a column key or of any MLflow metric's last value."""
        return self.stats.get(metric) or mean_ci(self.metric_values(metric), confidence)


def run_value(experiment: ExperimentRuns, run: RunRecord, column: Column) -> float | None:
    if column.metric not in run.metrics:
        return None
    if column.reduce == "mean":
        values = [v for _, v in experiment.history(run.run_id, column.metric)]
        return math.fsum(values) / len(values) if values else None
    return run.metrics[column.metric]


def summarize(
    experiment: ExperimentRuns, columns: Sequence[Column] = COLUMNS, confidence: float = 0.95
) -> list[VariantSummary]:
    """One summary per variant (ablation order): mean and t-interval over its seeds for every column."""
    out = []
    for variant in experiment.variants:
        runs = experiment.runs_of(variant)
        summary = VariantSummary(variant, runs)
        for col in columns:
            values = [run_value(experiment, r, col) for r in runs]
            if any(v is not None for v in values):
                summary.stats[col.key] = mean_ci(values, confidence)
        out.append(summary)
    return out


def shown_columns(summaries: Sequence[VariantSummary], columns: Sequence[Column] = COLUMNS) -> list[Column]:
    return [c for c in columns if any(c.key in s.stats for s in summaries)]


def is_supervision_grid(summaries: Sequence[VariantSummary]) -> bool:
    """True when the variants cross >= 2 supervisions with every capacity (the loss-conflict design); the roadmap,
    whose supervision changes along the way, is not one."""
    cells = {(s.params.get("loss.supervision"), s.capacity) for s in summaries}
    sups, caps = {c[0] for c in cells}, {c[1] for c in cells}
    return len(sups) > 1 and len(cells) == len(sups) * len(caps)


def distinct(summaries: Sequence[VariantSummary], key: str) -> set[str]:
    return {s.params.get(key) for s in summaries if s.params.get(key) is not None}
