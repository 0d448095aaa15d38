"""Shared fixtures: an isolated dataset cache, tiny configs written to tmp dirs, and a runner for the real
`tokzoo` command in a subprocess (MLflow in a SQLite file of the test's own tmp dir)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

# Small enough that a variant trains, validates and checkpoints in a few seconds on 2 CPU cores.
TINY_BASE: dict[str, Any] = {
    "data": {"batch_size": 8, "kwargs": {"num_train": 64, "num_val": 32}},
    # log_every_n_steps=1: Lightning only logs train/* every n steps, and a 3-step run would log none
    "trainer": {"max_steps": 3, "log_every_n_steps": 1},
    "eval": {"grid_images": 4},
}


# The real CLI on 2 gloo ranks (CPU), in a subprocess; modules of such tests set `pytestmark = DDP_MARKS`.
DDP_OVERRIDES = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]


def _gloo_available() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


DDP_MARKS = [
    pytest.mark.ddp,
    pytest.mark.slow,
    pytest.mark.skipif(not _gloo_available(), reason="torch.distributed with gloo is unavailable"),
]


def tokzoo_command() -> list[str]:
    """The installed console script when the venv has one, else the module (same entry point)."""
    script = Path(sys.executable).with_name("tokzoo")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "tokzoo.cli"]


def sqlite_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tiny_ablation(folder: Path, variants: dict[str, dict] | None = None, name: str = "tiny") -> Path:
    """A 2-variant ablation (mcq vs rq at the same latent width) on the tiny base; outputs under `folder`."""
    variants = variants or {
        "mcq": {"model": {"quantizer": {"name": "mcq", "dim": 32, "num_codebooks": 4, "codebook_size": 64}}},
        "rq": {"model": {"quantizer": {"name": "rq", "dim": 32, "depth": 2, "codebook_size": 64}}},
    }
    base = {**TINY_BASE, "output_dir": str(folder / "outputs")}
    return write_yaml(folder / f"{name}.yaml", {"name": name, "base": base, "variants": variants})


def run_tokzoo(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run `tokzoo ARGS` in cwd. MLflow goes to cwd/mlflow.db unless env says otherwise."""
    full_env = {**os.environ, "MLFLOW_TRACKING_URI": sqlite_uri(cwd), "PYTHONUNBUFFERED": "1"}
    full_env.update(env or {})
    return subprocess.run(
        tokzoo_command() + list(args), cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session", autouse=True)
def tokzoo_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One shapes cache for the whole session (subprocesses inherit it); never the user's ~/.cache/tokzoo."""
    cache = tmp_path_factory.mktemp("tokzoo_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKZOO_CACHE", str(cache))
        yield cache


@pytest.fixture
def tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = sqlite_uri(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def yaml_file(tmp_path: Path) -> Callable[[str, dict], Path]:
    """yaml_file("name.yaml", data) -> path of that YAML in tmp_path."""
    return lambda name, data: write_yaml(tmp_path / name, data)


@pytest.fixture
def tiny_ablation_file(tmp_path: Path) -> Path:
    return tiny_ablation(tmp_path)


def run_two_rank_script(script: str | Path, out_dir: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python SCRIPT OUT_DIR PORT` (a test file that spawns 2 gloo ranks itself) on a free loopback port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(
        [sys.executable, str(script), str(out_dir), str(port)], env=env, capture_output=True, text=True, timeout=timeout
    )
