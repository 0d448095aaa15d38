"""DDP on CPU (2 gloo ranks), always in a subprocess: the real `tokzoo fit` (one MLflow run, not one per rank;
a sane checkpoint), and tests/ddp_fit_worker.py (the LightningModule under Lightning DDP: both ranks end with the
same codebooks and weights although they trained on different data)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import DDP_MARKS, DDP_OVERRIDES, TINY_BASE, run_tokzoo, sqlite_uri, tiny_ablation, write_yaml

pytestmark = DDP_MARKS

WORKER = Path(__file__).with_name("ddp_fit_worker.py")
WORKER_STEPS = 4
# EMA codebooks with k-means init and dead-code restarts every step: every codebook change is data-dependent,
# so any update computed from one rank's batch alone shows up as a difference between the ranks.
WORKER_VARIANTS = {
    "mcq_ema": {
        "model": {
            "quantizer": {
                "name": "mcq",
                "dim": 32,
                "num_codebooks": 4,
                "codebook_size": 64,
                "update": "ema",
                "kmeans_init": True,
                "restart_dead_after": 1,
            }
        }
    },
    "rq_grad": {
        "model": {
            "quantizer": {
                "name": "rq",
                "dim": 32,
                "depth": 2,
                "codebook_size": 64,
                "update": "grad",
                "restart_dead_after": 1,
            }
        }
    },
}


# ---------------------------------------------------------------- the real CLI
# a few steps of the generation probe, small: it runs once, on rank 0, after training
PROBE_OVERRIDES = [
    "eval.generation.steps=3", "eval.generation.samples=10", "eval.generation.train_images=48",
    "eval.generation.width=32", "eval.generation.heads=2", "eval.generation.grid_per_class=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def cli_ddp(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    import mlflow

    folder = tmp_path_factory.mktemp("ddp_cli")
    path = tiny_ablation(folder, {"mcq": WORKER_VARIANTS["mcq_ema"]}, name="ddp_cli")
    proc = run_tokzoo(["fit", str(path), *DDP_OVERRIDES, *PROBE_OVERRIDES], cwd=folder, timeout=420)
    assert proc.returncode == 0, (
        f"DDP tokzoo fit failed (rc={proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    )
    client = mlflow.MlflowClient(sqlite_uri(folder))
    experiment = client.get_experiment_by_name("ddp_cli")
    return SimpleNamespace(
        proc=proc,
        folder=folder,
        runs=client.search_runs([experiment.experiment_id]) if experiment else [],
        experiments=[e.name for e in client.search_experiments()],
    )


def test_cli_ddp_prints_one_summary(cli_ddp):
    assert "Traceback" not in cli_ddp.proc.stderr
    assert cli_ddp.proc.stdout.count("tokzoo fit: ddp_cli") == 1  # rank 1 shares stdout and must stay quiet


def test_cli_ddp_makes_exactly_one_run(cli_ddp):
    assert len(cli_ddp.runs) == 1, [(r.info.run_name, r.info.status) for r in cli_ddp.runs]
    assert [e for e in cli_ddp.experiments if e != "Default"] == ["ddp_cli"]
    run = cli_ddp.runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["tokzoo.variant"] == "mcq"
    assert run.data.params["trainer.devices"] == "2" and run.data.params["trainer.strategy"] == "ddp"
    for metric in ("val/psnr", "val/ssim", "val/codebook_usage", "val/linprobe_acc", "val/zeroshot_acc", "train/loss"):
        assert metric in run.data.metrics, sorted(run.data.metrics)


def test_cli_ddp_logs_one_generation_probe_result(cli_ddp):
    import mlflow

    client = mlflow.MlflowClient(sqlite_uri(cli_ddp.folder))
    (run,) = cli_ddp.runs
    history = client.get_metric_history(run.info.run_id, "val/gen_bits_per_image")
    assert len(history) == 1  # rank 0 alone runs the probe
    assert history[0].value > 0  # 3 prior steps: below the uniform bound is not yet guaranteed


def test_cli_ddp_checkpoint_is_sane(cli_ddp):
    folder = cli_ddp.folder / "outputs" / "ddp_cli" / "mcq" / "checkpoints"
    files = sorted(folder.glob("*.ckpt"), key=lambda f: f.stat().st_mtime)
    assert files, f"no checkpoint in {folder}"  # written by rank 0 only, into the shared folder
    ckpt = torch.load(files[-1], map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == TINY_BASE["trainer"]["max_steps"]
    quantizer = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("model.quantizer.")}
    assert quantizer, "no quantizer state in the checkpoint"
    for key, tensor in quantizer.items():
        if tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), key


# ---------------------------------------------------------------- cross-rank equality (Lightning DDP, no MLflow)


@pytest.fixture(scope="module")
def rank_states(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, dict]]:
    folder = tmp_path_factory.mktemp("ddp_worker")
    base = {
        **TINY_BASE,
        "output_dir": str(folder / "outputs"),
        "trainer": {**TINY_BASE["trainer"], "max_steps": WORKER_STEPS},
    }
    config = write_yaml(folder / "worker.yaml", {"name": "worker", "base": base, "variants": WORKER_VARIANTS})
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(config), str(folder), *DDP_OVERRIDES],
        capture_output=True,
        text=True,
        timeout=420,
        cwd=folder,
    )
    assert proc.returncode == 0, f"DDP worker failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    load = lambda name, r: torch.load(folder / f"{name}_rank{r}.pt", map_location="cpu", weights_only=False)
    return {name: (load(name, 0), load(name, 1)) for name in WORKER_VARIANTS}


@pytest.mark.parametrize("name", list(WORKER_VARIANTS))
def test_ranks_trained_together_on_different_data(rank_states, name):
    r0, r1 = rank_states[name]
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["global_step"] == r1["global_step"] == WORKER_STEPS
    assert r0["first_batch"] and r1["first_batch"]
    assert r0["first_batch"] != r1["first_batch"], "both ranks saw the same batch: the comparison proves nothing"


@pytest.mark.parametrize("name", list(WORKER_VARIANTS))
def test_ranks_hold_identical_codebooks(rank_states, name):
    r0, r1 = rank_states[name]
    keys = r0["quantizer_keys"]
    assert keys and keys == r1["quantizer_keys"]
    differ = [k for k in keys if not torch.equal(r0["model"][k], r1["model"][k])]
    assert not differ, f"quantizer state differs between ranks: {differ}"


@pytest.mark.parametrize("name", list(WORKER_VARIANTS))
def test_ranks_hold_identical_weights(rank_states, name):
    r0, r1 = rank_states[name]
    assert r0["model"].keys() == r1["model"].keys()
    differ = [k for k in r0["model"] if not torch.equal(r0["model"][k], r1["model"][k])]
    assert not differ, f"tokenizer state differs between ranks: {differ}"
