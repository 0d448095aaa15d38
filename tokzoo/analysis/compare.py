"""`tokzoo compare EXPERIMENT`: one row per variant, mean ± 95% CI over seeds, as a rich table, Markdown or CSV;
with --plot DIR, the PNG figures that fit the experiment (tokzoo.analysis.figures.write_plots)."""

from __future__ import annotations

import csv
import io
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from tokzoo.analysis import budgets
from tokzoo.analysis.figures import write_plots
from tokzoo.analysis.plots import save_figure
from tokzoo.analysis.runs import ExperimentRuns, load_experiment
from tokzoo.analysis.stats import format_mean_ci
from tokzoo.analysis.summary import COLUMNS, Column, VariantSummary, shown_columns, summarize
from tokzoo.errors import TokzooError

FORMATS = ("table", "md", "csv")
GROUPINGS = ("variant", "budget")


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


def compare(
    experiment: str,
    uri: str | None = None,
    fmt: str = "table",
    plot_dir: str | Path | None = None,
    console: Console | None = None,
    by: str = "variant",
) -> int:
    """The `tokzoo compare` command: print the table in `fmt`, write plots when plot_dir is given. by="budget":
    also each metric across budgets per variant and the pairs whose order flips (tokzoo.analysis.budgets)."""
    if fmt not in FORMATS:
        raise TokzooError(f"--format {fmt!r} is unknown; allowed: {', '.join(FORMATS)}")
    if by not in GROUPINGS:
        raise TokzooError(f"--by {by!r} is unknown; allowed: {', '.join(GROUPINGS)}")
    runs = load_experiment(experiment, uri)
    summaries = summarize(runs)
    families = budgets.by_budget(summaries) if by == "budget" else None
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
    if families is not None:
        lines = budgets.report(families)
        if fmt == "table":
            console.print("\n".join(lines), highlight=False, soft_wrap=True)
        elif fmt == "md":
            sys.stdout.write("\n" + "".join(f"- {line}\n" for line in lines))
        else:
            info.print("\n".join(lines), highlight=False)  # the CSV stays one table
    sys.stdout.flush()
    if plot_dir is not None:
        written = write_plots(runs, summaries, plot_dir)
        if families is not None:
            fig = budgets.plot_budgets(families, title=f"{experiment}: metrics by budget")
            written.append(save_figure(fig, Path(plot_dir) / "budgets.png"))
        for path in written:
            info.print(f"wrote {path}", highlight=False)
    return 0
