"""`tokzoo sweep`: sweep-file checks, conditional spaces, objective fallback, the trial side's pruning (fast), and the
real command on the embedded dataset (slow): a grid with 2 workers, a failing trial, resume after a kill,
SQLite / PostgreSQL storages and a DDP trial. Stale trials and many hosts: test_sweep_hosts.py; a trial's GPUs and
environment: test_sweep_launch.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import TINY_BASE, run_tokzoo, sqlite_uri, tokzoo_command, write_yaml
from optuna.trial import TrialState

from tokzoo.errors import ConfigError
from tokzoo.sweep import (
    budget_used,
    load_sweep,
    resolve_objectives,
    suggest,
)

PSNR = [{"metric": "val/psnr", "direction": "maximize"}]
GRID = {
    "model.quantizer.num_codebooks": {"type": "categorical", "choices": [2, 4]},
    "model.quantizer.codebook_size": {"type": "categorical", "choices": [8, 16]},
}


def sweep_file(folder: Path, name: str = "tiny", **fields: Any) -> Path:
    base = {
        **TINY_BASE,
        "output_dir": str(folder / "outputs"),
        "trainer": {"max_steps": 2, "log_every_n_steps": 1, "enable_progress_bar": False},
        "eval": {"grid_images": 0, "linear_probe": False},
        "model": {"quantizer": {"name": "mcq", "dim": 32, "num_codebooks": 4, "codebook_size": 16}},
    }
    data = {"name": name, "base": base, "space": GRID, "objectives": PSNR, "sampler": {"type": "grid", "seed": 0}}
    data.update(fields)
    return write_yaml(folder / f"{name}.yaml", data)


def open_study(storage: str, name: str) -> optuna.Study:
    if "://" not in storage:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        storage = JournalStorage(JournalFileBackend(storage))
    return optuna.load_study(study_name=name, storage=storage)


def sweep(args: list[str], cwd: Path, timeout: float = 420) -> subprocess.CompletedProcess:
    proc = run_tokzoo(["sweep", *args], cwd=cwd, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# ------------------------------------------------------------------------------------------------ fast


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"spaces": {}}, "unknown key(s) spaces"),
        ({"space": {"model.quantizer.dim": {"type": "gauss"}}}, "space key 'model.quantizer.dim'"),
        ({"space": {"model.nope": {"type": "int", "low": 1, "high": 2}}}, "unknown config key 'model.nope'"),
        ({"space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-3}}}, "grid sampler needs categorical"),
        ({"objectives": [{"metric": "val/psnr", "direction": "up"}]}, "direction 'up'"),
        ({"sampler": {"type": "cmaes"}}, "sampler.type must be one of"),
        ({"objectives": [{"metric": "val/psnx", "direction": "maximize"}]}, "unknown metric 'val/psnx'"),
        ({"objectives": [{"metric": "val/rfid", "fallback": {"metric": "psnr"}}]}, "objectives[0].fallback"),
        ({"objectives": [{"metric": "val/rfid", "direction": "maximize"}]}, "direction is 'minimize', not 'maximize'"),
        (
            {"objectives": [{"metric": "val/rfid", "fallback": {"metric": "val/psnr", "direction": "minimize"}}]},
            "metric 'val/psnr' is better higher",
        ),
        ({"objectives": [{"metric": "val/bits_per_token"}]}, "give direction: minimize or direction: maximize"),
        ({"objectives": [{"metric": "train/loss"}]}, "a trial reports only its final val/"),
        ({"heartbeat": {"interval": 0}}, "heartbeat.interval must be a positive whole number"),
        ({"heartbeat": {"interval": 2, "grace": 2.5}}, "heartbeat.grace must be a positive whole number"),
        ({"heartbeat": {"interval": 5, "grace": 6}}, "at least twice heartbeat.interval"),
        ({"heartbeat": {"every": 5}}, "heartbeat must be a mapping {interval: S, grace: S}"),
    ],
)
def test_bad_sweep_files_name_the_key(tmp_path: Path, fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        load_sweep(sweep_file(tmp_path, **fields))
    assert message in str(err.value)


def test_unknown_objective_metric_lists_the_catalogue(tmp_path: Path) -> None:
    from tokzoo.catalogue import CATALOGUE

    with pytest.raises(ConfigError) as err:
        load_sweep(sweep_file(tmp_path, objectives=[{"metric": "val/fid"}]))
    assert "unknown metric 'val/fid'" in str(err.value)
    assert all(name in str(err.value) for name in CATALOGUE)


def test_direction_comes_from_the_catalogue_when_omitted(tmp_path: Path) -> None:
    objectives = [
        {"metric": "val/rfid", "fallback": {"metric": "val/psnr"}},
        {"metric": "val/codebook_usage/1"},  # a pattern entry of the catalogue
        {"metric": "val/bits_per_token", "direction": "minimize"},  # a diagnostic: any explicit direction
    ]
    spec = load_sweep(sweep_file(tmp_path, objectives=objectives, sampler={"type": "random"}, n_trials=2))
    got = [(o.metric, o.direction) for o in spec.objectives]
    assert got == [("val/rfid", "minimize"), ("val/codebook_usage/1", "maximize"), ("val/bits_per_token", "minimize")]
    assert (spec.objectives[0].fallback.metric, spec.objectives[0].fallback.direction) == ("val/psnr", "maximize")


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweep_files_load(path: Path) -> None:
    spec = load_sweep(path)
    assert spec.objectives and spec.n_trials >= 1


def test_override_of_a_searched_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.quantizer.num_codebooks"):
        load_sweep(sweep_file(tmp_path), ["model.quantizer.num_codebooks=8"])


def test_grid_budget_is_the_grid_size(tmp_path: Path) -> None:
    assert load_sweep(sweep_file(tmp_path)).n_trials == 4
    assert load_sweep(sweep_file(tmp_path), n_trials=99).n_trials == 4  # more would only repeat grid points
    assert load_sweep(sweep_file(tmp_path), n_trials=3).n_trials == 3


def test_conditional_space_and_labelled_choices(tmp_path: Path) -> None:
    space = {
        "model.quantizer": {
            "type": "categorical",
            "choices": {"mcq4": {"name": "mcq", "num_codebooks": 4}, "rq2": {"name": "rq", "depth": 2}},
        },
        "model.quantizer.shared_codebook": {"type": "categorical", "choices": [True, False], "when": {
            "model.quantizer.name": "rq"}},
        "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    }  # fmt: skip
    spec = load_sweep(sweep_file(tmp_path, space=space, sampler={"type": "random", "seed": 1}, n_trials=5))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1), direction="maximize")
    seen = set()
    for _ in range(12):
        params = suggest(study.ask(), spec)
        quantizer = spec.trial_config(params)["model"]["quantizer"]
        seen.add(params["model.quantizer"])
        assert ("model.quantizer.shared_codebook" in params) == (params["model.quantizer"] == "rq2")
        assert quantizer["name"] == {"mcq4": "mcq", "rq2": "rq"}[params["model.quantizer"]]
        assert 1e-4 <= params["optim.lr"] <= 1e-2
    assert seen == {"mcq4", "rq2"}


def test_objective_falls_back_when_the_metric_cannot_be_computed(tmp_path: Path) -> None:
    objectives = [{"metric": "val/rfid", "direction": "minimize", "fallback": {"metric": "val/psnr"}}]
    spec = load_sweep(sweep_file(tmp_path, objectives=objectives), ["eval.rfid=false"])
    (chosen,) = resolve_objectives(spec.objectives, spec.trial_config({}))
    assert (chosen["metric"], chosen["direction"], chosen["requested"]) == ("val/psnr", "maximize", "val/rfid")
    assert "eval.rfid=false" in chosen["note"]
    spec = load_sweep(sweep_file(tmp_path, objectives=objectives), ["loss.supervision=recon"])
    assert resolve_objectives(spec.objectives, spec.trial_config({}))[0]["metric"] in ("val/rfid", "val/psnr")


def _spy(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[tuple[Any, Any]]:
    """Wrap module.name, recording (first argument, result) of each call."""
    real, calls = getattr(module, name), []

    def spy(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        calls.append((args[0], out))
        return out

    monkeypatch.setattr(module, name, spy)
    return calls


def _sweep_without_mlflow(monkeypatch: pytest.MonkeyPatch, spec: Any) -> Any:
    """The sweep process up to its first trial, with the MLflow side stubbed (these tests are about Optuna)."""
    from tokzoo import tracking
    from tokzoo.sweep import Sweep, pool

    monkeypatch.setattr(pool, "PARENT_SETTLE_S", 0.0)  # one sweep process: no other parent run to wait for
    monkeypatch.setattr(tracking, "check_tracking", lambda uri: None)
    monkeypatch.setattr(tracking, "open_parent_run", lambda *args, **kwargs: "parent")
    return Sweep(spec, 1, log=lambda line: None)


def _trial_meta(spec: Any, trial: optuna.Trial, pruner: dict[str, Any]) -> dict[str, Any]:
    return {
        "study": spec.name, "storage": spec.storage, "trial_id": trial._trial_id, "pruner": pruner,
        "objectives": [{"metric": "val/psnr", "direction": "maximize"}],
    }  # fmt: skip


def _pruned_by_the_trial_side(monkeypatch: pytest.MonkeyPatch, spec: Any) -> list[tuple[Any, Any]]:
    """Open the study as the sweep does, give it 3 finished trials, and let a 4th, much worse one be pruned through
    the trial process's hook; returns the storage openings of both sides."""
    from tokzoo.sweep import optuna_side, pruning_hook

    opened = _spy(monkeypatch, optuna_side, "open_storage")
    study = _sweep_without_mlflow(monkeypatch, spec).study
    for value in (30.0, 31.0, 32.0):
        study.add_trial(optuna.trial.create_trial(value=value, intermediate_values={1: value}))
    trial = study.ask()
    result: dict[str, Any] = {}
    pruner = {"type": "median", "n_startup_trials": 1, "n_warmup_steps": 0}
    hook = pruning_hook(_trial_meta(spec, trial, pruner), result)
    assert hook(1, {"val/ssim": 0.5}) is False  # not the objective: nothing reported
    assert hook(1, {"val/psnr": 5.0}) is True
    assert result == {"pruned": True, "pruned_step": 1}
    assert study.get_trials()[trial.number].intermediate_values == {1: 5.0}
    return opened


