"""Budgets (`budgets: [...]` in an ablation, or `budgets=[...]` on the command line): every variant and seed at each
budget; a longer budget continues the shorter one's checkpoint when nothing is scheduled over the budget, and then
ends exactly where an unbroken run of that length does; otherwise it trains from step 0 and says why."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from conftest import run_tokzoo, sqlite_uri, tiny_ablation

from tokzoo.config import load_variants

pytestmark = pytest.mark.slow

MCQ = {"mcq": {"model": {"quantizer": {"name": "mcq", "dim": 32, "num_codebooks": 4, "codebook_size": 64,
                                        "restart_dead_after": 4}}}}  # fmt: skip
CONSTANT_LR = ["optim.min_lr_ratio=1.0", "optim.warmup_steps=2", "eval.linear_probe=false"]


def _runs(folder: Path, experiment: str) -> dict[str, object]:
    client = mlflow.MlflowClient(sqlite_uri(folder))
    exp = client.get_experiment_by_name(experiment)
    return {r.data.tags["tokzoo.variant"]: r for r in client.search_runs([exp.experiment_id])}


def _weights(folder: Path, experiment: str, variant: str) -> dict[str, torch.Tensor]:
    (path,) = (folder / "outputs" / experiment / variant / "checkpoints").glob("last-*.ckpt")
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_a_longer_budget_continues_the_shorter_run_exactly(tmp_path):
    path = tiny_ablation(tmp_path, MCQ, name="budgets")
    # 8 batches per epoch: the 11-step budget continues from step 5 across an epoch boundary, with dead-code
    # restarts (torch's RNG) at steps 4 and 8
    proc = run_tokzoo(["fit", str(path), "budgets=[5,11]", "seeds=[0]", *CONSTANT_LR], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dirpath has changed" not in proc.stderr  # Lightning's best-model bookkeeping, which tokzoo does not use
    fresh = run_tokzoo(
        ["fit", str(path), "trainer.max_steps=11", "tracking.experiment=fresh", *CONSTANT_LR], cwd=tmp_path
    )
    assert fresh.returncode == 0, fresh.stderr[-3000:]

    runs = _runs(tmp_path, "budgets")
    assert sorted(runs) == ["mcq/steps11", "mcq/steps5"]
    longer = runs["mcq/steps11"]
    assert longer.data.tags["tokzoo.continued_from"] == "mcq/steps5" and longer.data.tags["tokzoo.budget"] == "11"
    assert (
        longer.data.params["trainer.max_steps"] == "11" and runs["mcq/steps5"].data.params["trainer.max_steps"] == "5"
    )
    continued, unbroken = _weights(tmp_path, "budgets", "mcq_steps11"), _weights(tmp_path, "fresh", "mcq")
    assert continued.keys() == unbroken.keys()
    for key in continued:
        assert torch.equal(continued[key], unbroken[key]), key
    reference = _runs(tmp_path, "fresh")["mcq"].data.metrics
    assert longer.data.metrics["val/psnr"] == reference["val/psnr"]
    client = mlflow.MlflowClient(sqlite_uri(tmp_path))
    steps = [m.step for m in client.get_metric_history(longer.info.run_id, "train/loss")]
    assert min(steps) == 5 and max(steps) == 10  # the run holds the steps it trained, after the shorter one's


def test_cosine_budgets_train_from_step_zero_and_say_why(tmp_path):
    path = tiny_ablation(tmp_path, MCQ, name="cosine")
    proc = run_tokzoo(["fit", str(path), "budgets=[2,3]", "seeds=[0,1]", "eval.linear_probe=false"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count("budgets train from step 0") == 1  # told once
    runs = _runs(tmp_path, "cosine")
    assert sorted(runs) == ["mcq/steps2/seed0", "mcq/steps2/seed1", "mcq/steps3/seed0", "mcq/steps3/seed1"]
    for name in ("mcq/steps3/seed0", "mcq/steps3/seed1"):
        run = runs[name]
        assert "tokzoo.continued_from" not in run.data.tags
        assert "optim.min_lr_ratio=1.0" in run.data.tags["tokzoo.budget_restart"]
        client = mlflow.MlflowClient(sqlite_uri(tmp_path))
        assert min(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == 0
    assert {runs[n].data.params["seed"] for n in runs} == {"0", "1"}


def test_ablation_lists_on_the_command_line_are_checked(tmp_path):
    path = tiny_ablation(tmp_path)
    _, variants = load_variants(path, ["seeds=[3]", "variants=[rq]", "budgets=[4]"])
    assert [(v.name, v.seed, v.config["trainer"]["max_steps"]) for v in variants] == [("rq/steps4", 3, 4)]
    for bad, message in (
        ("budgets=[0]", "'budgets'"),
        ("seeds=x", "'seeds'"),
        ("variants=[nope]", "variants=['nope']"),
    ):
        proc = run_tokzoo(["fit", str(path), bad], cwd=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
