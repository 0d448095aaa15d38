"""Each notebook in notebooks/ runs top to bottom against a tiny experiment (written with MlflowClient, no
training) picked through TOKZOO_EXPERIMENT / MLFLOW_TRACKING_URI, and draws its figures."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from conftest import sqlite_uri
from test_analysis import make_experiment

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

ROADMAP = {
    "clip": {"loss.supervision": "contra", "model.quantizer.name": "none", "model.factorization.name": "none",
             "model.quantizer.bits_per_token": "inf"},
    "discretization": {"loss.supervision": "contra", "model.quantizer.name": "vq",
                       "model.quantizer.codebook_size": "64", "model.factorization.name": "linear",
                       "model.quantizer.bits_per_token": "6.0"},
    "attention": {"model.quantizer.name": "mcq", "model.quantizer.num_codebooks": "2",
                  "model.quantizer.codebook_size": "64", "model.factorization.name": "attention",
                  "model.quantizer.bits_per_token": "12.0"},
}  # fmt: skip
CAPACITIES = {
    "vq_linear": {"model.quantizer.name": "vq", "model.quantizer.codebook_size": "64",
                  "model.factorization.name": "linear", "model.quantizer.bits_per_token": "6.0"},
    "mcq_attention": {"model.quantizer.name": "mcq", "model.quantizer.num_codebooks": "2",
                      "model.quantizer.codebook_size": "64", "model.factorization.name": "attention",
                      "model.quantizer.bits_per_token": "12.0"},
}  # fmt: skip
CONFLICT = {
    f"{sup}_{cap}": {**params, "loss.supervision": sup}
    for cap, params in CAPACITIES.items()
    for sup in ("recon", "contra", "both")
}
COUNTS = {
    f"{n}x{64 // n}": {"model.quantizer.name": "mcq", "model.quantizer.num_codebooks": str(n),
                       "model.quantizer.codebook_size": str(64 // n), "model.factorization.name": "attention",
                       "model.quantizer.bits_per_token": str(n * math.log2(64 // n))}
    for n in (1, 2, 4)
}  # fmt: skip
EXPERIMENTS = {"nb_roadmap": ROADMAP, "nb_conflict": CONFLICT, "nb_counts": COUNTS}


def fake_metrics(params: dict[str, str], seed: int) -> dict[str, float]:
    """Metrics as fit_variant would log them for these params (fidelity only with a decoder, etc.)."""
    sup = params.get("loss.supervision", "both")
    books = int(params.get("model.quantizer.num_codebooks", "1"))
    out: dict[str, float] = {"val/linprobe_acc": 0.4 + 0.02 * seed + 0.01 * books, "perf/wall_seconds": 5.0}
    if sup != "recon":
        out["val/zeroshot_acc"] = 0.3 + 0.03 * seed + 0.02 * books
    if sup != "contra":
        out["val/psnr"] = 18.0 + books + 0.3 * seed
    if params["model.quantizer.name"] != "none":
        out["val/codebook_usage"] = 0.7
        out["val/perplexity"] = 30.0 + seed
        out.update({f"val/codebook_usage/{i}": 0.6 + 0.05 * i + 0.01 * seed for i in range(books)})
    return out


def fake_histories(params: dict[str, str], seed: int) -> dict[str, list[tuple[int, float]]]:
    if params.get("loss.supervision", "both") != "both":
        return {}
    steps = range(0, 50, 10)
    return {
        "train/grad_cos_recon_contra": [(s, -0.1 + 0.004 * s + 0.01 * seed) for s in steps],
        "train/grad_norm_recon": [(s, 2.0 / (1 + s)) for s in steps],
        "train/grad_norm_contra": [(s, 0.5) for s in steps],
    }


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = sqlite_uri(tmp_path_factory.mktemp("notebooks"))
    for name, variants in EXPERIMENTS.items():
        make_experiment(
            uri,
            name,
            variants,
            metrics=lambda v, seed, variants=variants: fake_metrics(variants[v], seed),
            histories=lambda v, seed, variants=variants: fake_histories(variants[v], seed),
        )
    return uri


def kernel_available() -> bool:
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        return "python3" in KernelSpecManager().find_kernel_specs()
    except Exception:
        return False


@pytest.mark.parametrize(
    ("notebook", "experiment", "figures"),
    [("roadmap", "nb_roadmap", 2), ("loss_conflict", "nb_conflict", 2), ("codebooks", "nb_counts", 3)],
)
def test_notebook_runs(
    notebook: str, experiment: str, figures: int, tracking: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    if not kernel_available():
        pytest.skip("no 'python3' Jupyter kernel (install ipykernel in this environment)")
    monkeypatch.setenv("TOKZOO_EXPERIMENT", experiment)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    nb = nbformat.read(NOTEBOOKS / f"{notebook}.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs: list[dict[str, Any]] = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == figures
    text = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert f"### {experiment}" in text  # the env var picked the experiment
