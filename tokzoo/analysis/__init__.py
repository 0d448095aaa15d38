"""Analyses of ablation runs logged to MLflow: load runs, summarise over seeds, tables and figures.

from tokzoo.analysis import load_experiment, summarize, plots
exp = load_experiment("roadmap_from_clip")            # $MLFLOW_TRACKING_URI, else ./mlflow.db
exp.table()                                           # tidy pandas table, one row per run
summaries = summarize(exp)                            # per variant: mean and 95% t interval over seeds
plots.plot_roadmap(summaries)                         # matplotlib Figure (same code as `tokzoo compare --plot`)
"""

from tokzoo.analysis.compare import compare
from tokzoo.analysis.figures import write_plots
from tokzoo.analysis.runs import ExperimentRuns, RunRecord, list_experiments, load_experiment
from tokzoo.analysis.stats import Summary, mean_ci, t_quantile
from tokzoo.analysis.summary import COLUMNS, Column, VariantSummary, summarize

__all__ = [
    "COLUMNS",
    "Column",
    "ExperimentRuns",
    "RunRecord",
    "Summary",
    "VariantSummary",
    "compare",
    "list_experiments",
    "load_experiment",
    "mean_ci",
    "summarize",
    "t_quantile",
    "write_plots",
]
