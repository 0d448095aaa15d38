"""What a sweep hands back: its outcome, the best trials (the Pareto front for several objectives) and the table
`tokzoo sweep` prints at the end."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState


@dataclass
class SweepOutcome:
    name: str
    study: optuna.Study
    objectives: list[dict[str, str]]  # as recorded in the study: metric, direction, requested, note
    notes: list[str]


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The Pareto front for several objectives; the best trial for one (empty when nothing completed)."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    return list(study.best_trials) if len(study.directions) > 1 else [study.best_trial]


def sweep_table(outcome: SweepOutcome, top: int = 10) -> Any:
    """Rich table of the best trials: the Pareto front (multi-objective) or the top `top` (single objective)."""
    from rich.table import Table

    study = outcome.study
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if len(outcome.objectives) > 1:
        rows, title = sorted(best_trials(study), key=lambda t: t.number), "Pareto front"
    else:
        sign = 1.0 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1.0
        rows, title = sorted(complete, key=lambda t: sign * t.values[0])[:top], f"best {min(top, len(complete))}"
    counts = ", ".join(
        f"{sum(t.state == s for t in trials)} {s.name.lower()}"
        for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING)
        if any(t.state == s for t in trials)
    )
    table = Table(title=f"tokzoo sweep: {outcome.name} - {title} ({counts})", header_style="bold")
    names = sorted({k for t in rows for k in t.params})
    table.add_column("trial", style="cyan", justify="right")
    for name in names:
        table.add_column(name.rsplit(".", 1)[-1], justify="right")
    for o in outcome.objectives:
        arrow = "^" if o["direction"] == "maximize" else "v"
        table.add_column(f"{o['metric']} {arrow}", justify="right", style="bold")
    table.add_column("time (s)", justify="right")
    table.add_column("MLflow run")
    for t in rows:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else 0.0
        table.add_row(
            str(t.number),
            *[str(t.params.get(n, "-")) for n in names],
            *[f"{v:.4g}" for v in t.values],
            f"{seconds:.0f}",
            str(t.user_attrs.get("mlflow_run_id", "-")),
        )
    notes = [f"{o['requested']} -> {o['metric']}: {o['note']}" for o in outcome.objectives if o["note"]]
    table.caption = "; ".join(notes + [n for n in outcome.notes if n.startswith("pruning")]) or None
    return table
