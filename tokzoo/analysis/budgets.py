"""`tokzoo compare NAME --by budget`: an ablation run at several budgets (`budgets: [...]`, variant labels
"<variant>/steps<n>"): each metric against training steps per variant, and every pair of variants whose order
flips between budgets, so that a researcher sees which small-budget results hold up at a larger one."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from matplotlib.figure import Figure

from tokzoo import catalogue
from tokzoo.analysis import plots
from tokzoo.analysis.stats import Summary, format_mean_ci
from tokzoo.analysis.summary import VariantSummary
from tokzoo.errors import TokzooError

BUDGET = re.compile(r"^(?P<family>.+)/steps(?P<steps>\d+)$")
# metrics compared across budgets: the headline ones, then the attribute tasks and their means (where logged)
BUDGET_METRICS = (
    *catalogue.HEADLINE,
    *(f"val/{m}_acc/{a}" for m in ("zeroshot", "linprobe") for a in catalogue.ATTRIBUTE_COLUMNS),
)

Families = dict[str, dict[int, VariantSummary]]  # variant -> budget -> its summary over seeds


def by_budget(summaries: Sequence[VariantSummary]) -> Families:
    """Group "<variant>/steps<n>" summaries by variant (ablation order) and budget; a ConfigError-like message when
    the experiment has no budgets."""
    out: Families = {}
    for s in summaries:
        match = BUDGET.match(s.variant)
        if match:
            out.setdefault(match["family"], {})[int(match["steps"])] = s
    if not any(len(b) > 1 for b in out.values()):
        raise TokzooError(
            "--by budget needs runs of one variant at two or more budgets (variants named <variant>/steps<n>); "
            "train them with `budgets: [200, 800]` in the ablation or 'budgets=[200,800]' on the command line"
        )
    return out


@dataclass
class Flip:
    metric: str
    first: str
    second: str
    gaps: dict[int, tuple[float, bool]]  # budget -> (mean(first) - mean(second), intervals apart)

    def describe(self) -> str:
        parts = [f"{b}: {gap:+.3g}{' (clear)' if apart else ''}" for b, (gap, apart) in sorted(self.gaps.items())]
        noise = "" if self.clear else " - inside the 95% intervals at every budget"
        return f"{catalogue.header(self.metric)}: {self.first} - {self.second} = " + ", ".join(parts) + noise

    @property
    def clear(self) -> bool:
        """The intervals are apart at one budget at least (a flip that is noise at every budget is not)."""
        return any(apart for _, apart in self.gaps.values())


def _apart(a: Summary, b: Summary) -> bool:
    """The two 95% intervals do not overlap (False with one seed: there is no interval)."""
    if a.n < 2 or b.n < 2 or not (math.isfinite(a.ci) and math.isfinite(b.ci)):
        return False
    return abs(a.mean - b.mean) > a.ci + b.ci


def gaps(families: Families, metric: str, first: str, second: str) -> dict[int, tuple[float, bool]]:
    """Per budget both variants reached: mean(first) - mean(second) of metric, and whether the CIs are apart."""
    out = {}
    for budget in sorted(set(families[first]) & set(families[second])):
        a, b = families[first][budget].stats.get(metric), families[second][budget].stats.get(metric)
        if a is not None and b is not None and a.n and b.n:
            out[budget] = (a.mean - b.mean, _apart(a, b))
    return out


def order_flips(families: Families, metrics: Sequence[str] = BUDGET_METRICS) -> list[Flip]:
    """Every (metric, pair of variants) whose order (the sign of the mean difference) differs between budgets."""
    names = list(families)
    out = []
    for metric in metrics:
        for i, first in enumerate(names):
            for second in names[i + 1 :]:
                found = gaps(families, metric, first, second)
                signs = {math.copysign(1, g) for g, _ in found.values() if g != 0}
                if len(signs) > 1:
                    out.append(Flip(metric, first, second, found))
    return out


def report(families: Families, metrics: Sequence[str] = BUDGET_METRICS) -> list[str]:
    """Lines under the table: each metric per variant across budgets, then the flips (or that there are none)."""
    lines = []
    for metric in metrics:
        cells = []
        for family, budgets in families.items():
            values = [
                f"{b}: {format_mean_ci(st.mean, st.ci)}"
                for b, s in sorted(budgets.items())
                if (st := s.stats.get(metric)) is not None and st.n
            ]
            if values:
                cells.append(f"{family} ({', '.join(values)})")
        if cells:
            lines.append(f"{catalogue.header(metric)} by budget: " + "; ".join(cells))
    flips = order_flips(families, metrics)
    lines += [f"order flips between budgets: {f.describe()}" for f in flips] or ["no pair of variants changes order"]
    return lines


def plot_budgets(families: Families, metrics: Sequence[str] = BUDGET_METRICS, title: str | None = None) -> Figure:
    """One panel per metric: mean over seeds against training steps (log axis) per variant, 95% CI error bars
    where there are two seeds or more, the chance level on accuracy panels."""
    keys = [m for m in metrics if any(m in s.stats for b in families.values() for s in b.values())]
    ncols = min(3, max(1, len(keys)))
    nrows = max(1, math.ceil(len(keys) / ncols))
    fig = Figure(figsize=(4.6 * ncols, 3.6 * nrows), layout="constrained")
    everything = [s for b in families.values() for s in b.values()]
    colors = dict(zip(families, plots._colors(len(families))))
    # each variant's points a little apart along the (log) x axis, so that error bars at one budget do not overlap
    dodge = {f: 2 ** (0.04 * (j - (len(families) - 1) / 2)) for j, f in enumerate(families)}
    for i, key in enumerate(keys):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for family, budgets in families.items():
            points = [(b, plots.scaled(s.stats.get(key), key)) for b, s in sorted(budgets.items())]
            points = [(b, st) for b, st in points if st is not None]
            if not points:
                continue
            errs = [plots._err(st) for _, st in points]
            ax.errorbar(
                [b * dodge[family] for b, _ in points],
                [st.mean for _, st in points],
                yerr=None if None in errs else errs,
                marker="o",
                capsize=4,
                color=colors[family],
                label=family,
            )
        plots.draw_chance(ax, everything, key)
        ax.set_xscale("log", base=2)
        ticks = sorted({b for budgets in families.values() for b in budgets})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("training steps")
        ax.set_ylabel(plots.metric_label(key))
        ax.set_title(plots.short_label(key), fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = fig.axes[0].get_legend_handles_labels() if fig.axes else ([], [])
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    fig.suptitle(f"{title or 'metrics by budget'} ({plots._seeds_note(everything)})")
    return fig
