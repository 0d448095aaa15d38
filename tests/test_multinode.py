"""Past one node, for real: two torchrun "nodes" (one gloo process each, on 127.0.0.1) through `python -m tokzoo
fit`, a node whose output_dir is not the shared one, and a SLURM auto-requeue (Lightning's own handler, with a
stand-in `scontrol` on PATH) that the requeued job resumes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    DDP_MARKS,
    TINY_BASE,
    run_tokzoo,
    sqlite_uri,
    tiny_ablation,
    tokzoo_command,
    write_yaml,
)

pytestmark = DDP_MARKS

NODE_OVERRIDES = ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2", "trainer.strategy=ddp"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(folder: Path, args_per_node: list[list[str]]) -> list[subprocess.Popen]:
    """One `torchrun --nnodes N --node-rank R ... -m tokzoo fit ...` per node, started together."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": sqlite_uri(folder), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    procs = []
    for node, args in enumerate(args_per_node):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nnodes={len(args_per_node)}", "--nproc-per-node=1",
            f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "tokzoo", *args,
        ]  # fmt: skip
        out = open(folder / f"node{node}.out", "w")  # noqa: SIM115 - closed when the test reads it back
        err = open(folder / f"node{node}.err", "w")  # noqa: SIM115
        procs.append(subprocess.Popen(cmd, cwd=folder, env=env, stdout=out, stderr=err, text=True))
    return procs


def wait_nodes(folder: Path, procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str, str]]:
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("a torchrun node hung (a collective that one node never reached)")
    read = lambda node, ext: (folder / f"node{node}.{ext}").read_text()
    return [(p.returncode, read(i, "out"), read(i, "err")) for i, p in enumerate(procs)]


def test_two_torchrun_nodes_train_one_run_per_variant(tmp_path: Path) -> None:
    import mlflow

    path = tiny_ablation(tmp_path, name="nodes")
    nodes = wait_nodes(tmp_path, start_nodes(tmp_path, [["fit", str(path), *NODE_OVERRIDES]] * 2))
    for node, (rc, out, err) in enumerate(nodes):
        assert rc == 0, f"node {node} exited {rc}:\n{out[-2000:]}\n{err[-4000:]}"
    stdout = "".join(out for _, out, _ in nodes)
    assert stdout.count("tokzoo fit: nodes") == 1, stdout  # one summary table, from global rank 0 only
    client = mlflow.MlflowClient(sqlite_uri(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("nodes").experiment_id])
    assert sorted(r.data.tags["tokzoo.variant"] for r in runs) == ["mcq", "rq"]  # one run per variant, not per node
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags.get("tokzoo.complete") == "true"
        assert run.data.params["trainer.num_nodes"] == "2"
        assert "val/psnr" in run.data.metrics and run.data.metrics["perf/images_per_sec"] > 0
    for variant in ("mcq", "rq"):  # one checkpoint writer: the file is whole and from the last step
        (ckpt,) = (tmp_path / "outputs" / "nodes" / variant / "checkpoints").glob("last-*.ckpt")
        assert ckpt.stat().st_size > 0


def test_a_node_with_its_own_output_dir_stops_every_node(tmp_path: Path) -> None:
    path = tiny_ablation(tmp_path, {"mcq": {"model": {"quantizer": {"name": "vq", "dim": 16, "codebook_size": 32}}}})
    args = [["fit", str(path), *NODE_OVERRIDES, f"output_dir={tmp_path / f'local{node}'}"] for node in (0, 1)]
    nodes = wait_nodes(tmp_path, start_nodes(tmp_path, args))
    for node, (rc, out, err) in enumerate(nodes):
        # tokzoo exits 2 with one message on every rank; torchrun reports that exit code and exits 1 itself
        assert rc != 0 and "exitcode: 2" in err, f"node {node} exited {rc}:\n{out[-2000:]}\n{err[-4000:]}"
        message = next(line for line in err.splitlines() if line.startswith("error:"))
        assert "output_dir is not shared by all nodes" in message and "rank 1" in message, message
    assert not list((tmp_path / "local0").rglob("*.ckpt")), "a start-up check failure must not write a checkpoint"


