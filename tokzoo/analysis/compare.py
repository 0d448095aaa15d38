"""`tokzoo compare EXPERIMENT`: one row per variant, mean ± 95% CI over seeds, as a rich table, Markdown or CSV;
with --plot DIR, the PNG figures that fit the experiment (see write_plots)."""

from __future__ import annotations

import csv
import io
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from tokzoo.analysis.runs import ExperimentRuns, RunRecord, load_experiment
from tokzoo.analysis.stats import Summary, format_mean_ci, mean_ci
from tokzoo.analysis.study import load_study_points, plot_study
from tokzoo.errors import TokzooError

FORMATS = ("table", "md", "csv")
GRAD_COS = "train/grad_cos_recon_contra"


@dataclass(frozen=True)
class Column:
    key: str  # column id in CSV / summaries
    label: str  # header in the rich and Markdown tables
    metric: str  # MLflow metric it is computed from
    reduce: str = "last"  # per run: "last" logged value, or "mean" over every logged step


COLUMNS = (
    Column("val/psnr", "PSNR (dB)", "val/psnr"),
    Column("val/ssim", "SSIM", "val/ssim"),
    Column("val/lpips", "LPIPS", "val/lpips"),
    Column("val/rfid", "rFID", "val/rfid"),
    Column("val/zeroshot_acc", "zero-shot acc", "val/zeroshot_acc"),
    Column("val/retrieval_r1", "retrieval R@1", "val/retrieval_r1"),
    Column("val/linprobe_acc", "lin. probe acc", "val/linprobe_acc"),
    Column("val/codebook_usage", "codebook usage", "val/codebook_usage"),
    Column("val/perplexity", "perplexity", "val/perplexity"),
    Column("val/dead_codes", "dead codes", "val/dead_codes"),
    # The cosine is logged every k steps; one run's value is its mean over training (the last one is noise).
    Column(f"{GRAD_COS}:mean_over_steps", "grad cos (mean)", GRAD_COS, "mean"),
    Column("perf/images_per_sec", "images/s", "perf/images_per_sec"),
    Column("perf/wall_seconds", "time (s)", "perf/wall_seconds"),
)


@dataclass
class VariantSummary:
    variant: str
    runs: list[RunRecord]
    stats: dict[str, Summary] = field(default_factory=dict)  # Column.key -> summary over seeds

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.runs]

    @property
    def params(self) -> dict[str, str]:
        """Params every run of the variant shares (the seed and anything else that differs is left out)."""
        common = dict(self.runs[0].params)
        for run in self.runs[1:]:
            common = {k: v for k, v in common.items() if run.params.get(k) == v}
        return common

    @property
    def bits_per_token(self) -> float | None:
        return self.runs[0].bits_per_token

    @property
    def absent(self) -> dict[str, str]:
        """metric -> reason it was not logged, from the runs' tags (first reason seen)."""
        out: dict[str, str] = {}
        for run in self.runs:
            for metric, reason in run.absent.items():
                out.setdefault(metric, reason)
        return out

    def metric_values(self, metric: str) -> list[float]:
        """Per-seed last values of an MLflow metric (e.g. 'val/codebook_usage/2'), finite ones only."""
        return [r.metrics[metric] for r in self.runs if metric in r.metrics and math.isfinite(r.metrics[metric])]

    def summary(self, metric: str, confidence: float = 0.95) -> Summary:
        """Summary over seeds of a column key or of any MLflow metric's last value."""
        return self.stats.get(metric) or mean_ci(self.metric_values(metric), confidence)


def run_value(experiment: ExperimentRuns, run: RunRecord, column: Column) -> float | None:
    if column.metric not in run.metrics:
        return None
    if column.reduce == "mean":
        values = [v for _, v in experiment.history(run.run_id, column.metric)]
        return math.fsum(values) / len(values) if values else None
    return run.metrics[column.metric]


def summarize(
    experiment: ExperimentRuns, columns: Sequence[Column] = COLUMNS, confidence: float = 0.95
) -> list[VariantSummary]:
    """One summary per variant (ablation order): mean and t-interval over its seeds for every column."""
    out = []
    for variant in experiment.variants:
        runs = experiment.runs_of(variant)
        summary = VariantSummary(variant, runs)
        for col in columns:
            values = [run_value(experiment, r, col) for r in runs]
            if any(v is not None for v in values):
                summary.stats[col.key] = mean_ci(values, confidence)
        out.append(summary)
    return out


def shown_columns(summaries: Sequence[VariantSummary], columns: Sequence[Column] = COLUMNS) -> list[Column]:
    return [c for c in columns if any(c.key in s.stats for s in summaries)]


