"""A sweep's figure: the objectives against each other (Pareto front marked) and against each searched parameter.

Reads what `tokzoo sweep` writes to MLflow: the study's parent run (tag tokzoo.role=study, tag tokzoo.objectives =
JSON [{metric, direction}]) and one child run per trial (tags optuna.state, optuna.param.<name>,
optuna.objective.<metric>).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure


@dataclass
class TrialPoint:
    number: int
    params: dict[str, str]
    values: list[float]


def load_study_points(client, experiment_id: str) -> tuple[list[dict], list[TrialPoint]] | None:
    """(objectives, completed trials) of the study logged in this experiment, or None if it holds no study."""
    runs = client.search_runs([experiment_id], max_results=5000)
    parents = [r for r in runs if r.data.tags.get("tokzoo.role") == "study" and "tokzoo.objectives" in r.data.tags]
    if not parents:
        return None
    objectives = json.loads(parents[0].data.tags["tokzoo.objectives"])
    points = []
    for run in runs:
        tags = run.data.tags
        if tags.get("optuna.state") != "COMPLETE" or "tokzoo.trial" not in tags:
            continue
        try:
            values = [float(tags[f"optuna.objective.{o['metric']}"]) for o in objectives]
        except (KeyError, ValueError):
            continue
        params = {k[len("optuna.param.") :]: v for k, v in tags.items() if k.startswith("optuna.param.")}
        points.append(TrialPoint(int(tags["tokzoo.trial"]), params, values))
    return objectives, sorted(points, key=lambda p: p.number)


def pareto_front(values: np.ndarray, directions: list[str]) -> np.ndarray:
    """Boolean mask of the non-dominated rows of values (n, k) under the given directions."""
    signed = values * np.array([1.0 if d == "minimize" else -1.0 for d in directions])  # smaller is better
    keep = np.ones(len(signed), dtype=bool)
    for i in range(len(signed)):
        others = np.delete(signed, i, axis=0)
        dominated = np.any(np.all(others <= signed[i], axis=1) & np.any(others < signed[i], axis=1))
        keep[i] = not dominated
    return keep


def _as_number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def plot_study(objectives: list[dict], points: list[TrialPoint], title: str) -> Figure:
    names = sorted({k for p in points for k in p.params})[:4]
    values = np.array([p.values for p in points])
    directions = [o["direction"] for o in objectives]
    front = pareto_front(values, directions)
    panels = (1 if len(objectives) >= 2 else 0) + len(names) * len(objectives)
    cols = min(3, max(1, panels))
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows), layout="constrained")
    axes = iter(fig.subplots(rows, cols, squeeze=False).ravel())
    if len(objectives) >= 2:
        ax = next(axes)
        ax.scatter(values[~front, 0], values[~front, 1], color="0.6", label="dominated")
        order = np.argsort(values[front, 0])
        ax.plot(values[front, 0][order], values[front, 1][order], "o-", color="C3", label="Pareto front")
        # neighbours along the front get their labels on alternate sides, so that close points' labels do not overlap
        on_front = sorted((v[0], v[1], p.number) for p, v, on in zip(points, values, front) if on)
        for k, (x0, y0, number) in enumerate(on_front):
            above = k % 2 == 0
            ax.annotate(
                f"#{number}", (x0, y0), textcoords="offset points", xytext=(4, 4) if above else (-4, -10),
                ha="left" if above else "right", fontsize=8,
            )  # fmt: skip
        ax.set_xlabel(f"{objectives[0]['metric']} ({directions[0]})")
        ax.set_ylabel(f"{objectives[1]['metric']} ({directions[1]})")
        ax.set_title("objectives (completed trials)")
        ax.legend(fontsize=8)
    for name in names:
        raw = [p.params.get(name, "") for p in points]
        numbers = [_as_number(r) for r in raw]
        numeric = all(n is not None for n in numbers)
        if numeric:
            x = np.array(numbers, dtype=float)
            ticks = None
        else:
            labels = sorted(set(raw))
            x = np.array([labels.index(r) for r in raw], dtype=float)
            ticks = labels
        for j, objective in enumerate(objectives):
            ax = next(axes)
            ax.scatter(x[~front], values[~front, j], color="0.6")
            ax.scatter(x[front], values[front, j], color="C3")
            if numeric and x.min() > 0 and x.max() / x.min() >= 16:
                ax.set_xscale("log", base=2)
            if ticks is not None:
                ax.set_xticks(range(len(ticks)), ticks, rotation=30, ha="right", fontsize=8)
            ax.set_xlabel(name)
            ax.set_ylabel(objective["metric"])
            ax.set_title(f"{objective['metric']} vs {name.split('.')[-1]}")
    for ax in axes:
        ax.set_visible(False)
    fig.suptitle(
        f"{title} ({len(points)} completed trials; red: Pareto front)"
        if len(objectives) >= 2
        else f"{title} ({len(points)} completed trials; red: best)"
    )
    return fig
