"""`tokzoo compare NAME --by budget` and the plots' honesty rules, against experiments written directly with
MlflowClient (no training): order flips between budgets, chance lines, no error bars with one seed."""

from __future__ import annotations

import pytest
from conftest import run_tokzoo, sqlite_uri
from matplotlib.container import ErrorbarContainer
from test_analysis import CAPACITY, make_experiment

from tokzoo.analysis import load_experiment, summarize
from tokzoo.analysis.budgets import by_budget, order_flips, plot_budgets, report
from tokzoo.analysis.plots import chance_level, plot_metric_grid
from tokzoo.errors import TokzooError

# PSNR per (variant, budget): rq leads at 200 steps, mcq at 800 (a flip beyond the seeds' spread); retrieval keeps
# its order (mcq ahead at both budgets)
PSNR = {("mcq", 200): 19.0, ("rq", 200): 21.0, ("mcq", 800): 24.0, ("rq", 800): 22.0}
RETRIEVAL = {("mcq", 200): 0.30, ("rq", 200): 0.20, ("mcq", 800): 0.50, ("rq", 800): 0.40}
VARIANTS = {
    f"{q}/steps{b}": {**CAPACITY["mcq_attention"], "trainer.max_steps": b} for q in ("mcq", "rq") for b in (200, 800)
}


def _metrics(variant: str, seed: int) -> dict[str, float]:
    family, steps = variant.split("/steps")
    key = (family, int(steps))
    return {
        "val/psnr": PSNR[key] + 0.1 * seed,
        "val/retrieval_r1": RETRIEVAL[key] + 0.01 * seed,
        "val/zeroshot_acc": 0.12 + 0.01 * seed,
        "val/zeroshot_acc/size": 0.40 + 0.01 * seed,
    }


def _chance(variant: str, seed: int) -> dict[str, str]:
    return {"chance.val/zeroshot_acc": "0.1", "chance.val/zeroshot_acc/size": "0.333333"}


@pytest.fixture(scope="module")
def budgets_db(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("budgets")
    uri = sqlite_uri(folder)
    make_experiment(uri, "budgets", VARIANTS, _metrics, tags=_chance)
    make_experiment(uri, "one_seed", {"mcq": CAPACITY["mcq_attention"]}, _metrics_one, tags=_chance, seeds=(0,))
    return folder, uri


def _metrics_one(variant: str, seed: int) -> dict[str, float]:
    return {"val/psnr": 20.0, "val/zeroshot_acc": 0.2}


def test_flips_are_found_and_kept_orders_are_not(budgets_db):
    _, uri = budgets_db
    families = by_budget(summarize(load_experiment("budgets", uri)))
    assert list(families) == ["mcq", "rq"] and sorted(families["mcq"]) == [200, 800]
    flips = order_flips(families)
    assert [(f.metric, f.first, f.second) for f in flips] == [("val/psnr", "mcq", "rq")]
    (gap200, clear200), (gap800, clear800) = flips[0].gaps[200], flips[0].gaps[800]
    assert gap200 == pytest.approx(-2.0) and gap800 == pytest.approx(2.0) and clear200 and clear800
    lines = report(families)
    assert any(line.startswith("order flips between budgets: PSNR") for line in lines)
    assert any("retrieval R@1 by budget: mcq (200: " in line for line in lines)


def test_compare_by_budget_prints_flips_and_plots(budgets_db, tmp_path):
    folder, uri = budgets_db
    proc = run_tokzoo(["compare", "budgets", "--by", "budget", "--format", "md", "--plot", str(tmp_path)], cwd=folder)
    assert proc.returncode == 0, proc.stderr
    assert "- order flips between budgets: PSNR (dB): mcq - rq = 200: -2 (clear), 800: +2 (clear)" in proc.stdout
    assert (tmp_path / "budgets.png").read_bytes()[:4] == b"\x89PNG"
    fig = plot_budgets(by_budget(summarize(load_experiment("budgets", uri))))
    panel = next(ax for ax in fig.axes if ax.get_title() == "zero-shot acc (size)")
    chance = [line.get_ydata()[0] for line in panel.lines if line.get_linestyle() == ":"]
    assert chance == [pytest.approx(100 / 3, rel=1e-4)]
    # an experiment without budgets: one clear message, exit 2
    none = run_tokzoo(["compare", "one_seed", "--by", "budget"], cwd=folder)
    assert none.returncode == 2 and "budgets=[200,800]" in none.stderr and "Traceback" not in none.stderr


def test_accuracy_panels_draw_chance_and_one_seed_has_no_error_bars(budgets_db):
    _, uri = budgets_db
    summaries = summarize(load_experiment("budgets", uri))
    assert chance_level(summaries, "val/zeroshot_acc") == pytest.approx(10.0)  # percent, as the panel is
    assert chance_level(summaries, "val/psnr") is None
    fig = plot_metric_grid(summaries)
    acc = next(ax for ax in fig.axes if ax.get_title() == "zero-shot acc")
    assert [line.get_ydata()[0] for line in acc.lines if line.get_linestyle() == ":"] == [pytest.approx(10.0)]
    assert any(isinstance(c, ErrorbarContainer) for c in acc.containers)  # 3 seeds: intervals drawn

    one = summarize(load_experiment("one_seed", uri))
    fig = plot_metric_grid(one)
    assert "no confidence interval" in fig.get_suptitle() and "95% CI" not in fig.get_suptitle()
    for ax in fig.axes:
        assert not any(isinstance(c, ErrorbarContainer) for c in ax.containers), ax.get_title()
    with pytest.raises(TokzooError, match="--by budget needs"):
        by_budget(one)
