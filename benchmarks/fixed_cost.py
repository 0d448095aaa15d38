"""What a short `tokzoo fit` variant pays besides its training steps, phase by phase, here and at an earlier commit.

    python benchmarks/fixed_cost.py                             # this tree: a 10-step default variant, phases
    python benchmarks/fixed_cost.py --baseline 28a8b9c          # the same at that commit (git worktree), side by side
    python benchmarks/fixed_cost.py --baseline 28a8b9c --sweep  # also: a sweep of 8 trials x 20 steps, 2 workers

Each case runs `tokzoo fit` of the default config (one variant, `trainer.max_steps=--steps`, MLflow in a fresh
SQLite file) in a fresh process, exactly as the CLI does (`tokzoo.cli.main`), with timers wrapped around the
functions each phase runs. Phases (seconds; the table's rows):
- process + imports: from the parent's spawn to the child's first line, plus importing tokzoo.cli and tokzoo.runner
  (torch, Lightning, MLflow come in there);
- config: load_variants; pre-flight: check_variant, tracking and output-dir checks (runner.fit before training);
- build: TokenizerModule(config); data setup: TokzooDataModule.setup;
- steps: training batches, from each batch start to its end (forward, backward, optimizer); between steps: from
  one batch's end to the next one's start (data loading, logging, callbacks);
- validation: each validation epoch whole, and inside it the measures (zero-shot, retrieval, linear probe, codebook
  statistics, token diagnostics, fidelity) one by one;
- checkpoint: Trainer.save_checkpoint (the rolling, the final ones);
- Trainer.fit other: Trainer.fit minus what is counted inside it above (Lightning's setup and teardown, loggers,
  the progress display);
- MLflow: time inside MlflowClient calls, wherever they happen (so it overlaps the other rows);
- teardown: from the CLI's return to the process exit;
- total: the process's wall time. "fixed cost" = total - steps.
A function a commit does not have is simply not timed there. `--sweep` runs `tokzoo sweep` of the codebook-count
grid (8 trials: 1, 2, 4, 8 sub-codebooks at two sizes) with `trainer.max_steps=20` and 2 workers, and reports its
wall time per case. Cases alternate order each repeat (background load hits both alike).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROWS = ("process + imports", "config", "pre-flight", "build", "data setup", "steps", "between steps", "validation",
        "  zero-shot", "  retrieval", "  linear probe", "  codebook stats", "  token diagnostics", "  fidelity",
        "checkpoint", "Trainer.fit other", "MLflow (overlaps)", "teardown", "total", "fixed cost")  # fmt: skip
SWEEP_GRID = {
    "name": "fixed_cost_sweep",
    "base": {"seed": 0, "model": {"quantizer": {"name": "mcq", "dim": 32, "num_codebooks": 4, "codebook_size": 64}}},
    "space": {
        "model.quantizer.num_codebooks": {"type": "categorical", "choices": [1, 2, 4, 8]},
        "model.quantizer.codebook_size": {"type": "categorical", "choices": [64, 128]},
    },
    "objectives": [{"metric": "val/psnr"}],
    "sampler": {"type": "grid"},
}


# ---------------------------------------------------------------- the child: one CLI run with timers
def child(args: list[str]) -> None:
    first = time.time()
    seconds: dict[str, float] = {}
    marks: dict[str, float] = {}
    t = time.perf_counter()
    import lightning as L

    import tokzoo.cli as cli
    import tokzoo.runner as runner

    seconds["imports"] = time.perf_counter() - t

    def timed(owner: object, name: str, label: str) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return

        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - start

        setattr(owner, name, wrapper)

    import tokzoo.config
    import tokzoo.lit.module as module
    from tokzoo.lit.datamodule import TokzooDataModule

    for owner in (tokzoo.config, runner):
        timed(owner, "load_variants", "config")
    for name in ("check_variant", "check_output_dir", "check_tracking", "create_store_once"):
        timed(runner, name, "pre-flight")

    class TimedModule(module.TokenizerModule):  # a subclass: Lightning's save_hyperparameters reads __init__'s frame
        def __init__(self, config):
            start = time.perf_counter()
            super().__init__(config)
            seconds["build"] = seconds.get("build", 0.0) + time.perf_counter() - start

    runner.TokenizerModule = TimedModule
    timed(TokzooDataModule, "setup", "data setup")
    timed(L.Trainer, "save_checkpoint", "checkpoint")
    save = L.Trainer.save_checkpoint

    def save_in_fit(self, *a, **k):  # also counted apart while inside Trainer.fit, to subtract from it
        start = time.perf_counter()
        try:
            return save(self, *a, **k)
        finally:
            if marks.get("in_fit"):
                seconds["checkpoint in fit"] = seconds.get("checkpoint in fit", 0.0) + time.perf_counter() - start

    L.Trainer.save_checkpoint = save_in_fit
    fit = L.Trainer.fit

    def fit_marked(self, *a, **k):
        marks["in_fit"], start = True, time.perf_counter()
        try:
            return fit(self, *a, **k)
        finally:
            marks["in_fit"] = False
            seconds["Trainer.fit"] = seconds.get("Trainer.fit", 0.0) + time.perf_counter() - start

    L.Trainer.fit = fit_marked
    timed(module.TokenizerModule, "on_validation_epoch_start", "validation")
    timed(module.TokenizerModule, "validation_step", "validation")
    timed(module.TokenizerModule, "on_validation_epoch_end", "validation")
    for name, label in (("zero_shot_accuracy", "  zero-shot"), ("retrieval_recall_at_1", "  retrieval"),
                        ("linear_probe_accuracy", "  linear probe")):  # fmt: skip
        timed(module, name, label)
    for cls_name, label in (("CodebookUsage", "  codebook stats"), ("TokenDiagnostics", "  token diagnostics"),
                            ("FidelityMetrics", "  fidelity")):  # fmt: skip
        if hasattr(module, cls_name):
            timed(getattr(module, cls_name), "compute", label)
    from mlflow.tracking import MlflowClient

    for name in ("create_run", "log_batch", "log_metric", "log_param", "set_tag", "log_artifact", "set_terminated",
                 "search_runs", "get_experiment_by_name", "create_experiment", "update_run", "get_run",
                 "search_experiments"):  # fmt: skip
        timed(MlflowClient, name, "MLflow (overlaps)")

    own_start = getattr(module.TokenizerModule, "on_train_batch_start", None)
    own_end = getattr(module.TokenizerModule, "on_train_batch_end", None)

    def batch_start(self, batch, batch_idx):
        if own_start is not None:  # the module's own hook (torch's RNG after a restore), timed as a step
            own_start(self, batch, batch_idx)
        now = time.perf_counter()
        if "end" in marks:
            seconds["between steps"] = seconds.get("between steps", 0.0) + now - marks["end"]
        marks["start"] = now

    def batch_end(self, outputs, batch, batch_idx):
        marks["end"] = time.perf_counter()
        seconds["steps"] = seconds.get("steps", 0.0) + marks["end"] - marks["start"]
        if own_end is not None:
            own_end(self, outputs, batch, batch_idx)

    module.TokenizerModule.on_train_batch_start = batch_start
    module.TokenizerModule.on_train_batch_end = batch_end
    code = cli.main(args)
    done = time.time()
    print("FIXED_COST " + json.dumps({"first": first, "done": done, "seconds": seconds, "code": code}), flush=True)
    getattr(cli, "exit_now", sys.exit)(code)  # as the console script ends (a commit without exit_now: sys.exit)


# ---------------------------------------------------------------- the parent: cases, repeats, table
def run_fit(source: Path, steps: int, workdir: Path) -> dict[str, float]:
    folder = Path(tempfile.mkdtemp(prefix="fit-", dir=workdir))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    args = ["fit", str(source / "tokzoo" / "configs" / "default.yaml"), f"trainer.max_steps={steps}",
            f"output_dir={folder / 'outputs'}", f"tracking.uri={uri}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(source), "TOKZOO_CACHE": str(workdir / "cache"), "PYTHONUNBUFFERED": "1"}
    spawn = time.time()
    proc = subprocess.run([sys.executable, __file__, "--child", *args], cwd=folder, env=env, capture_output=True,
                          text=True)  # fmt: skip
    end = time.time()
    line = next((x for x in proc.stdout.splitlines() if x.startswith("FIXED_COST ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"fit at {source} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    data = json.loads(line[len("FIXED_COST ") :])
    s = data["seconds"]
    inside = sum(s.get(k, 0.0) for k in ("steps", "between steps", "validation", "checkpoint in fit", "data setup"))
    row = {
        "process + imports": data["first"] - spawn + s.pop("imports"),
        **{k: v for k, v in s.items() if k not in ("Trainer.fit", "checkpoint in fit")},
        "Trainer.fit other": s.get("Trainer.fit", 0.0) - inside,
        "teardown": end - data["done"],
        "total": end - spawn,
    }
    row["fixed cost"] = row["total"] - row.get("steps", 0.0)
    shutil.rmtree(folder, ignore_errors=True)
    return row


def run_sweep(source: Path, workdir: Path) -> float:
    import yaml

    folder = Path(tempfile.mkdtemp(prefix="sweep-", dir=workdir))
    spec = {**SWEEP_GRID, "base": {**SWEEP_GRID["base"], "output_dir": str(folder / "outputs")}}
    (folder / "grid.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(source), "TOKZOO_CACHE": str(workdir / "cache"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}  # fmt: skip
    cmd = [sys.executable, "-m", "tokzoo.cli", "sweep", str(folder / "grid.yaml"), "trainer.max_steps=20",
           "--workers", "2", "--storage", str(folder / "study.journal")]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"sweep at {source} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    shutil.rmtree(folder, ignore_errors=True)
    return wall


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", help="git commit to compare against (checked out with git worktree)")
    p.add_argument("--steps", type=int, default=10, help="trainer.max_steps of the fit (default 10)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--sweep", action="store_true", help="also time a sweep of 8 trials x 20 steps, 2 workers")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="tokzoo-fixed-cost-"))
    sources = {"current": REPO}
    try:
        if args.baseline:
            tree = workdir / "baseline-src"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), args.baseline],
                           check=True, capture_output=True)  # fmt: skip
            sources = {"baseline": tree, **sources}
        cases = list(sources)
        fits: dict[str, list[dict]] = {c: [] for c in cases}
        sweeps: dict[str, list[float]] = {c: [] for c in cases}
        run_fit(REPO, 2, workdir)  # warm the dataset cache and the OS file cache before anything is timed
        for repeat in range(args.repeats):
            for case in cases if repeat % 2 == 0 else reversed(cases):
                fits[case].append(run_fit(sources[case], args.steps, workdir))
                print(f"{case} repeat {repeat}: total {fits[case][-1]['total']:.1f} s", flush=True)
                if args.sweep:
                    sweeps[case].append(run_sweep(sources[case], workdir))
                    print(f"{case} repeat {repeat}: sweep {sweeps[case][-1]:.1f} s", flush=True)
    finally:
        if args.baseline:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(workdir / "baseline-src")],
                           capture_output=True)  # fmt: skip
        shutil.rmtree(workdir, ignore_errors=True)
    med = {c: {row: statistics.median(r.get(row, 0.0) for r in runs) for row in ROWS} for c, runs in fits.items()}
    print(f"\nmedian seconds over {args.repeats} repeats, `tokzoo fit` of the default config, {args.steps} steps")
    print(f"{'phase':<22}" + "".join(f"{c:>12}" for c in cases) + ("   ratio" if len(cases) == 2 else ""))
    for row in ROWS:
        cells = "".join(f"{med[c][row]:>12.2f}" for c in cases)
        ratio = med[cases[-1]][row] / med[cases[0]][row] if len(cases) == 2 and med[cases[0]][row] else None
        print(f"{row:<22}{cells}" + (f"{ratio:>8.2f}" if ratio is not None else ""))
    if args.sweep:
        walls = {c: statistics.median(v) for c, v in sweeps.items()}
        ratio = f" (ratio {walls[cases[-1]] / walls[cases[0]]:.2f})" if len(cases) == 2 else ""
        shown = ", ".join(f"{c} {w:.1f}" for c, w in walls.items())
        print(f"sweep, 8 trials x 20 steps, 2 workers (s): {shown}{ratio}")
    print(f"{os.cpu_count()} CPUs | load average now {[round(x, 2) for x in os.getloadavg()]}")
    if args.json:
        args.json.write_text(json.dumps({"fits": fits, "sweeps": sweeps, "medians": med}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
