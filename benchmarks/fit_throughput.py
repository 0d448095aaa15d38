"""End-to-end `tokzoo fit` throughput: this tree against an earlier commit, compile on/off, 2 DDP ranks vs 1.

Each case is a real `tokzoo fit` of one config in a fresh folder (a subprocess, MLflow in SQLite there); the figures
are read back from the run it logs: perf/images_per_sec (training batches after the first few, from the
ImagesPerSecond callback) and perf/wall_seconds (Trainer.fit, validation included). Cases run round-robin,
`--repeats` times, so background load hits all of them alike; the table gives medians and each case's ratio to the
first one.

    python benchmarks/fit_throughput.py --baseline 4f03aa2            # first tokzoo fit vs now (default config)
    python benchmarks/fit_throughput.py --cases current compile        # torch.compile off vs on
    python benchmarks/fit_throughput.py --cases current ddp2 --steps 100   # 1 process vs 2 gloo ranks (CPU)
    python benchmarks/fit_throughput.py --cases current gradcos            # gradient-cosine logging every 10 steps
    python benchmarks/fit_throughput.py --cases current nodes2 --steps 100  # 1 process vs 2 torchrun "nodes"

Cases: `baseline` (the commit given by --baseline, checked out with `git worktree` into a temporary folder and run
from there), `current` (this tree), `compile` (this tree, compile=true), `ddp2` (this tree,
trainer.devices=2 trainer.strategy=ddp; on CPU each rank gets cores / 2 threads, and images/s counts both ranks),
`nodes2` (two `torchrun --nnodes 2` processes on 127.0.0.1 running `python -m tokzoo fit`, one gloo rank each with
cores / 2 threads: on one machine this measures the multi-node path's overhead, not a speed-up), `gradcos` (this
tree, loss.grad_cos_every=10: the cost of measuring the gradient conflict).
Extra arguments are dot-list overrides for every case (e.g. data.batch_size=32).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def case_overrides(case: str) -> list[str]:
    return {
        "compile": ["compile=true"],
        "ddp2": ["trainer.devices=2", "trainer.strategy=ddp"],
        "nodes2": ["trainer.num_nodes=2", "trainer.devices=1", "trainer.strategy=ddp", "trainer.accelerator=cpu"],
        "gradcos": ["loss.grad_cos_every=10"],
    }.get(case, [])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def half_the_cores() -> dict[str, str]:
    """Two "nodes" on one machine share its cores, as 2 DDP ranks under Lightning's launcher do."""
    n = str(max(1, (os.cpu_count() or 2) // 2))
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


def node_command(node: int, port: int, fit_args: list[str]) -> list[str]:
    """torchrun for node `node` of 2 (one process each, on 127.0.0.1), running `python -m tokzoo fit ...`."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={node}",
        "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "tokzoo", *fit_args,
    ]  # fmt: skip


def run_case(case: str, source: Path, steps: int, overrides: list[str], workdir: Path) -> dict:
    """One `tokzoo fit` of a one-variant config in a fresh folder; returns the run's perf metrics."""
    folder = Path(tempfile.mkdtemp(prefix=f"{case}-", dir=workdir))
    config = folder / "bench.yaml"
    config.write_text(yaml.safe_dump({"name": "bench", "base": {}, "variants": {case: {}}}))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    args = [str(config), f"trainer.max_steps={steps}", f"output_dir={folder / 'outputs'}", f"tracking.uri={uri}"]
    env = {**os.environ, "PYTHONPATH": str(source), "PYTHONUNBUFFERED": "1", "TOKZOO_CACHE": str(workdir / "cache")}
    command = [sys.executable, "-m", "tokzoo.cli", "fit", *args, *overrides, *case_overrides(case)]
    start = time.perf_counter()
    if case == "nodes2":
        procs = [subprocess.Popen(node_command(node, port, command[3:]), cwd=folder, env={**env, **threads},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for port, threads in [(free_port(), half_the_cores())] for node in (0, 1)]  # fmt: skip
        outcomes = [(p.wait(), p.stderr.read()) for p in procs]
        proc = subprocess.CompletedProcess(command, max(rc for rc, _ in outcomes), "", outcomes[0][1])
    else:
        proc = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"case {case} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    import mlflow

    client = mlflow.tracking.MlflowClient(uri)
    experiment = client.get_experiment_by_name("bench")
    run = client.search_runs([experiment.experiment_id])[0]
    metrics = run.data.metrics
    shutil.rmtree(folder / "outputs", ignore_errors=True)  # checkpoints: ~90 MB each
    return {
        "images_per_sec": metrics.get("perf/images_per_sec", float("nan")),
        "fit_seconds": metrics.get("perf/wall_seconds", float("nan")),
        "process_seconds": elapsed,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cases = ("baseline", "current", "compile", "ddp2", "nodes2", "gradcos")
    p.add_argument("--cases", nargs="+", default=None, choices=cases)
    p.add_argument("--baseline", default=None, help="git commit for the `baseline` case")
    p.add_argument("--steps", type=int, default=200, help="trainer.max_steps of every run")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cases = args.cases or (["baseline", "current"] if args.baseline else ["current"])
    if "baseline" in cases and not args.baseline:
        p.error("the baseline case needs --baseline COMMIT")

    workdir = Path(tempfile.mkdtemp(prefix="tokzoo-fit-bench-"))
    sources = {case: REPO for case in cases}
    try:
        if "baseline" in cases:
            tree = workdir / "baseline-src"
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), args.baseline],
                check=True,
                capture_output=True,
            )
            sources["baseline"] = tree
        load_before = os.getloadavg()
        results: dict[str, list[dict]] = {case: [] for case in cases}
        for repeat in range(args.repeats):
            for case in cases if repeat % 2 == 0 else reversed(cases):
                result = run_case(case, sources[case], args.steps, args.overrides, workdir)
                results[case].append(result)
                print(
                    f"{case:>9} repeat {repeat}: {result['images_per_sec']:7.1f} images/s, "
                    f"fit {result['fit_seconds']:6.1f} s, process {result['process_seconds']:6.1f} s",
                    flush=True,
                )
        load_after = os.getloadavg()
    finally:
        if "baseline" in cases:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(workdir / "baseline-src")],
                capture_output=True,
            )
        shutil.rmtree(workdir, ignore_errors=True)

    summary = {
        case: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for case, runs in results.items()
    }
    first = summary[cases[0]]
    print(
        f"\nmedians over {args.repeats} repeats, {args.steps} steps, overrides {args.overrides or 'none'}; "
        f"ratios vs {cases[0]}"
    )
    print(f"{'case':>9} {'images/s':>9} {'ratio':>6} {'fit s':>7} {'ratio':>6} {'process s':>10}")
    for case, s in summary.items():
        print(
            f"{case:>9} {s['images_per_sec']:9.1f} {s['images_per_sec'] / first['images_per_sec']:6.2f} "
            f"{s['fit_seconds']:7.1f} {s['fit_seconds'] / first['fit_seconds']:6.2f} {s['process_seconds']:10.1f}"
        )
    import torch

    machine = {"cpus": os.cpu_count(), "torch": torch.__version__, "load_before": load_before, "load_after": load_after}
    print(
        f"{machine['cpus']} CPUs | torch {machine['torch']} | load average before / after: "
        f"{[round(x, 2) for x in load_before]} / {[round(x, 2) for x in load_after]}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": vars(args) | {"json": str(args.json)},
                    "cases": results,
                    "summary": summary,
                    "baseline": args.baseline,
                    "machine": machine,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