# ---------------------------------------------------------------- SLURM auto-requeue

STEPS = 60
EVERY = 5  # checkpoint_every


def slurm_env(folder: Path) -> dict[str, str]:
    """What srun exports to a one-task job, and a stand-in `scontrol` that records the requeue request."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {folder / "requeued.txt"}\n')
    scontrol.chmod(0o755)
    slurm = {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "tokzoo-test", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "127.0.0.1",
    }  # fmt: skip
    return {**os.environ, **slurm, "PATH": f"{bin_dir}:{os.environ['PATH']}", "MLFLOW_TRACKING_URI": sqlite_uri(folder)}


def test_slurm_requeue_resumes_the_interrupted_variant(tmp_path: Path) -> None:
    import mlflow

    base = {**TINY_BASE, "output_dir": str(tmp_path / "outputs"), "checkpoint_every": EVERY}
    base["trainer"] = {**TINY_BASE["trainer"], "max_steps": STEPS}
    path = write_yaml(tmp_path / "requeue.yaml", {"name": "requeue", "base": base, "variants": {"only": {}}})
    env = slurm_env(tmp_path)
    variant_dir = tmp_path / "outputs" / "requeue" / "only"
    job = subprocess.Popen([*tokzoo_command(), "fit", str(path)], cwd=tmp_path, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(variant_dir.glob("checkpoints/last-*.ckpt")):  # training is under way
        assert job.poll() is None and time.monotonic() < deadline, job.stdout.read() if job.poll() else "timeout"
        time.sleep(0.2)
    job.send_signal(signal.SIGUSR1)  # what SLURM sends before the time limit (sbatch --signal=USR1@90)
    while not list(variant_dir.glob("hpc_ckpt_*.ckpt")) or not (tmp_path / "requeued.txt").exists():
        assert job.poll() is None and time.monotonic() < deadline, job.stdout.read() if job.poll() else "timeout"
        time.sleep(0.1)
    time.sleep(0.5)  # the checkpoint file is complete once scontrol ran (it is called after the save)
    job.kill()  # SLURM ends the job to requeue it; nothing after the signal handler runs
    job.wait()
    assert (tmp_path / "requeued.txt").read_text().split() == ["requeue", "4242"]

    client = mlflow.MlflowClient(sqlite_uri(tmp_path))
    (interrupted,) = client.search_runs([client.get_experiment_by_name("requeue").experiment_id])
    # Lightning's handler would end the run FINISHED (from inside a signal handler: with SQLite that could crash the
    # job mid-write); tokzoo's logger leaves it RUNNING, which it is: it gets resumed. Not complete either way.
    assert interrupted.info.status == "RUNNING" and "tokzoo.complete" not in interrupted.data.tags
    stopped_at = max(m.step for m in client.get_metric_history(interrupted.info.run_id, "train/loss"))
    assert 0 < stopped_at < STEPS - 1

    rerun = run_tokzoo(["fit", str(path)], cwd=tmp_path, env=env)  # the requeued job: the same command
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-4000:]
    assert "resumed" in rerun.stdout and "done earlier" not in rerun.stdout, rerun.stdout
    (run,) = client.search_runs([client.get_experiment_by_name("requeue").experiment_id])
    assert run.info.run_id == interrupted.info.run_id and run.data.tags.get("tokzoo.complete") == "true"
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "train/loss")})
    assert steps[-1] > stopped_at  # trained on from where the requeue stopped it
    # Lightning writes a step's checkpoint before it logs that step's metrics: a job killed in between resumes after
    # the step whose train/loss it never sent. That one point, just before a checkpoint step, is all that may lack.
    missing = sorted(set(range(steps[-1] + 1)) - set(steps))
    assert len(missing) <= 1 and all((m + 1) % EVERY == 0 for m in missing), missing
    (final,) = variant_dir.glob("checkpoints/last-*.ckpt")
    assert torch.load(final, map_location="cpu", weights_only=False)["global_step"] == STEPS
    assert not list(variant_dir.glob("hpc_ckpt_*.ckpt"))  # consumed: the final rolling checkpoint holds the state