def test_trial_side_prunes_through_the_sweeps_storage_opener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load_sweep(sweep_file(tmp_path, sampler={"type": "random", "seed": 0}, n_trials=8))
    opened = _pruned_by_the_trial_side(monkeypatch, spec)
    assert [url for url, _ in opened] == [spec.storage, spec.storage]  # the sweep, then the trial: one opener
    assert {type(storage).__name__ for _, storage in opened} == {"JournalStorage"}


def test_redis_storage_reaches_the_trial_side_as_a_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No Redis server here: a journal file stands in for its backend. The trial side used to hand redis:// to
    # Optuna as a database URL, which failed every pruned trial.
    from optuna.storages import journal

    class FileAsRedis(journal.JournalFileBackend):
        def __init__(self, url: str) -> None:
            assert url.startswith("redis://")
            super().__init__(str(tmp_path / "redis.journal"))

    monkeypatch.setattr(journal, "JournalRedisBackend", FileAsRedis)
    spec = load_sweep(
        sweep_file(tmp_path, sampler={"type": "random", "seed": 0}, n_trials=8), storage="redis://localhost:6379/0"
    )
    opened = _pruned_by_the_trial_side(monkeypatch, spec)
    assert [url for url, _ in opened] == ["redis://localhost:6379/0"] * 2


