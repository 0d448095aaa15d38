"""The sweep figure: Pareto front and objectives vs parameters, read back from MLflow as `tokzoo sweep` logs them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tokzoo.analysis.study import load_study_points, pareto_front, plot_study


def test_pareto_front_respects_directions():
    values = np.array([[0.9, 20.0], [0.5, 25.0], [0.4, 19.0], [0.9, 18.0]])
    # maximize both: row 2 is dominated by rows 0 and 1; row 3 by row 0
    assert pareto_front(values, ["maximize", "maximize"]).tolist() == [True, True, False, False]
    # minimize the second: row 3 (0.9, 18) has the best accuracy and the lowest value, so it dominates all others
    assert pareto_front(values, ["maximize", "minimize"]).tolist() == [False, False, False, True]


@pytest.fixture
def study_experiment(tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("study_exp", artifact_location=str(tmp_path / "artifacts"))
    objectives = [
        {"metric": "val/zeroshot_acc", "direction": "maximize"},
        {"metric": "val/psnr", "direction": "maximize"},
    ]
    client.create_run(
        exp, run_name="study:s", tags={"tokzoo.role": "study", "tokzoo.objectives": json.dumps(objectives)}
    )
    trials = [(0, "1", "0.10", "20"), (1, "2", "0.30", "18"), (2, "4", "0.05", "17"), (3, "8", "0.2", "21")]
    for number, n, acc, psnr in trials:
        client.create_run(exp, run_name=f"trial-{number:04d}", tags={
            "tokzoo.trial": str(number), "optuna.state": "COMPLETE", "optuna.param.model.quantizer.num_codebooks": n,
            "optuna.objective.val/zeroshot_acc": acc, "optuna.objective.val/psnr": psnr,
        })  # fmt: skip
    client.create_run(exp, run_name="trial-0004", tags={"tokzoo.trial": "4", "optuna.state": "FAIL"})
    return client, exp


def test_study_points_and_figure(study_experiment):
    client, exp = study_experiment
    objectives, points = load_study_points(client, exp)
    assert [o["metric"] for o in objectives] == ["val/zeroshot_acc", "val/psnr"]
    assert [p.number for p in points] == [0, 1, 2, 3]  # the failed trial is left out
    assert points[1].values == [0.30, 18.0] and points[1].params == {"model.quantizer.num_codebooks": "2"}
    front = pareto_front(np.array([p.values for p in points]), ["maximize", "maximize"])
    assert front.tolist() == [False, True, False, True]
    fig = plot_study(objectives, points, title="s")
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 1 + 2  # objectives panel + each objective vs the one parameter
    assert "Pareto" in visible[0].get_legend().get_texts()[1].get_text()
    # the front's labels, in x order, sit on alternate sides of their points (close neighbours never share a side)
    labels = sorted(visible[0].texts, key=lambda t: t.xy[0])
    assert [t.get_text() for t in labels] == ["#1", "#3"] or [t.get_text() for t in labels] == ["#3", "#1"]
    assert [t.get_position()[1] > 0 for t in labels] == [True, False]


def test_experiment_without_study_has_no_study_points(tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("plain", artifact_location=str(tmp_path / "artifacts"))
    client.create_run(exp, run_name="mcq", tags={"tokzoo.variant": "mcq"})
    assert load_study_points(client, exp) is None
