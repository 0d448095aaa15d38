"""tokzoo.analysis and `tokzoo compare` against a tiny experiment written directly with MlflowClient, with the tags,
params and metrics `tokzoo fit` writes (no training: seconds)."""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import run_tokzoo, sqlite_uri

from tokzoo.analysis import load_experiment, mean_ci, summarize, t_quantile
from tokzoo.analysis.compare import csv_text, markdown, shown_columns
from tokzoo.analysis.runs import split_label
from tokzoo.errors import TokzooError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SEEDS = (0, 1, 2)
# Final PSNR per (variant, seed), chosen so that mean and CI are easy to recompute by hand below.
PSNR = {"vq_linear": (20.0, 21.0, 23.0), "mcq_attention": (24.0, 24.5, 25.5)}
CAPACITY = {
    "vq_linear": {"model.quantizer.name": "vq", "model.quantizer.codebook_size": "256",
                  "model.factorization.name": "linear", "model.quantizer.bits_per_token": "8.0"},
    "mcq_attention": {"model.quantizer.name": "mcq", "model.quantizer.codebook_size": "256",
                      "model.quantizer.num_codebooks": "4", "model.factorization.name": "attention",
                      "model.quantizer.bits_per_token": "32.0"},
}  # fmt: skip


def log_run(
    client: Any,
    experiment_id: str,
    label: str,
    params: dict[str, Any],
    metrics: dict[str, float],
    histories: dict[str, list[tuple[int, float]]] | None = None,
    tags: dict[str, str] | None = None,
    status: str = "FINISHED",
) -> str:
    """One run as tokzoo.runner.fit_variant leaves it."""
    from mlflow.entities import Metric, Param

    run = client.create_run(
        experiment_id, run_name=label, tags={"tokzoo.variant": label, "tokzoo.config_hash": "0" * 12, **(tags or {})}
    )
    now = int(time.time() * 1000)
    points = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
    for key, series in (histories or {}).items():
        points += [Metric(key, float(v), now + i, step) for i, (step, v) in enumerate(series)]
    client.log_batch(run.info.run_id, metrics=points, params=[Param(k, str(v)) for k, v in params.items()])
    client.set_terminated(run.info.run_id, status)
    time.sleep(0.002)  # distinct start times keep the ablation order
    return run.info.run_id


