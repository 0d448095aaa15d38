"""`tokzoo` command line: fit, sweep, compare, weights.

Exit codes: 0 success; 2 bad config or input (one readable message, no traceback unless --debug); 1 anything else.
"""

from __future__ import annotations

import argparse
import signal
import sys
import traceback
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from tokzoo.errors import TokzooError
from tokzoo.exiting import exit_now

# Tables keep their columns when stdout is a file or a pipe (CI logs, `| tee`), instead of rich's 80 columns.
console = Console(stderr=False, width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, soft_wrap=True)  # never hard-wrap a message: paths and keys stay greppable


def is_global_zero() -> bool:
    from tokzoo.distributed import is_env_rank_zero  # called after training: torch is imported by then

    return is_env_rank_zero()


def format_metric(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}"


def summary_table(title: str, results: Sequence, metrics: Sequence[str]) -> Table:
    """One row per variant (a runner.VariantResult): status, bits per token, the metrics any variant has, time."""
    shown = [m for m in metrics if any(m in r.metrics for r in results)]
    table = Table(title=title, header_style="bold")
    table.add_column("variant", style="cyan")
    table.add_column("status")
    table.add_column("bits/token", justify="right")
    for m in shown:
        table.add_column(m, justify="right")
    table.add_column("time (s)", justify="right")
    for r in results:
        status = f"[red]{r.status}[/red]" if r.status == "failed" else r.status
        cells = [format_metric(r.metrics.get(m)) for m in shown]
        table.add_row(r.name, status, format_metric(r.bits_per_token), *cells, f"{r.seconds:.0f}")
    return table


def cmd_fit(args: argparse.Namespace) -> int:
    from tokzoo.config import load_variants

    load_variants(args.config, args.overrides)  # config errors surface before the heavy imports below
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from tokzoo.output import configure_output
    from tokzoo.runner import SUMMARY_METRICS, TRAINING, fit

    configure_output(args.verbose)  # after the import of Lightning, which sets its own log level

    def on_sigterm(signum: int, frame: object) -> None:
        # Inside Trainer.fit, Lightning checkpoints and stops at the end of the step; outside it (start-up,
        # between variants, MLflow bookkeeping) there is nothing to save, so stop at once, cleanly.
        if not TRAINING.is_set():
            raise SIGTERMException()

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        experiment, results = fit(args.config, args.overrides)
    except SIGTERMException:
        err_console.print("stopped by SIGTERM: the last checkpoint was saved; run the same command to resume")
        return 143
    if is_global_zero():
        console.print(summary_table(f"tokzoo fit: {experiment}", results, SUMMARY_METRICS))
        for r in results:
            if r.error:
                err_console.print(f"[red]{r.name} failed:[/red] {r.error}")
            elif r.checkpoint:
                console.print(f"[dim]{r.name}: checkpoint {r.checkpoint}, MLflow run {r.run_id}[/dim]")
    return 1 if any(r.status == "failed" for r in results) else 0


def cmd_sweep(args: argparse.Namespace) -> int:
    import signal

    from tokzoo.output import configure_output
    from tokzoo.sweep import best_trials, run_sweep, sweep_table

    configure_output(args.verbose)  # the trial processes inherit the choice ($TOKZOO_VERBOSE)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # the sweep stops its trials and re-queues them for the next run

    signal.signal(signal.SIGTERM, interrupt)
    outcome = run_sweep(
        args.sweep,
        args.overrides,
        workers=args.workers,
        storage=args.storage,
        n_trials=args.n_trials,
        log=console.print,
        launcher=args.launcher,
    )
    console.print(sweep_table(outcome))
    if not best_trials(outcome.study):
        err_console.print("no trial completed; see the fail reasons above")
        return 1
    return 0


def cmd_probe_gen(args: argparse.Namespace) -> int:
    from tokzoo.probe_gen import probe_experiment
    from tokzoo.tracking import tracking_uri

    uri = args.tracking_uri or tracking_uri(None)
    results = probe_experiment(args.experiment, args.variant, uri, args.steps)
    shown = (
        "val/gen_bits_per_image",
        "val/gen_bits_per_token",
        "val/gen_class_acc",
        "val/gen_ref_acc",
        "val/gen_fd_ref",
    )
    table = Table(title=f"tokzoo probe-gen: {args.experiment}", header_style="bold")
    for col in ("variant", *shown):
        table.add_column(col)
    for name, metrics in results:
        table.add_row(name, *(format_metric(metrics.get(k)) for k in shown))
    console.print(table)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from tokzoo.analysis.compare import compare

    return compare(
        args.experiment, uri=args.tracking_uri, fmt=args.format, plot_dir=args.plot, console=console, by=args.by
    )


