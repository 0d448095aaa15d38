"""Starting a trial process from the sweep's side: its folder, its devices and environment, the command, and
reading back what it left (result.json, the tail of its log)."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml

RESULT_FILE = "result.json"
GPU_ACCELERATORS = ("gpu", "cuda", "auto")


@dataclass
class Running:
    trial: optuna.Trial
    params: dict[str, Any]
    folder: Path
    proc: subprocess.Popen
    gpus: list[str]  # CUDA_VISIBLE_DEVICES entries, as given (indices, GPU-<uuid>, MIG-<uuid>)
    started: float


PARENT_VAR = "TOKZOO_SWEEP_PID"  # set for the trial process only: the sweep process it must not outlive


def die_with_the_sweep() -> None:
    """In the trial process, first thing: die with the sweep process (Linux), so that a killed sweep leaves no
    orphan trainers. Done here, not in a preexec_fn: forking a process that runs threads (the heartbeat, gRPC's
    poller) and then running Python code before exec can deadlock or abort the child."""
    parent = os.environ.pop(PARENT_VAR, None)  # popped: DDP ranks started by this process have their own parent
    if parent is None:
        return
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != int(parent):  # the sweep died before the line above
        os._exit(1)


def gpu_ids() -> list[str]:
    """The GPUs this sweep may hand out, as CUDA_VISIBLE_DEVICES entries: that variable's entries when it is set
    (indices, GPU-<uuid> or MIG-<uuid> / MIG-GPU-<uuid>/<gi>/<ci>, kept as given), else every device's index."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return visible_entries(visible)
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def visible_entries(visible: str) -> list[str]:
    """The entries CUDA itself uses: it reads up to the first one that is neither an index nor a GPU-/MIG- id
    (so "-1", a common "no GPU", gives none, and "0,-1,1" gives only 0)."""
    out = []
    for entry in visible.split(","):
        entry = entry.strip()
        if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
            break
        out.append(entry)
    return out


def trial_devices(config: dict[str, Any]) -> int:
    devices = config["trainer"].get("devices", 1)
    if isinstance(devices, int):
        return max(devices, 1)
    if isinstance(devices, (list, tuple)):
        return len(devices)
    return 1


def uses_gpus(config: dict[str, Any]) -> bool:
    return config["trainer"].get("accelerator") in GPU_ACCELERATORS


def write_trial_folder(folder: Path, config: dict[str, Any], meta: dict[str, Any]) -> None:
    """config.yaml (the resolved run config every rank reads) and trial.json (what the trial process needs)."""
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (folder / "trial.json").write_text(json.dumps(meta, indent=1, default=str))
    (folder / RESULT_FILE).unlink(missing_ok=True)


# What a launcher (srun, torchrun, mpirun, Lightning's DDP) tells the processes it starts about their place in a
# job. A trial is a job of its own, launched by Lightning from this process; inherited, these would make it join
# the sweep process's job (a rank other than 0 on a second node writes no result; MASTER_PORT makes two parallel
# DDP trials share one port).
LAUNCHER_VARS = (
    "RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "NODE_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE",
    "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE",
)  # fmt: skip
LAUNCHER_PREFIXES = ("SLURM_", "LSB_", "JSM_NAMESPACE_", "OMPI_COMM_WORLD_", "PMI_", "PMIX_")
KEPT_VARS = ("SLURM_JOB_ID", "SLURM_TMPDIR")  # which job (for the trial's log) and the node's scratch disk


def _launcher_var(name: str) -> bool:
    return name not in KEPT_VARS and (name in LAUNCHER_VARS or name.startswith(LAUNCHER_PREFIXES))


def trial_env(config: dict[str, Any], free_gpus: list[str] | None, workers: int) -> tuple[dict[str, str], list[str]]:
    """The trial's environment and the GPUs it takes (the first trainer.devices free entries, passed on exactly as
    given; none on CPU, where it gets cores / (workers * devices) threads instead)."""
    env = {k: v for k, v in os.environ.items() if not _launcher_var(k)}
    k = trial_devices(config)
    gpus: list[str] = []
    if uses_gpus(config) and free_gpus:
        gpus = list(free_gpus[:k])
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
        threads = max(1, (os.cpu_count() or 1) // (workers * k))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env, gpus


def launch(folder: Path, env: dict[str, str]) -> subprocess.Popen:
    """`python -m tokzoo.sweep run-trial DIR` in its own session, output to DIR/log.txt."""
    log = open(folder / "log.txt", "ab")  # noqa: SIM115 - closed by the child's exit (inherited fd)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokzoo.sweep", "run-trial", str(folder)], stdout=log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, env={**env, PARENT_VAR: str(os.getpid())}, start_new_session=True,
    )  # fmt: skip
    log.close()
    return proc


def read_result(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return {}


def log_tail(folder: Path, lines: int = 3) -> str:
    try:
        text = (folder / "log.txt").read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(line.strip() for line in text[-lines:])[:1000]
