"""Figures for ablations, drawn from per-variant summaries (tokzoo.analysis.compare.summarize).

Every function returns a matplotlib Figure built with the object-oriented API (no pyplot, no global state): it
renders with the Agg canvas whatever backend is active, so `tokzoo compare --plot` needs no display and notebooks
show the same objects inline. Bars show the mean over seeds with the 95% t interval as error bars; accuracies and
usage are drawn in percent.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

from tokzoo import catalogue
from tokzoo.analysis.stats import Summary, mean_ci
from tokzoo.catalogue import HEADLINE

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from tokzoo.analysis.summary import VariantSummary

Series = list[tuple[int, float]]
UNDERSTANDING = ("val/zeroshot_acc", "val/retrieval_r1", "val/linprobe_acc", *catalogue.ATTRIBUTE_MEANS)
FIDELITY = ("val/psnr", "val/rfid")
GRID_METRICS = (*HEADLINE, "train/grad_cos_recon_contra:mean_over_steps")
SUPERVISION_ORDER = ("recon", "contra", "both")
USAGE = re.compile(r"^val/codebook_usage/(\d+)$")

MEAN = ":mean_over_steps"  # column-key suffix of metrics summarised as their mean over training steps


def metric_label(key: str) -> str:
    return catalogue.label(key.removesuffix(MEAN))


def short_label(key: str) -> str:
    return catalogue.header(key.removesuffix(MEAN))


def scaled(summary: Summary | None, key: str) -> Summary | None:
    if summary is None or summary.n == 0:
        return None
    entry = catalogue.lookup(key.removesuffix(MEAN))
    return summary.scaled(entry.scale if entry else 1.0)


def _colors(n: int) -> list:
    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _err(s: Summary | None) -> float | None:
    """The error bar: the CI half-width, or none at all for one seed (a zero-width bar would claim certainty)."""
    return None if s is None or s.n < 2 or not math.isfinite(s.ci) else s.ci


def chance_level(summaries: Sequence[VariantSummary], key: str) -> float | None:
    """The chance level the runs tagged for an accuracy metric (chance.<metric>: 1 / classes), plot-scaled; None
    when untagged (older runs, metrics without one) or when the runs disagree (different datasets)."""
    metric = key.removesuffix(MEAN)
    levels = {r.tags[f"chance.{metric}"] for s in summaries for r in s.runs if f"chance.{metric}" in r.tags}
    if len(levels) != 1:
        return None
    entry = catalogue.lookup(metric)
    return float(levels.pop()) * (entry.scale if entry else 1.0)


def draw_chance(ax: Axes, summaries: Sequence[VariantSummary], key: str, color: object = "0.3") -> None:
    level = chance_level(summaries, key)
    if level is not None:
        ax.axhline(level, color=color, linestyle=":", linewidth=1.3, label=f"chance ({short_label(key)})")


def _grouped_bar(ax: Axes, x: float, st: Summary, width: float, color: object, label: str | None) -> None:
    """One bar of a grouped bar chart: mean with its 95% CI as the error bar."""
    ax.bar(x, st.mean, width, yerr=_err(st), capsize=3, color=color, edgecolor="black", linewidth=0.5, label=label)


def _seeds_note(summaries: Sequence[VariantSummary]) -> str:
    counts = sorted({len(s.runs) for s in summaries})
    if counts == [1]:
        return "1 seed: single runs, no confidence interval"
    note = f"mean ± 95% CI over {'/'.join(map(str, counts))} seeds"
    return note + ("; no interval where 1 seed" if 1 in counts else "") + "; dotted: chance"


def _missing(ax: Axes, x: float, text: str = "n/a") -> None:
    ax.text(x, 0.02, text, transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=8, color="0.4")


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", facecolor="white")
    return path


# ---- generic: one bar per variant --------------------------------------------------------------------------
def bars_per_variant(ax: Axes, summaries: Sequence[VariantSummary], key: str) -> None:
    """Bars with error bars for one metric (a summary key) on an existing Axes; 'n/a' where it was not logged."""
    x = np.arange(len(summaries))
    colors = _colors(len(summaries))
    for i, s in enumerate(summaries):
        st = scaled(s.stats.get(key), key)
        if st is None:
            _missing(ax, i)
            continue
        ax.bar(i, st.mean, yerr=_err(st), capsize=4, color=colors[i], edgecolor="black", linewidth=0.5)
    draw_chance(ax, summaries, key)
    ax.set_xticks(x, [s.variant for s in summaries], rotation=30, ha="right")
    ax.set_xlim(-0.6, len(summaries) - 0.4)  # keep slots of variants without a value (their 'n/a') in view
    ax.set_ylabel(metric_label(key))
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def plot_variant_bars(summaries: Sequence[VariantSummary], key: str, title: str | None = None) -> Figure:
    """Any experiment: one metric, one bar per variant (ablation order)."""
    fig = Figure(figsize=(max(4.0, 1.0 + 0.8 * len(summaries)), 3.8), layout="constrained")
    ax = fig.add_subplot()
    bars_per_variant(ax, summaries, key)
    ax.set_title(f"{metric_label(key)} per variant")
    fig.suptitle(title or key)
    fig.supxlabel(_seeds_note(summaries), fontsize=8)
    return fig


def plot_metric_grid(
    summaries: Sequence[VariantSummary], metrics: Sequence[str] = GRID_METRICS, title: str | None = None
) -> Figure:
    """Any experiment: one bar panel per metric that at least one variant logged."""
    keys = [k for k in metrics if any(k in s.stats for s in summaries)]
    if not keys:
        fig = Figure(figsize=(5, 2), layout="constrained")
        fig.add_subplot().text(0.5, 0.5, "no metric logged", ha="center", va="center")
        return fig
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    width = max(3.2, 0.6 * len(summaries) + 1.2)
    fig = Figure(figsize=(width * ncols, 3.3 * nrows), layout="constrained")
    for i, key in enumerate(keys):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        bars_per_variant(ax, summaries, key)
        ax.set_title(short_label(key), fontsize=10)
    fig.suptitle(f"{title or 'metrics per variant'} ({_seeds_note(summaries)})")
    return fig


# ---- roadmap -----------------------------------------------------------------------------------------------
def plot_roadmap(
    summaries: Sequence[VariantSummary], metrics: Sequence[str] = UNDERSTANDING, title: str | None = None
) -> Figure:
    """Understanding per variant in ablation order (a roadmap's stages), grouped bars per metric; dashed lines mark
    the first variant (the baseline) so that drops and recoveries read at a glance."""
    keys = [k for k in metrics if any(k in s.stats for s in summaries)] or list(metrics)
    fig = Figure(figsize=(max(6.0, 1.2 * len(summaries) + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(summaries))
    width = 0.8 / len(keys)
    for j, (key, color) in enumerate(zip(keys, _colors(len(keys)))):
        offset = (j - (len(keys) - 1) / 2) * width
        label: str | None = short_label(key)  # one legend entry per metric
        for i, s in enumerate(summaries):
            st = scaled(s.stats.get(key), key)
            if st is None:
                _missing(ax, i + offset)
                continue
            _grouped_bar(ax, i + offset, st, width, color, label)
            label = None
        base = scaled(summaries[0].stats.get(key), key) if summaries else None
        if base is not None:
            ax.axhline(base.mean, color=color, linestyle="--", linewidth=1, alpha=0.8)
        draw_chance(ax, summaries, key, color=color)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9)
    ax.set_xticks(x, [s.variant for s in summaries], rotation=20, ha="right")
    ax.set_xlim(-0.6, len(summaries) - 0.4)
    ax.set_xlabel("variant, in ablation order (in a roadmap each stage adds one change)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(f"{_seeds_note(summaries)}; dashed: the first variant", fontsize=9)  # the note names the chance lines
    fig.suptitle(title or "understanding per variant")
    return fig


# ---- loss conflict -----------------------------------------------------------------------------------------
def plot_loss_conflict(
    summaries: Sequence[VariantSummary],
    metrics: Sequence[str] = ("val/zeroshot_acc", "val/retrieval_r1", "val/linprobe_acc", "val/psnr"),
    title: str | None = None,
) -> Figure:
    """Grouped bars: supervision (recon / contra / both) on x, one bar per capacity; one panel per metric."""
    keys = [k for k in metrics if any(k in s.stats for s in summaries)] or list(metrics)
    sups = [s.params.get("loss.supervision", "?") for s in summaries]
    order = [v for v in SUPERVISION_ORDER if v in sups] + sorted(set(sups) - set(SUPERVISION_ORDER))
    caps: list[str] = []
    cell: dict[tuple[str, str], VariantSummary] = {}
    for s, sup in zip(summaries, sups):
        cap = s.capacity
        if cap not in caps:
            caps.append(cap)
        cell.setdefault((sup, cap), s)
    fig = Figure(figsize=(4.2 * len(keys), 4.2), layout="constrained")
    colors = _colors(len(caps))
    width = 0.8 / max(1, len(caps))
    legend: dict[str, object] = {}
    for k, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), k + 1)
        for i, sup in enumerate(order):
            if not any(s.stats.get(key) for cap in caps if (s := cell.get((sup, cap)))):
                _missing(ax, i, f"not logged with\nsupervision={sup}")  # e.g. PSNR without a decoder
        for j, cap in enumerate(caps):
            offset = (j - (len(caps) - 1) / 2) * width
            for i, sup in enumerate(order):
                s = cell.get((sup, cap))
                st = scaled(s.stats.get(key), key) if s is not None else None
                if st is None:
                    if any(cell.get((sup, c)) and cell[(sup, c)].stats.get(key) for c in caps):
                        _missing(ax, i + offset)
                    continue
                _grouped_bar(ax, i + offset, st, width, colors[j], cap)
        draw_chance(ax, summaries, key)
        ax.set_xticks(np.arange(len(order)), order)
        ax.set_xlim(-0.6, len(order) - 0.4)
        ax.set_xlabel("supervision")
        ax.set_ylabel(metric_label(key))
        ax.set_title(short_label(key), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if not label.startswith("chance"):  # the title says what the dotted lines are
                legend.setdefault(label, handle)
    if legend:
        fig.legend(legend.values(), legend.keys(), loc="outside right upper", fontsize=8, title="capacity")
    fig.suptitle(f"{title or 'loss conflict: supervision x capacity'} ({_seeds_note(summaries)})")
    return fig


def _mean_band(series: Sequence[Series]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Align seeds by step: steps, mean, CI half-width (0 where fewer than two seeds logged the step)."""
    by_step: dict[int, list[float]] = {}
    for s in series:
        for step, value in s:
            by_step.setdefault(step, []).append(value)
    steps = np.array(sorted(by_step))
    stats = [mean_ci(by_step[int(t)]) for t in steps]
    mean = np.array([st.mean for st in stats])
    half = np.array([st.ci if math.isfinite(st.ci) else 0.0 for st in stats])
    return steps, mean, half


def plot_grad_cos(
    cos: Mapping[str, Sequence[Series]],
    recon_norms: Mapping[str, Sequence[Series]] | None = None,
    contra_norms: Mapping[str, Sequence[Series]] | None = None,
    title: str | None = None,
) -> Figure:
    """Cosine between the reconstruction and contrastive gradients on the shared encoder over training steps
    (mean over seeds, shaded 95% CI), and the two gradient norms when given. variant -> one series per seed."""
    with_norms = bool(recon_norms or contra_norms)
    fig = Figure(figsize=(11 if with_norms else 6, 4.2), layout="constrained")
    ax = fig.add_subplot(1, 2 if with_norms else 1, 1)
    colors = dict(zip(cos, _colors(len(cos))))
    for variant, series in cos.items():
        steps, mean, half = _mean_band(series)
        ax.plot(
            steps,
            mean,
            color=colors[variant],
            label=f"{variant} (n={len(series)})",
            linewidth=1.5,
            marker="o",
            markersize=2.5,
        )
        ax.fill_between(steps, mean - half, mean + half, color=colors[variant], alpha=0.2, linewidth=0)
    ax.axhline(0.0, color="black", linewidth=0.8, linestyle=":")
    ax.set_xlabel("training step")
    ax.set_ylabel("cosine(grad recon, grad contra)")
    ax.set_title("gradient cosine (< 0: the losses conflict)", fontsize=10)
    ax.grid(alpha=0.3)
    if cos:
        ax.legend(fontsize=8)
    if with_norms:
        ax2 = fig.add_subplot(1, 2, 2)
        for norms, style, name in ((recon_norms or {}, "-", "recon"), (contra_norms or {}, "--", "contra")):
            for variant, series in norms.items():
                steps, mean, _ = _mean_band(series)
                ax2.plot(steps, mean, style, color=colors.get(variant, "gray"), label=f"{variant}: {name}")
        ax2.set_yscale("log")
        ax2.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax2.yaxis.set_major_formatter(ScalarFormatter())
        ax2.yaxis.set_minor_formatter(NullFormatter())
        ax2.set_xlabel("training step")
        ax2.set_ylabel("gradient L2 norm (log scale)")
        ax2.set_title("gradient norms on the shared encoder (mean over seeds)", fontsize=10)
        ax2.grid(alpha=0.3, which="both")
        ax2.legend(fontsize=7)
    fig.suptitle(title or "gradient conflict: reconstruction vs contrastive")
    return fig


# ---- codebook count ----------------------------------------------------------------------------------------
def plot_codebook_count(
    summaries: Sequence[VariantSummary],
    fidelity: Sequence[str] = FIDELITY,
    accuracy: Sequence[str] = UNDERSTANDING,
    title: str | None = None,
) -> Figure:
    """Fidelity and accuracy vs log2 vocabulary (bits per token); points labelled with codebooks x entries."""
    pts = sorted(
        (s for s in summaries if s.bits_per_token is not None and math.isfinite(s.bits_per_token)),
        key=lambda s: s.bits_per_token,
    )
    fid = [k for k in fidelity if any(k in s.stats for s in pts)]
    acc = [k for k in accuracy if any(k in s.stats for s in pts)]
    panels: list[list[str]] = [[k] for k in fid] + ([acc] if acc else [])
    if not panels:
        panels = [[fidelity[0]]]
    fig = Figure(figsize=(4.6 * len(panels), 4.0), layout="constrained")
    for p, keys in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), p + 1)
        for key, color in zip(keys, _colors(len(keys)) if len(keys) > 1 else ["tab:blue"]):
            xs, ys, es = [], [], []
            for s in pts:
                st = scaled(s.stats.get(key), key)
                if st is not None:
                    xs.append(s.bits_per_token)
                    ys.append(st.mean)
                    es.append(_err(st))
            ax.errorbar(
                xs, ys, yerr=None if None in es else es, marker="o", capsize=4, color=color, label=short_label(key)
            )
            draw_chance(ax, summaries, key, color=color)
        # the codebook shapes label the x axis, one per tick: labels beside points overlapped at close values
        ticks = sorted({s.bits_per_token for s in pts})
        names = {b: " / ".join(dict.fromkeys(s.codebook_shape for s in pts if s.bits_per_token == b)) for b in ticks}
        ax.set_xticks(ticks, [f"{b:g}\n{names[b]}" for b in ticks], fontsize=8)
        ax.set_xlabel("log2 vocabulary (bits per token)")
        ax.set_ylabel("accuracy (%)" if len(keys) > 1 else metric_label(keys[0]))
        ax.set_title("understanding" if len(keys) > 1 else short_label(keys[0]), fontsize=10)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: never over the points
    fig.suptitle(f"{title or 'codebook count'} ({_seeds_note(summaries)})")
    return fig


