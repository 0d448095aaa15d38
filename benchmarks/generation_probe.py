"""What the generation probe costs next to its variant's fit, at the quick-start budget, through the real CLI.

    python benchmarks/generation_probe.py [--ablation ablations/mcq_vs_rq.yaml] [--steps N] [--out DIR]

Runs `tokzoo fit` on the ablation (its own eval.generation settings) in a fresh folder with an empty dataset cache,
so the first variant also trains the reference classifier (cached for the rest), then reads back per variant:
the fit's wall time (perf/wall_seconds: training and validation), the probe's (perf/gen_seconds) and the probe's
metrics. Prints the table and the probe / fit ratio (target: at most 0.5, reference classifier cached).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _machine import cpu_name  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ablation", default=str(ROOT / "ablations" / "mcq_vs_rq.yaml"))
    parser.add_argument("--steps", type=int, help="override trainer.max_steps (default: the ablation's)")
    parser.add_argument("--out", help="working folder (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="tokzoo-genbench-"))
    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TOKZOO_CACHE": str(work / "cache")}
    cmd = [sys.executable, "-m", "tokzoo.cli", "fit", args.ablation, f"output_dir={work / 'outputs'}"]
    if args.steps:
        cmd.append(f"trainer.max_steps={args.steps}")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    total = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"tokzoo fit failed ({proc.returncode}):\n{proc.stderr[-3000:]}")

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    name = Path(args.ablation).stem
    exp = client.get_experiment_by_name(name)
    runs = sorted(client.search_runs([exp.experiment_id]), key=lambda r: r.info.start_time)
    print(f"{cpu_name()}, {os.cpu_count()} cores")
    print(f"{' '.join(cmd[3:])}: {total:.0f} s wall for {len(runs)} variants (install not included)")
    cols = ("perf/wall_seconds", "perf/gen_seconds", "val/gen_bits_per_image", "val/gen_class_acc", "val/gen_ref_acc")
    print(f"{'variant':<16}" + "".join(f"{c.split('/')[-1]:>20}" for c in cols) + f"{'probe/fit':>12}")
    for i, run in enumerate(runs):
        m = run.data.metrics
        ratio = m.get("perf/gen_seconds", float("nan")) / m.get("perf/wall_seconds", float("nan"))
        note = "  (trains the reference classifier)" if i == 0 else ""
        row = "".join(f"{m.get(c, float('nan')):>20.3f}" for c in cols)
        print(f"{run.info.run_name:<16}{row}{ratio:>12.2f}{note}")


if __name__ == "__main__":
    main()