def test_trial_builds_its_pruner_from_the_one_pruner_map(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokzoo.sweep import PRUNERS, optuna_side, trial

    assert trial.optuna_side is optuna_side and set(PRUNERS) == {"none", *optuna_side.PRUNER_CLASSES}

    class Marked(optuna.pruners.MedianPruner):
        pass

    monkeypatch.setitem(optuna_side.PRUNER_CLASSES, "median", Marked)
    built = _spy(monkeypatch, optuna_side, "make_pruner")
    monkeypatch.setattr(optuna, "load_study", lambda **kwargs: kwargs["pruner"])  # no storage needed
    monkeypatch.setattr(optuna.trial, "Trial", lambda study, trial_id: None)
    monkeypatch.setattr(optuna_side, "open_storage", lambda url, **kwargs: None)
    trial.pruning_hook({"pruner": {"type": "median"}, "storage": "x", "study": "s", "trial_id": 0,
                        "objectives": [{"metric": "val/psnr"}]}, {})  # fmt: skip
    (call,) = built
    assert call[0] == {"type": "median"} and type(call[1]) is Marked


def test_run_trial_reports_the_modules_absent_decisions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """result.json's `absent` comes from fit_variant's VariantResult, not from reading the MLflow run back."""
    import tokzoo.runner as runner
    from tokzoo.sweep import run_trial

    spec = load_sweep(sweep_file(tmp_path))
    out = runner.VariantResult("trial-0000", 8.0, {"val/psnr": 20.0}, 1.5, run_id="run-1",
                               absent={"val/rfid": "eval.rfid=false"})  # fmt: skip
    monkeypatch.setattr(runner, "fit_variant", lambda *args, **kwargs: out)  # nothing trains, no MLflow
    (tmp_path / "trial").mkdir()
    (tmp_path / "trial" / "config.yaml").write_text(json.dumps(spec.trial_config({})))
    meta = {"number": 0, "params": {}, "parent_run_id": "p", "study": "tiny", "experiment": "tiny",
            "uri": "sqlite:///nowhere.db", "pruner": {"type": "none"}}  # fmt: skip
    (tmp_path / "trial" / "trial.json").write_text(json.dumps(meta))
    assert run_trial(tmp_path / "trial") == 0
    result = json.loads((tmp_path / "trial" / "result.json").read_text())
    assert result == {"metrics": {"val/psnr": 20.0}, "run_id": "run-1", "seconds": 1.5,
                      "absent": {"val/rfid": "eval.rfid=false"}}  # fmt: skip


def test_module_without_arguments_prints_its_usage() -> None:
    proc = subprocess.run([sys.executable, "-m", "tokzoo.sweep"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage: python -m tokzoo.sweep run-trial" in proc.stderr


# ------------------------------------------------------------------------------------ the real command


@pytest.mark.slow
def test_grid_with_two_workers_runs_exactly_the_grid(tmp_path: Path) -> None:
    path = sweep_file(tmp_path, name="grid2")
    proc = sweep([str(path), "--workers", "2"], cwd=tmp_path)
    study = open_study(str(tmp_path / "grid2.journal"), "grid2")
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    points = {(t.params["model.quantizer.num_codebooks"], t.params["model.quantizer.codebook_size"]) for t in trials}
    assert points == {(2, 8), (2, 16), (4, 8), (4, 16)}
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), "no two trials ran at once"
    assert "tokzoo sweep: grid2" in proc.stdout
    # the warm launcher: every trial a fork of the pre-imported process, each with its share of the cores
    audits = [json.loads((Path(t.user_attrs["folder"]) / "rank0.json").read_text()) for t in trials]
    assert all(a["forked"] for a in audits) and len({a["pid"] for a in audits}) == 4
    assert {a["threads"] for a in audits} == {max(1, (os.cpu_count() or 1) // 2)}
    assert proc.stdout.count("(forked from the warm process)") == 4

    from mlflow.tracking import MlflowClient

    client = MlflowClient(sqlite_uri(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("grid2").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("tokzoo.role") == "study"]
    children = {int(r.data.tags["tokzoo.trial"]): r for r in runs if r.data.tags.get("tokzoo.role") != "study"}
    assert sorted(children) == [0, 1, 2, 3]
    for t in trials:
        run = children[t.number]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id == study.user_attrs["mlflow_parent_run_id"]
        assert run.info.run_id == t.user_attrs["mlflow_run_id"]
        assert run.data.params["model.quantizer.num_codebooks"] == str(t.params["model.quantizer.num_codebooks"])
        assert run.data.metrics["val/psnr"] == pytest.approx(t.values[0])


@pytest.mark.slow
def test_failing_trial_is_recorded_and_the_study_goes_on_sqlite(tmp_path: Path) -> None:
    space = {"model.encoder.name": {"type": "categorical", "choices": ["vit_tiny", "no_such_encoder"]}}
    path = sweep_file(tmp_path, name="fails", space=space, pruner={"type": "median", "n_startup_trials": 5})
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    proc = sweep([str(path), "--storage", storage, "trainer.val_check_interval=1", "--launcher", "fresh"], cwd=tmp_path)
    trials = {t.params["model.encoder.name"]: t for t in open_study(storage, "fails").get_trials()}
    bad, good = trials["no_such_encoder"], trials["vit_tiny"]
    assert bad.state == TrialState.FAIL and "no_such_encoder" in bad.user_attrs["fail_reason"]
    assert good.state == TrialState.COMPLETE and good.values[0] > 0
    assert not json.loads((Path(good.user_attrs["folder"]) / "rank0.json").read_text())["forked"]  # --launcher fresh
    assert sorted(good.intermediate_values) == [1, 2]  # reported to the pruner after each validation
    assert "FAIL" in proc.stdout


@pytest.mark.slow
def test_resume_after_the_sweep_process_is_killed(tmp_path: Path) -> None:
    path = sweep_file(tmp_path, name="resume", sampler={"type": "random", "seed": 0}, n_trials=2)
    journal = str(tmp_path / "resume.journal")
    env = {**os.environ, "MLFLOW_TRACKING_URI": sqlite_uri(tmp_path), "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(
            [*tokzoo_command(), "sweep", str(path)], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None:
            time.sleep(1)
            if not Path(journal).exists():
                continue
            states = [t.state for t in open_study(journal, "resume").get_trials()] if _has_study(journal) else []
            if TrialState.COMPLETE in states and TrialState.RUNNING in states:
                break
        else:
            pytest.fail(f"the first trial did not complete: {(tmp_path / 'first.log').read_text()[-2000:]}")
        first.kill()  # SIGKILL: no cleanup at all; the trial process dies with it (parent-death signal)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    kept = open_study(journal, "resume").get_trials()[0]
    assert kept.state == TrialState.COMPLETE

    sweep([str(path)], cwd=tmp_path)
    trials = open_study(journal, "resume").get_trials()
    assert trials[0].values == kept.values and trials[0].datetime_complete == kept.datetime_complete
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    (stale,) = [t for t in trials if t.state == TrialState.FAIL]
    assert stale.user_attrs["fail_reason"].startswith("stale")
    (retry,) = [t for t in complete if t.system_attrs.get("failed_trial") == stale.number]
    assert retry.params == stale.params
    assert len(complete) == 2 and budget_used(trials) == 2


def _has_study(journal: str) -> bool:
    try:
        open_study(journal, "resume")
        return True
    except KeyError:
        return False


@pytest.mark.slow
def test_postgres_storage(tmp_path: Path) -> None:
    url = os.environ.get("TOKZOO_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("TOKZOO_TEST_POSTGRES_URL is not set (.ci/run starts a PostgreSQL server and sets it)")
    name = f"pg_{uuid.uuid4().hex[:8]}"
    space = {"model.quantizer.codebook_size": {"type": "categorical", "choices": [8]}}
    path = sweep_file(tmp_path, name=name, space=space)
    sweep([str(path), "--storage", url], cwd=tmp_path)
    (trial,) = open_study(url, name).get_trials()
    assert trial.state == TrialState.COMPLETE and trial.params == {"model.quantizer.codebook_size": 8}


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_trial_has_the_same_parameters_on_both_ranks(tmp_path: Path) -> None:
    space = {"model.quantizer.codebook_size": {"type": "int", "low": 8, "high": 64, "log": True}}
    path = sweep_file(tmp_path, name="ddp", space=space, sampler={"type": "random", "seed": 3}, n_trials=1)
    sweep([str(path), "trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu"], cwd=tmp_path)
    (trial,) = open_study(str(tmp_path / "ddp.journal"), "ddp").get_trials()
    assert trial.state == TrialState.COMPLETE
    folder = Path(trial.user_attrs["folder"])
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["params"] == ranks[1]["params"] == trial.params and ranks[0]["hash"] == ranks[1]["hash"]
    assert not ranks[0]["forked"] and not ranks[1]["forked"]  # a DDP trial is a fresh process, re-executed per rank
