"""The warm trial launcher (tokzoo/sweep/warm.py): which trials start as forks, and that a forked trial keeps a
fresh process's isolation: a crash or a kill ends that trial only, and a killed sweep takes its trials with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import sqlite_uri, tokzoo_command
from optuna.trial import TrialState
from test_sweep import open_study, sweep_file

from tokzoo.sweep.warm import WarmLauncher, starts_warm


@pytest.mark.parametrize(
    "trainer, gpus, warm",
    [
        ({"accelerator": "cpu", "devices": 1}, [], True),
        ({"accelerator": "auto", "devices": 1}, [], True),  # auto without a free GPU: a CPU trial
        ({"accelerator": "gpu", "devices": 1}, ["0"], False),  # CUDA must not be initialised before a fork
        ({"accelerator": "cpu", "devices": 2, "strategy": "ddp"}, [], False),  # Lightning re-executes per rank
        ({"accelerator": "cpu", "devices": 1, "num_nodes": 2}, [], False),
    ],
)
def test_only_single_process_cpu_trials_start_warm(trainer: dict, gpus: list[str], warm: bool) -> None:
    assert starts_warm({"trainer": trainer}, gpus) is warm


def test_a_crashing_forked_trial_ends_alone_with_its_traceback_in_its_log(tmp_path: Path) -> None:
    launcher = WarmLauncher()
    folders = [tmp_path / f"trial-{i}" for i in range(2)]
    handles = []
    for folder in folders:
        folder.mkdir()  # no trial.json: the trial's main raises
        handles.append(launcher.launch(folder, {**os.environ, "TOKZOO_MARK": folder.name}, threads=1))
    assert [h.wait(timeout=120) for h in handles] == [1, 1]
    assert handles[0].pid != handles[1].pid != os.getpid()
    for folder in folders:
        assert (
            "FileNotFoundError" in (folder / "log.txt").read_text() and "trial.json" in (folder / "log.txt").read_text()
        )
    again = launcher.launch(folders[0], dict(os.environ), threads=1)  # the server outlives its children's crashes
    assert again.wait(timeout=120) == 1 and again.poll() == 1


def _wait_for_audit(root: Path, want_steps: int, proc: subprocess.Popen, log: Path) -> dict:
    """The rank0.json of the running trial whose config trains want_steps steps."""
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        for audit in root.glob("*/rank0.json"):
            config = yaml.safe_load((audit.parent / "config.yaml").read_text())
            if config["trainer"]["max_steps"] == want_steps and not (audit.parent / "result.json").exists():
                return {**json.loads(audit.read_text()), "folder": str(audit.parent)}
        time.sleep(0.3)
    pytest.fail(f"no running {want_steps}-step trial: {log.read_text()[-2000:]}")


def _gone(pid: int, within: float) -> bool:
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def _start_sweep(tmp_path: Path, name: str, choices: list[int]) -> tuple[subprocess.Popen, Path]:
    space = {"trainer.max_steps": {"type": "categorical", "choices": choices}}
    path = sweep_file(tmp_path, name=name, space=space)
    env = {**os.environ, "MLFLOW_TRACKING_URI": sqlite_uri(tmp_path), "PYTHONUNBUFFERED": "1"}
    log = tmp_path / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*tokzoo_command(), "sweep", str(path)], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    return proc, log


@pytest.mark.slow
def test_a_killed_forked_trial_fails_alone_and_the_study_goes_on(tmp_path: Path) -> None:
    proc, log = _start_sweep(tmp_path, "killone", [2, 5000])
    try:
        audit = _wait_for_audit(tmp_path / "outputs" / "killone" / "trials", 5000, proc, log)
        assert audit["forked"]
        os.kill(audit["pid"], signal.SIGKILL)
        assert proc.wait(timeout=240) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    trials = {
        t.params["trainer.max_steps"]: t for t in open_study(str(tmp_path / "killone.journal"), "killone").get_trials()
    }
    assert trials[5000].state == TrialState.FAIL
    assert trials[5000].user_attrs["fail_reason"] == "killed by signal SIGKILL"
    assert trials[2].state == TrialState.COMPLETE and trials[2].values[0] > 0


@pytest.mark.slow
def test_a_killed_sweep_takes_its_forked_trial_with_it(tmp_path: Path) -> None:
    proc, log = _start_sweep(tmp_path, "killall", [5000])
    try:
        audit = _wait_for_audit(tmp_path / "outputs" / "killall" / "trials", 5000, proc, log)
        assert audit["forked"]
        proc.kill()  # SIGKILL: the forkserver sees its pipe close and exits, the trial gets its parent-death signal
        proc.wait()
        assert _gone(audit["pid"], within=30), "the trial outlived its sweep"
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            os.kill(audit["pid"], signal.SIGKILL)
        except (ProcessLookupError, NameError, UnboundLocalError):
            pass
