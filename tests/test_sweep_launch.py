"""What a trial process is started with: its GPUs (CUDA_VISIBLE_DEVICES entries kept exactly as given: indices,
GPU UUIDs, MIG instances) and an environment free of the sweep process's own launcher (srun, torchrun)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tokzoo.sweep import gpu_ids, trial_env, visible_entries

UUID_A = "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6"
UUID_B = "GPU-1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901"
MIG_NEW = "MIG-4a1d6e3c-9b8f-5e2d-a7c6-0f1e2d3c4b5a"  # R470+ form
MIG_OLD = "MIG-GPU-8932f937-d72c-4106-c12f-20bd9faed9f6/1/0"  # R450 form: parent GPU / GPU instance / compute


def gpu_config(devices: int) -> dict:
    return {"trainer": {"accelerator": "gpu", "devices": devices}}


@pytest.mark.parametrize(
    "visible, entries",
    [
        (f"{UUID_A},{UUID_B}", [UUID_A, UUID_B]),
        (f"{MIG_NEW}, {MIG_OLD}", [MIG_NEW, MIG_OLD]),
        (f"1,{UUID_A},0", ["1", UUID_A, "0"]),
        ("", []),
        ("-1", []),  # the usual "no GPU": CUDA stops at the first entry it cannot read
        (f"0,-1,{UUID_A}", ["0"]),
    ],
)
def test_visible_entries_are_kept_as_cuda_reads_them(visible: str, entries: list[str]) -> None:
    assert visible_entries(visible) == entries


def test_gpu_ids_come_from_cuda_visible_devices_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{MIG_NEW},{MIG_OLD},{UUID_A}")
    assert gpu_ids() == [MIG_NEW, MIG_OLD, UUID_A]


def test_trials_are_pinned_to_uuid_and_mig_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool's bookkeeping: each trial takes the first trainer.devices free entries and hands them over as they
    were given; a finished trial gives them back."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{UUID_A},{MIG_NEW},{MIG_OLD}")
    free = gpu_ids()
    env, taken = trial_env(gpu_config(2), free, workers=2)
    assert taken == [UUID_A, MIG_NEW] and env["CUDA_VISIBLE_DEVICES"] == f"{UUID_A},{MIG_NEW}"
    free = [g for g in free if g not in taken]
    env, second = trial_env(gpu_config(1), free, workers=2)
    assert second == [MIG_OLD] and env["CUDA_VISIBLE_DEVICES"] == MIG_OLD


def test_cpu_trial_sees_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", UUID_A)
    env, taken = trial_env({"trainer": {"accelerator": "cpu", "devices": 1}}, [UUID_A], workers=2)
    assert taken == [] and env["CUDA_VISIBLE_DEVICES"] == ""


def test_trial_does_not_inherit_the_sweeps_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep started by srun or torchrun: its trial is a job of its own, so Lightning in the trial must detect
    neither SLURM nor torchelastic (it would join the sweep's job), and two DDP trials must not share MASTER_PORT."""
    launched = {
        "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "1", "SLURM_JOB_NAME": "sweep",
        "SLURM_JOB_ID": "4242", "SLURM_NTASKS_PER_NODE": "1", "RANK": "1", "LOCAL_RANK": "0", "GROUP_RANK": "1",
        "LOCAL_WORLD_SIZE": "1", "WORLD_SIZE": "2", "NODE_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500",
        "TORCHELASTIC_RUN_ID": "sweep",
    }  # fmt: skip
    for key, value in launched.items():
        monkeypatch.setenv(key, value)
    env, _ = trial_env({"trainer": {"accelerator": "cpu", "devices": 1}}, None, workers=1)
    assert not {k for k in launched if k in env} - {"SLURM_JOB_ID"}
    probe = (
        "import json; from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment;"
        "from tokzoo.distributed import env_rank;"
        "print(json.dumps([SLURMEnvironment.detect(), TorchElasticEnvironment.detect(), env_rank()]))"
    )
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [False, False, 0]
    # with the sweep's environment as it was, Lightning would take the trial for rank 1 of the sweep's job
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [True, True, 1]