# ---- per-sub-codebook usage --------------------------------------------------------------------------------
def usage_columns(summary: VariantSummary) -> list[int]:
    """Sub-codebook indices i with a logged val/codebook_usage/<i>."""
    found = {int(m.group(1)) for r in summary.runs for k in r.metrics if (m := USAGE.match(k))}
    return sorted(found)


def plot_codebook_usage(summaries: Sequence[VariantSummary], title: str | None = None) -> Figure:
    """Heatmap: variant x sub-codebook, mean over seeds of the share of entries used on the validation set (%)."""
    rows = [s for s in summaries if usage_columns(s)]
    ncols = max((max(usage_columns(s)) + 1 for s in rows), default=1)
    grid = np.full((max(1, len(rows)), ncols), np.nan)
    for r, s in enumerate(rows):
        for i in usage_columns(s):
            st = mean_ci(s.metric_values(f"val/codebook_usage/{i}"))
            if st.n:
                grid[r, i] = 100.0 * st.mean
    fig = Figure(figsize=(max(4.5, 0.9 * ncols + 3), max(2.2, 0.55 * len(rows) + 1.6)), layout="constrained")
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("0.85")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    for r in range(grid.shape[0]):
        for c in range(ncols):
            if np.isfinite(grid[r, c]):
                ax.text(
                    c,
                    r,
                    f"{grid[r, c]:.0f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if grid[r, c] < 60 else "black",
                )
    ax.set_xticks(np.arange(ncols), [str(i) for i in range(ncols)])
    ax.set_yticks(np.arange(len(rows)), [s.variant for s in rows])
    ax.set_xlabel("sub-codebook index")
    ax.set_ylabel("variant")
    fig.colorbar(image, ax=ax, label="entries used on validation (%)")
    seeds = "/".join(map(str, sorted({len(s.runs) for s in rows}))) or "0"
    ax.set_title(f"mean over {seeds} seed(s); gray = no such sub-codebook", fontsize=9)
    fig.suptitle(title or "per-sub-codebook usage")
    return fig