def cmd_weights(args: argparse.Namespace) -> int:
    from tokzoo.weights import download_weights, weight_status

    if args.download:
        for name, status in download_weights().items():
            console.print(f"{name}: {status}")
    table = Table(title="pretrained weights used by metrics and losses", header_style="bold")
    for col in ("name", "used for", "present", "path"):
        table.add_column(col)
    for row in weight_status():
        present = "[green]yes[/green]" if row["present"] else "[red]no[/red]"
        table.add_row(row["name"], row["purpose"], present, str(row["path"]))
    console.print(table)
    console.print("Missing weights: the metrics that need them are not logged (the run's tags say why).")
    if args.config:
        return _tower_weights_table(args.config)
    return 0


def _tower_weights_table(path: str) -> int:
    """The pretrained towers a config or ablation names, per variant: found (cache, files) or what to do."""
    from tokzoo.backbones.pretrained import tower_weights
    from tokzoo.config import load_variants

    _, variants = load_variants(path)
    table = Table(title=f"pretrained towers named by {path}", header_style="bold")
    for col in ("variant", "part", "tower", "pretrained", "present", "path or what to do"):
        table.add_column(col, overflow="fold")
    missing = 0
    for variant in variants:
        for part in ("encoder", "text"):
            row = tower_weights(part, variant.config["model"][part])
            if row is not None:
                missing += row["present"] == "no"
                present = "[green]yes[/green]" if row["present"] == "yes" else "[red]no[/red]"
                table.add_row(variant.name, part, row["tower"], row["pretrained"], present, row["path"])
    console.print(table if table.row_count else f"{path} names no pretrained towers (they train from scratch)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokzoo", description="Ablation studies of unified visual tokenizers")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors too")
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="train every variant of an ablation (or one run config)")
    fit.add_argument("config", help="run config or ablation YAML")
    fit.add_argument(
        "overrides", nargs="*", help="dot-list overrides applied to every variant, e.g. trainer.max_steps=50"
    )
    fit.add_argument("--verbose", action="store_true", help="also show the libraries' logs (Lightning, MLflow)")
    fit.set_defaults(func=cmd_fit)
    sweep = sub.add_parser("sweep", help="run (or resume, or join) an Optuna study; one training process per trial")
    sweep.add_argument("sweep", help="sweep YAML (base config, space, objectives, sampler, n_trials, storage)")
    sweep.add_argument(
        "overrides", nargs="*", help="dot-list overrides applied to every trial, e.g. trainer.max_steps=50"
    )
    sweep.add_argument("--workers", type=int, default=1, help="trials run in parallel on this machine (default 1)")
    sweep.add_argument("--storage", help="Optuna storage: a journal file path or an RDB URL (overrides the file)")
    sweep.add_argument("--n-trials", type=int, help="total trial budget of the study (overrides the file)")
    sweep.add_argument("--verbose", action="store_true", help="also show the libraries' logs, here and in trials")
    sweep.add_argument(
        "--launcher", choices=("warm", "fresh"), default="warm",
        help="warm (default): CPU trials are forks of one process that imported torch/Lightning/MLflow once; "
        "fresh: every trial a new interpreter (GPU and DDP trials always are)",
    )  # fmt: skip
    sweep.set_defaults(func=cmd_sweep)
    compare = sub.add_parser("compare", help="table (mean ± 95%% CI over seeds) and plots of an experiment's runs")
    compare.add_argument("experiment", help="MLflow experiment name (the ablation's name)")
    compare.add_argument("--plot", metavar="DIR", help="write PNG figures to DIR")
    compare.add_argument("--format", choices=("table", "md", "csv"), default="table", help="output format")
    compare.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, ./mlflow.db)")
    compare.add_argument(
        "--by",
        choices=("variant", "budget"),
        default="variant",
        help="budget: also each metric against training steps per variant, and the pairs whose order flips",
    )
    compare.set_defaults(func=cmd_compare)
    probe = sub.add_parser("probe-gen", help="the generation probe on an experiment's finished runs (same MLflow runs)")
    probe.add_argument("experiment", help="MLflow experiment name (the ablation's name)")
    probe.add_argument("--variant", help="only this variant (default: every finished run)")
    probe.add_argument("--steps", type=int, help="prior training steps (default: the run's eval.generation.steps)")
    probe.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, ./mlflow.db)")
    probe.set_defaults(func=cmd_probe_gen)
    weights = sub.add_parser("weights", help="list the pretrained weights metrics need, where they are looked for")
    weights.add_argument("--download", action="store_true", help="fetch missing weights (needs network)")
    weights.add_argument("config", nargs="?", help="also list the pretrained towers this config/ablation names")
    weights.set_defaults(func=cmd_weights)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides given after an option (`tokzoo sweep s.yaml --workers 2 trainer.max_steps=5`)
        if getattr(args, "overrides", None) is None or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    try:
        return args.func(args)
    except TokzooError as err:
        if args.debug:
            traceback.print_exc()
        err_console.print(f"[bold red]error:[/bold red] {err}", highlight=False)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130


def run() -> None:
    """The `tokzoo` console script: main(), then exit_now. An exception main() does not handle (exit code 1) leaves
    through the interpreter as usual, with its traceback."""
    exit_now(main())


if __name__ == "__main__":
    run()
