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
    gpus: list[int]
    started: float


def _pdeathsig() -> None:
    """In the trial process: die with the sweep process (Linux), so a killed sweep leaves no orphan trainers."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def gpu_ids() -> list[int]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [int(x) for x in visible.split(",") if x.strip().isdigit()]
    try:
        import torch

        return list(range(torch.cuda.device_count()))
    except Exception:
        return []


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


def trial_env(config: dict[str, Any], free_gpus: list[int] | None, workers: int) -> tuple[dict[str, str], list[int]]:
    """The trial's environment and the GPUs it takes (the first trainer.devices free ones; none on CPU, where it
    gets cores / (workers * devices) threads instead)."""
    env = dict(os.environ)
    k = trial_devices(config)
    gpus: list[int] = []
    if uses_gpus(config) and free_gpus:
        gpus = free_gpus[:k]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
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
        stdin=subprocess.DEVNULL, env=env, start_new_session=True, preexec_fn=_pdeathsig,
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