def _bits(value: float | None) -> str:
    if value is None:
        return "-"
    return "cont." if math.isinf(value) else f"{value:g}"


def _cell(summary: VariantSummary, column: Column) -> str:
    stat = summary.stats.get(column.key)
    if stat is None or stat.n == 0:
        return "-"
    text = format_mean_ci(stat.mean, stat.ci)
    return f"{text} (n={stat.n})" if stat.n < len(summary.runs) else text


def rows(summaries: Sequence[VariantSummary], columns: Sequence[Column]) -> list[list[str]]:
    return [[s.variant, str(len(s.runs)), _bits(s.bits_per_token), *[_cell(s, c) for c in columns]] for s in summaries]


def notes(experiment: ExperimentRuns, summaries: Sequence[VariantSummary], columns: Sequence[Column]) -> list[str]:
    """Lines under the table: what the numbers are, which metrics are absent and why, which runs were left out."""
    seeds = sorted({len(s.runs) for s in summaries})
    lines = [
        "mean ± half-width of the 95% t confidence interval over seeds "
        f"({'/'.join(map(str, seeds))} seed(s) per variant); accuracies and usage are fractions (0-1); "
        "'-' = not logged; 'cont.' = continuous (no quantizer)"
    ]
    # Every table metric, shown or not: a column missing altogether (rFID without Inception weights) needs its
    # reason most.
    key_of = {c.metric: c.key for c in COLUMNS}
    reasons: dict[tuple[str, str], list[str]] = {}
    for s in summaries:
        for metric, reason in sorted(s.absent.items()):
            if metric in key_of and key_of[metric] not in s.stats:
                reasons.setdefault((metric, reason), []).append(s.variant)
    for (metric, reason), variants in sorted(reasons.items()):
        lines.append(f"{metric} absent for {', '.join(variants)}: {reason}")
    if experiment.skipped:
        left = ", ".join(f"{n} {status}" for status, n in sorted(experiment.skipped.items()))
        lines.append(f"left out: {left} run(s) (only FINISHED runs count)")
    if experiment.superseded:
        lines.append(f"{experiment.superseded} older duplicate run(s) of a variant/seed replaced by the latest")
    return lines


def header(columns: Sequence[Column]) -> list[str]:
    return ["variant", "seeds", "bits/token", *[c.label for c in columns]]


def rich_table(experiment: ExperimentRuns, summaries: Sequence[VariantSummary], columns: Sequence[Column]) -> Table:
    table = Table(
        title=f"tokzoo compare: {experiment.name} (mean ± 95% CI over seeds)",
        header_style="bold",
        caption="\n".join(notes(experiment, summaries, columns)),
        caption_justify="left",
    )
    longest = max((len(s.variant) for s in summaries), default=7)
    for i, name in enumerate(header(columns)):
        if i == 0:  # variant names are never cut; a narrow terminal squeezes the number columns instead
            table.add_column(name, style="cyan", no_wrap=True, min_width=longest)
        else:
            table.add_column(name, justify="right")
    for row in rows(summaries, columns):
        table.add_row(*row)
    return table


