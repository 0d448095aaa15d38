"""`tokzoo compare --plot DIR`: choose and write the figures that fit an experiment's design."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from tokzoo.analysis import plots
from tokzoo.analysis.runs import ExperimentRuns
from tokzoo.analysis.study import load_study_points, plot_study
from tokzoo.analysis.summary import VariantSummary, distinct, is_supervision_grid
from tokzoo.errors import TokzooError


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
        save(plots.plot_roadmap(summaries, title=f"{name}: understanding per variant"), "understanding.png")
    if is_supervision_grid(summaries):
        save(plots.plot_loss_conflict(summaries, title=f"{name}: supervision x capacity"), "loss_conflict.png")
    cos = experiment.histories("train/grad_cos_recon_contra")
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
        and len(distinct(summaries, "loss.supervision")) <= 1
    ):
        save(plots.plot_codebook_count(summaries, title=f"{name}: codebooks at a fixed total"), "codebook_count.png")
    if any(plots.usage_columns(s) for s in summaries):
        save(plots.plot_codebook_usage(summaries, title=f"{name}: per-sub-codebook usage"), "codebook_usage.png")
    return written