def make_experiment(
    uri: str,
    name: str,
    variants: dict[str, dict[str, Any]],
    metrics: Callable[[str, int], dict[str, float]],
    histories: Callable[[str, int], dict[str, list[tuple[int, float]]]] | None = None,
    tags: Callable[[str, int], dict[str, str]] | None = None,
    seeds: tuple[int, ...] = SEEDS,
) -> str:
    """variants: name -> params (besides seed); one FINISHED run per variant and seed, labelled 'name/seed<k>'."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(name)
    for variant, params in variants.items():
        for seed in seeds:
            log_run(
                client,
                exp_id,
                f"{variant}/seed{seed}",
                {"seed": seed, "loss.supervision": "both", "tracking.experiment": name, **params},
                metrics(variant, seed),
                histories(variant, seed) if histories else None,
                tags(variant, seed) if tags else None,
            )
    return exp_id


def tiny_metrics(variant: str, seed: int) -> dict[str, float]:
    books = 4 if variant == "mcq_attention" else 1
    out = {
        "val/psnr": PSNR[variant][seed],
        "val/zeroshot_acc": 0.3 + 0.1 * (variant == "mcq_attention") + 0.01 * seed,
        "val/linprobe_acc": 0.5 + 0.05 * seed,
        "val/codebook_usage": 0.6,
        "perf/wall_seconds": 10.0 + seed,
    }
    out.update({f"val/codebook_usage/{i}": 0.5 + 0.1 * i for i in range(books)})
    return out


def tiny_histories(variant: str, seed: int) -> dict[str, list[tuple[int, float]]]:
    shift = 0.1 if variant == "mcq_attention" else 0.0
    return {
        "train/grad_cos_recon_contra": [(s, -0.2 + shift + 0.01 * s + 0.01 * seed) for s in (0, 10, 20)],
        "train/grad_norm_recon": [(s, 1.0 + 0.1 * s) for s in (0, 10, 20)],
        "train/grad_norm_contra": [(s, 0.5) for s in (0, 10, 20)],
    }


def tiny_tags(variant: str, seed: int) -> dict[str, str]:
    return {"absent.val/rfid": "Inception weights not found"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(folder, uri) of a sqlite db holding experiment 'tiny' (2 variants x 3 seeds), a second experiment
    'other', a FAILED run and an older duplicate of one variant/seed (both must be left out)."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("analysis")
    uri = sqlite_uri(folder)
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("tiny")
    # an older run of vq_linear/seed0 with a PSNR no mean below uses: the later run must replace it
    log_run(client, exp_id, "vq_linear/seed0", {"seed": 0, **CAPACITY["vq_linear"]}, {"val/psnr": 99.0})
    log_run(client, exp_id, "vq_linear/seed1", {"seed": 1, **CAPACITY["vq_linear"]}, {"val/psnr": 0.0}, status="FAILED")
    for variant, params in CAPACITY.items():
        for seed in SEEDS:
            log_run(
                client, exp_id, f"{variant}/seed{seed}", {"seed": seed, "loss.supervision": "both", **params},
                tiny_metrics(variant, seed), tiny_histories(variant, seed), tiny_tags(variant, seed),
            )  # fmt: skip
    client.create_experiment("other")
    return folder, uri


def test_t_quantile_matches_tables() -> None:
    # two-sided 95% critical values from any t table
    for df, value in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423), (1000, 1.9623)):
        assert t_quantile(0.975, df) == pytest.approx(value, abs=1e-4)
    assert t_quantile(0.025, 5) == pytest.approx(-t_quantile(0.975, 5))
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 7, 29, 31, 150, 250, 5000):
        for p in (0.6, 0.9, 0.975, 0.999):
            assert t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-8)


def test_mean_ci_by_hand() -> None:
    s = mean_ci([20.0, 21.0, 23.0])
    mean = 64.0 / 3
    sd = math.sqrt(((20 - mean) ** 2 + (21 - mean) ** 2 + (23 - mean) ** 2) / 2)
    assert (s.n, s.mean, s.std) == (3, pytest.approx(mean), pytest.approx(sd))
    assert s.ci == pytest.approx(4.302652729749 * sd / math.sqrt(3))
    one = mean_ci([5.0, None, float("nan")])
    assert one.n == 1 and one.mean == 5.0 and math.isnan(one.ci)
    assert mean_ci([]).n == 0


def test_split_label() -> None:
    assert split_label("mcq/seed12") == ("mcq", 12)
    assert split_label("a/b") == ("a/b", None)


def test_tidy_table(tiny: tuple[Path, str]) -> None:
    exp = load_experiment("tiny", tiny[1])
    assert exp.variants == ["vq_linear", "mcq_attention"]
    assert exp.skipped == {"FAILED": 1} and exp.superseded == 1
    frame = exp.table()
    assert len(frame) == 6
    assert list(frame["variant"]) == ["vq_linear"] * 3 + ["mcq_attention"] * 3
    assert list(frame["seed"]) == [0, 1, 2, 0, 1, 2]
    assert list(frame["metrics.val/psnr"]) == [*PSNR["vq_linear"], *PSNR["mcq_attention"]]
    assert set(frame["params.model.quantizer.name"]) == {"vq", "mcq"}
    assert math.isnan(frame["metrics.val/codebook_usage/3"].iloc[0])  # vq has one sub-codebook
    run = exp.runs_of("mcq_attention")[1]
    assert run.bits_per_token == 32.0 and run.absent == {"val/rfid": "Inception weights not found"}
    steps, values = zip(*exp.history(run.run_id, "train/grad_cos_recon_contra"))
    assert steps == (0, 10, 20) and values == pytest.approx((-0.09, 0.01, 0.11))
    hist = exp.history_table("train/grad_cos_recon_contra")
    assert len(hist) == 18 and set(hist["step"]) == {0, 10, 20}


def test_summary_mean_and_ci(tiny: tuple[Path, str]) -> None:
    summaries = summarize(load_experiment("tiny", tiny[1]))
    vq = summaries[0]
    expected = mean_ci(PSNR["vq_linear"])
    assert vq.stats["val/psnr"].mean == pytest.approx(64.0 / 3)
    assert vq.stats["val/psnr"].ci == pytest.approx(expected.ci)
    # grad cos: each run is summarised by its mean over steps, then over seeds
    per_run = [(-0.2 + 0.01 * s) + 0.1 for s in SEEDS]  # mean of steps 0, 10, 20 = value at step 10
    assert vq.stats["train/grad_cos_recon_contra:mean_over_steps"].mean == pytest.approx(sum(per_run) / 3)
    assert vq.params["model.quantizer.name"] == "vq" and "seed" not in vq.params
    keys = [c.key for c in shown_columns(summaries)]
    assert "val/rfid" not in keys and "val/psnr" in keys
    md = markdown(load_experiment("tiny", tiny[1]), summaries, shown_columns(summaries))
    assert "| vq_linear | 3 | 8 | 21.3 ± 3.8 |" in md
    # rfid is never logged, so it has no column, but the reason is given
    assert "val/rfid absent for vq_linear, mcq_attention: Inception weights not found" in md


def parse_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_compare_csv_subprocess(tiny: tuple[Path, str]) -> None:
    folder, uri = tiny
    proc = run_tokzoo(["compare", "tiny", "--format", "csv"], cwd=folder, env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr
    rows = parse_csv(proc.stdout)
    assert [r["variant"] for r in rows] == ["vq_linear", "mcq_attention"]
    assert rows[0]["n_runs"] == "3" and rows[1]["bits_per_token"] == "32.0"
    assert float(rows[0]["val/psnr.mean"]) == pytest.approx(64.0 / 3)
    assert float(rows[0]["val/psnr.ci95"]) == pytest.approx(mean_ci(PSNR["vq_linear"]).ci)
    assert rows[1]["val/zeroshot_acc.n"] == "3"
    assert "val/rfid.mean" not in rows[0]  # never logged: no column
    assert parse_csv(csv_text(summarize(load_experiment("tiny", uri)), [])) == [
        {"variant": "vq_linear", "n_runs": "3", "bits_per_token": "8.0"},
        {"variant": "mcq_attention", "n_runs": "3", "bits_per_token": "32.0"},
    ]


def test_compare_plots_and_markdown(tiny: tuple[Path, str]) -> None:
    folder, uri = tiny
    out = folder / "plots"
    proc = run_tokzoo(["compare", "tiny", "--format", "md", "--plot", str(out), "--tracking-uri", uri], cwd=folder)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("### tiny") and "± " in proc.stdout
    names = {p.name for p in out.iterdir()}
    # supervision is the same everywhere: no loss-conflict bars; bits differ but one supervision: codebook curves
    assert names == {"metrics.png", "understanding.png", "grad_cos.png", "codebook_count.png", "codebook_usage.png"}
    for path in out.iterdir():
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, path


def test_unknown_experiment_exit_2(tiny: tuple[Path, str]) -> None:
    folder, uri = tiny
    proc = run_tokzoo(["compare", "nope"], cwd=folder, env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 2
    assert "nope" in proc.stderr and "known experiments: other, tiny" in proc.stderr
    assert "Traceback" not in proc.stderr
    with pytest.raises(TokzooError, match="no MLflow database"):
        load_experiment("tiny", sqlite_uri(folder / "missing"))