def markdown(experiment: ExperimentRuns, summaries: Sequence[VariantSummary], columns: Sequence[Column]) -> str:
    head = header(columns)
    lines = [
        f"### {experiment.name}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows(summaries, columns)]
    lines.append("")
    lines += [f"- {n}" for n in notes(experiment, summaries, columns)]
    return "\n".join(lines) + "\n"


def csv_text(summaries: Sequence[VariantSummary], columns: Sequence[Column]) -> str:
    """One row per variant; for each column `<key>.mean`, `<key>.ci95` (half-width), `<key>.n`; empty = absent."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        ["variant", "n_runs", "bits_per_token", *[f"{c.key}.{part}" for c in columns for part in ("mean", "ci95", "n")]]
    )
    for s in summaries:
        row: list[str] = [s.variant, str(len(s.runs)), "" if s.bits_per_token is None else repr(s.bits_per_token)]
        for c in columns:
            st = s.stats.get(c.key)
            if st is None or st.n == 0:
                row += ["", "", "0"]
            else:
                row += [repr(st.mean), "" if math.isnan(st.ci) else repr(st.ci), str(st.n)]
        writer.writerow(row)
    return buf.getvalue()


# ---- plots -------------------------------------------------------------------------------------------------
def _distinct(summaries: Sequence[VariantSummary], key: str) -> set[str]:
    return {s.params.get(key) for s in summaries if s.params.get(key) is not None}


def is_supervision_grid(summaries: Sequence[VariantSummary]) -> bool:
    """True when the variants cross >= 2 supervisions with every capacity (the loss-conflict design); the roadmap,
    whose supervision changes along the way, is not one."""
    from tokzoo.analysis.plots import capacity_label

    cells = {(s.params.get("loss.supervision"), capacity_label(s)) for s in summaries}
    sups, caps = {c[0] for c in cells}, {c[1] for c in cells}
    return len(sups) > 1 and len(cells) == len(sups) * len(caps)


def write_plots(experiment: ExperimentRuns, summaries: Sequence[VariantSummary], out_dir: str | Path) -> list[Path]:
    """Write the figures that fit this experiment to out_dir; returns their paths.

    metrics.png          always: one bar panel per headline metric, per variant
    understanding.png    zero-shot / linear-probe bars per variant in ablation order (the roadmap figure)
    loss_conflict.png    when variants cross supervisions with capacities: grouped bars, supervision x capacity
    grad_cos.png         when runs logged train/grad_cos_recon_contra: cosine (and norms) over steps
    codebook_count.png   when every variant is quantized with one supervision and bits/token differ:
                         fidelity and accuracy vs log2 vocabulary
    codebook_usage.png   when per-sub-codebook usage was logged: heatmap variant x sub-codebook
    study.png            for a sweep's experiment: objectives against each other (Pareto front) and vs parameters
    """
    from tokzoo.analysis import plots

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TokzooError(f"cannot create the plot folder {out}: {err.strerror}; pass a writable --plot DIR") from None
    written = []
    name = experiment.name

    def save(fig, filename: str) -> None:
        written.append(plots.save_figure(fig, out / filename))

    save(plots.plot_metric_grid(summaries, title=f"{name}: metrics per variant"), "metrics.png")
    study = load_study_points(experiment.client, experiment.experiment_id)
    if study is not None and study[1]:
        save(plot_study(*study, title=f"study {name}"), "study.png")
    if any(k in s.stats for s in summaries for k in plots.UNDERSTANDING):
        save(plots.plot_roadmap(summaries, title=f"{name}: understanding per stage"), "understanding.png")
    if is_supervision_grid(summaries):
        save(plots.plot_loss_conflict(summaries, title=f"{name}: supervision x capacity"), "loss_conflict.png")
    cos = experiment.histories(GRAD_COS)
    if cos:
        fig = plots.plot_grad_cos(
            cos,
            recon_norms=experiment.histories("train/grad_norm_recon"),
            contra_norms=experiment.histories("train/grad_norm_contra"),
            title=f"{name}: gradient conflict on the shared encoder",
        )
        save(fig, "grad_cos.png")
    bits = [s.bits_per_token for s in summaries]
    if (
        all(b is not None and math.isfinite(b) for b in bits)
        and len(set(bits)) > 1
        and len(_distinct(summaries, "loss.supervision")) <= 1
    ):
        save(plots.plot_codebook_count(summaries, title=f"{name}: codebooks at a fixed total"), "codebook_count.png")
    if any(plots.usage_columns(s) for s in summaries):
        save(plots.plot_codebook_usage(summaries, title=f"{name}: per-sub-codebook usage"), "codebook_usage.png")
    return written


def compare(
    experiment: str,
    uri: str | None = None,
    fmt: str = "table",
    plot_dir: str | Path | None = None,
    console: Console | None = None,
) -> int:
    """The `tokzoo compare` command: print the table in `fmt`, write plots when plot_dir is given."""
    if fmt not in FORMATS:
        raise TokzooError(f"--format {fmt!r} is unknown; allowed: {', '.join(FORMATS)}")
    runs = load_experiment(experiment, uri)
    summaries = summarize(runs)
    columns = shown_columns(summaries)
    console = console or Console()
    # Markdown and CSV go to stdout untouched (pipe them into files); anything else goes to stderr then.
    info = console if fmt == "table" else Console(stderr=True, soft_wrap=True)
    if fmt == "table":
        table = rich_table(runs, summaries, columns)
        if not console.is_terminal:  # piped or captured: print at full width rather than rich's default 80 columns
            needed = Measurement.get(console, console.options.update(width=10_000), table).maximum
            console = Console(file=console.file, width=max(console.width, needed), soft_wrap=True)
        console.print(table)
    elif fmt == "md":
        sys.stdout.write(markdown(runs, summaries, columns))
    else:
        sys.stdout.write(csv_text(summaries, columns))
    sys.stdout.flush()
    if plot_dir is not None:
        for path in write_plots(runs, summaries, plot_dir):
            info.print(f"wrote {path}", highlight=False)
    return 0
