"""The real `tokzoo` command in a subprocess: exit codes and messages for bad input, and `tokzoo fit` end to end
on a tiny ablation (MLflow runs, params, metrics, tags, artifacts, checkpoints)."""

from __future__ import annotations

import math
import re
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_BASE, run_tokzoo, sqlite_uri, tiny_ablation, tokzoo_command, write_yaml
from PIL import Image

from tokzoo.config import flatten, load_variants
from tokzoo.quantizers import list_quantizers
from tokzoo.tracking import param_value
from tokzoo.weights import find_weights

QUANTIZER_NAMES = ", ".join(list_quantizers())  # the error for an unknown name lists every registered one


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- bad input: exit 2, one message, no traceback


@dataclass
class Case:
    args: list[str]
    expect: list[str]  # substrings of stderr (after joining wrapped lines)
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None


def _error_cases(root: Path) -> dict[str, Case]:
    """One case per layer that can reject input (config file, config keys, component build, trainer, tracking).
    Every process pays ~6 s of imports, so checks of pure config values stay in-process in test_config.py."""

    def folder(name: str) -> Path:
        d = root / name
        d.mkdir()
        return d

    def run_config(d: Path, **extra) -> str:
        return str(write_yaml(d / "run.yaml", {**TINY_BASE, "output_dir": str(d / "outputs"), **extra}))

    cases: dict[str, Case] = {}
    d = folder("unknown_key")
    cases["unknown_key"] = Case(
        ["fit", run_config(d, model={"quantiser": {"name": "rq"}})], ["model.quantiser", "quantizer", "encoder"], cwd=d
    )
    d = folder("unknown_quantizer")
    cases["unknown_quantizer"] = Case(
        ["fit", run_config(d), "model.quantizer.name=bogus"], ["bogus", QUANTIZER_NAMES], cwd=d
    )
    d = folder("fsq_levels")
    cases["fsq_levels"] = Case(
        ["fit", run_config(d), "model.quantizer={name: fsq, levels: [8, 5, 5], num_codebooks: 2, dim: 8}"],
        ["fsq", "levels", "dim=8"],
        cwd=d,
    )
    d = folder("unknown_trainer_key")
    cases["unknown_trainer_key"] = Case(
        ["fit", run_config(d), "trainer.bogus_key=1"], ["trainer.bogus_key", "max_steps"], cwd=d
    )
    d = folder("malformed_override")
    # `{a:b,c:[1]}` is not YAML flow syntax (no space after the colons): OmegaConf lets yaml's ScannerError out
    cases["malformed_override"] = Case(
        ["fit", run_config(d), "model.quantizer={name:fsq,levels:[8,5,5]}"], ["model.quantizer"], cwd=d
    )
    d = folder("malformed_yaml")
    broken = d / "broken.yaml"
    broken.write_text("name: x\nbase:\n  trainer:\n    max_steps: [3\nvariants: {}\n")
    cases["malformed_yaml"] = Case(["fit", str(broken)], [str(broken), "line "], cwd=d)
    d = folder("missing_file_with_a_rather_long_folder_name_so_that_the_path_is_longer_than_a_terminal_line")
    missing = d / "no_such_config_file_in_this_folder.yaml"
    cases["missing_file"] = Case(["fit", str(missing)], [str(missing), "does not exist"], cwd=d)
    d = folder("tracking")
    url = f"http://127.0.0.1:{closed_port()}"
    cases["unreachable_tracking"] = Case(
        ["fit", run_config(d)], [url, "unreachable"], env={"MLFLOW_TRACKING_URI": url}, cwd=d
    )
    # mcq dim 30 with 4 codebooks, in the second variant: rejected before the first one trains
    d = folder("bad_second_variant")
    abl = tiny_ablation(
        d, {"good": {}, "bad": {"model": {"quantizer": {"name": "mcq", "dim": 30, "num_codebooks": 4}}}}, name="abl"
    )
    cases["bad_second_variant"] = Case(["fit", str(abl)], ["variant 'bad'", "dim=30", "num_codebooks=4"], cwd=d)
    d = folder("dataset_argument")
    cases["dataset_argument"] = Case(
        ["fit", run_config(d), "data.kwargs.bogus_arg=1"], ["bogus_arg", "accepted"], cwd=d
    )
    d = folder("trainer_value")
    cases["trainer_value"] = Case(
        ["fit", run_config(d), "trainer.precision=bogus"], ["trainer.precision", "bogus"], cwd=d
    )
    d = folder("debug")
    cases["debug"] = Case(["--debug", "fit", str(d / "missing.yaml")], ["missing.yaml"], cwd=d)
    return cases


@pytest.fixture(scope="module")
def error_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Case, subprocess.CompletedProcess]]:
    """Every bad-input case through the real command, two at a time (each pays the import of torch/Lightning)."""
    cases = _error_cases(tmp_path_factory.mktemp("cli_errors"))
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = pool.map(lambda c: run_tokzoo(c.args, c.cwd, c.env, timeout=180), cases.values())
        return {name: (case, proc) for (name, case), proc in zip(cases.items(), procs)}


def _one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize(
    "name",
    [
        "unknown_key",
        "unknown_quantizer",
        "fsq_levels",
        "unknown_trainer_key",
        "malformed_override",
        "malformed_yaml",
        "missing_file",
        "unreachable_tracking",
        "bad_second_variant",
        "dataset_argument",
        "trainer_value",
    ],
)
def test_bad_input_exits_2_with_one_readable_message(error_runs, name):
    case, proc = error_runs[name]
    report = f"rc={proc.returncode}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 2, report
    assert "Traceback" not in proc.stderr, report
    lines = proc.stderr.strip().splitlines()
    # one message, on one line (not hard-wrapped at 80 columns: paths and key names stay greppable)
    assert len(lines) == 1 and lines[0].startswith("error: "), report
    for text in case.expect:
        assert text in _one_line(proc.stderr), f"{text!r} not in the message\n{report}"
    assert not (case.cwd / "outputs").exists(), "nothing may be written for a bad config"


def test_bad_variant_fails_before_any_run_starts(error_runs):
    case, proc = error_runs["bad_second_variant"]
    assert proc.returncode == 2
    assert not (case.cwd / "outputs").exists()  # the good first variant did not train
    assert_no_runs(case.cwd)


def test_bad_dataset_argument_fails_before_any_run_starts(error_runs):
    case, proc = error_runs["dataset_argument"]
    assert proc.returncode == 2
    assert_no_runs(case.cwd)


def assert_no_runs(cwd: Path) -> None:
    import mlflow

    if not (cwd / "mlflow.db").exists():
        return
    client = mlflow.MlflowClient(sqlite_uri(cwd))
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert runs == [], f"runs were created for a bad config: {[(r.info.run_name, r.info.status) for r in runs]}"


def test_debug_shows_the_traceback(error_runs):
    case, proc = error_runs["debug"]
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr
    assert "ConfigError" in proc.stderr
    assert "missing.yaml" in proc.stderr


def test_usage_errors_exit_2(tmp_path):
    proc = subprocess.run(tokzoo_command() + ["fit"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2
    assert "usage" in proc.stderr and "config" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- end to end


E2E_VARIANTS = {
    # both supervisions; grad_cos_every=1 also logs the recon/contra gradient cosine
    "mcq": {
        "model": {"quantizer": {"name": "mcq", "dim": 32, "num_codebooks": 4, "codebook_size": 64}},
        "loss": {"grad_cos_every": 1},
    },
    "rq": {"model": {"quantizer": {"name": "rq", "dim": 32, "depth": 2, "codebook_size": 64}}},
    "rec": {"loss": {"supervision": "recon"}},  # no text tower: no zero-shot accuracy
    "cont": {"model": {"quantizer": {"name": "none"}}},  # continuous baseline: no codebook metrics
}
FULL_METRICS = [
    "val/psnr",
    "val/ssim",
    "val/zeroshot_acc",
    "val/linprobe_acc",
    "val/codebook_usage",
    "val/perplexity",
    "val/dead_codes",
    "val/code_mi_bits",
    "val/code_class_nmi",
    "val/code_stability",
    "train/loss",
    "train/loss_recon",
    "train/loss_contra",
    "train/loss_quant",
    "perf/images_per_sec",
]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    import mlflow

    folder = tmp_path_factory.mktemp("e2e")
    path = tiny_ablation(folder, E2E_VARIANTS, name="tiny_e2e")
    _, variants = load_variants(path)  # resolved now, as the command will (defaults may change while it runs)
    proc = run_tokzoo(["fit", str(path)], cwd=folder, timeout=420)
    assert proc.returncode == 0, (
        f"tokzoo fit failed (rc={proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    )
    client = mlflow.MlflowClient(sqlite_uri(folder))
    experiment = client.get_experiment_by_name("tiny_e2e")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return SimpleNamespace(
        proc=proc,
        folder=folder,
        client=client,
        runs=runs,
        by_variant={r.data.tags.get("tokzoo.variant"): r for r in runs},
        variants={v.name: v for v in variants},
    )


def table_first_cells(stdout: str) -> list[str]:
    cells = []
    for line in stdout.splitlines():
        parts = re.split(r"[│┃|]", line)
        if len(parts) > 2:
            cells.append(parts[1].strip())
    return cells


def finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))


@pytest.mark.slow
def test_fit_prints_the_summary_table(e2e):
    assert "Traceback" not in e2e.proc.stderr
    assert "tokzoo fit: tiny_e2e" in e2e.proc.stdout
    rows = table_first_cells(e2e.proc.stdout)
    for name in E2E_VARIANTS:
        assert rows.count(name) == 1, f"variant {name} not once in the table:\n{e2e.proc.stdout}"


@pytest.mark.slow
def test_one_finished_run_per_variant(e2e):
    assert len(e2e.runs) == len(E2E_VARIANTS)
    assert sorted(e2e.by_variant) == sorted(E2E_VARIANTS)
    for name, run in e2e.by_variant.items():
        assert run.info.status == "FINISHED"
        assert run.info.run_name == name


@pytest.mark.slow
def test_runs_are_tagged(e2e):
    repo = Path(__file__).resolve().parents[1]
    for name, run in e2e.by_variant.items():
        tags = run.data.tags
        assert tags["tokzoo.config_hash"] == e2e.variants[name].config_hash
        commit = tags["mlflow.source.git.commit"]
        assert commit
        if (repo / ".git").exists():
            assert re.fullmatch(r"[0-9a-f]{40}", commit), commit


@pytest.mark.slow
def test_params_are_every_resolved_value_flattened(e2e):
    for name, run in e2e.by_variant.items():
        params = run.data.params
        expected = {k: param_value(v) for k, v in flatten(e2e.variants[name].config).items()}
        missing = sorted(set(expected) - set(params))
        assert not missing, f"{name}: params not logged: {missing}"
        assert {k: params[k] for k in expected} == expected
        assert params["model.quantizer.name"] == e2e.variants[name].config["model"]["quantizer"]["name"]
        assert params["trainer.max_steps"] == "3"
    assert "model.quantizer.num_codebooks" not in e2e.by_variant["rq"].data.params  # section replaced, not merged


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mcq", "rq"])
def test_full_variants_log_every_metric(e2e, name):
    metrics = e2e.by_variant[name].data.metrics
    missing = [m for m in FULL_METRICS if m not in metrics]
    assert not missing, f"{name}: missing metrics {missing}; logged: {sorted(metrics)}"
    assert all(finite(v) for v in metrics.values()), metrics  # never NaN / inf
    assert 0 < metrics["val/codebook_usage"] <= 1
    assert metrics["val/perplexity"] >= 1
    assert metrics["val/dead_codes"] >= 0
    tags = e2e.by_variant[name].data.tags
    for acc in ("val/zeroshot_acc", "val/linprobe_acc"):
        # the class task (headline), each attribute the full captions name, and their mean; chance tagged beside
        for task in ("", "/color", "/size", "/position", "/background", "/mean"):
            assert 0 <= metrics[acc + task] <= 1, (acc + task, sorted(metrics))
        assert float(tags[f"chance.{acc}/size"]) == pytest.approx(1 / 3) and float(tags[f"chance.{acc}"]) == 0.1
        parts = [metrics[acc + t] for t in ("", "/color", "/size", "/position", "/background")]
        assert metrics[acc + "/mean"] == pytest.approx(sum(parts) / 5)
    assert metrics["val/psnr"] > 0 and -1 <= metrics["val/ssim"] <= 1
    assert metrics["perf/images_per_sec"] > 0
    assert 0 <= metrics["val/code_class_nmi"] <= 1 and 0 <= metrics["val/code_stability"] <= 1
    # train/loss is the weighted sum of its terms, so it is at least the (unit-weighted) recon term
    assert metrics["train/loss"] > 0
    assert ("train/grad_cos_recon_contra" in metrics) == (name == "mcq")


@pytest.mark.slow
def test_metrics_without_weights_are_absent_and_tagged(e2e):
    for metric, weights in (("val/lpips", "lpips_vgg"), ("val/rfid", "inception_fid")):
        if find_weights(weights) is not None:
            continue  # the weights are on this machine: the metric may be computed
        for name, run in e2e.by_variant.items():
            assert metric not in run.data.metrics, f"{name}: {metric} logged without weights"
            reason = run.data.tags.get(f"absent.{metric}", "")
            assert "weights" in reason, f"{name}: tag absent.{metric} missing or says no reason: {reason!r}"


@pytest.mark.slow
def test_recon_grid_is_an_artifact(e2e):
    for name, run in e2e.by_variant.items():
        artifacts = [a.path for a in e2e.client.list_artifacts(run.info.run_id)]
        assert "recon_grid.png" in artifacts, f"{name}: {artifacts}"
        local = e2e.client.download_artifacts(run.info.run_id, "recon_grid.png", str(e2e.folder / "dl" / name))
        with Image.open(local) as img:
            width, height = img.size
        assert height >= 2 * 32 and width >= 4 * 32  # two rows (originals, reconstructions) of grid_images=4


@pytest.mark.slow
def test_one_checkpoint_per_variant(e2e):
    for name, variant in e2e.variants.items():
        folder = Path(variant.config["output_dir"]) / "tiny_e2e" / name / "checkpoints"
        files = sorted(folder.glob("*.ckpt"), key=lambda f: f.stat().st_mtime)
        assert files, f"{name}: no checkpoint in {folder}"
        ckpt = torch.load(files[-1], map_location="cpu", weights_only=False)  # the newest holds the final state
        assert ckpt["global_step"] == 3
        assert ckpt["hyper_parameters"]["config"] == variant.config
        state = ckpt["state_dict"]
        assert any(k.startswith("model.encoder.") for k in state)
        for key, tensor in state.items():
            if tensor.is_floating_point():
                assert torch.isfinite(tensor).all(), f"{name}: {key} is not finite"


@pytest.mark.slow
def test_recon_variant_has_no_zero_shot(e2e):
    run = e2e.by_variant["rec"]
    metrics = run.data.metrics
    assert "val/zeroshot_acc" not in metrics and "train/loss_contra" not in metrics
    assert "recon" in run.data.tags.get("absent.val/zeroshot_acc", "")
    for metric in ("val/psnr", "val/linprobe_acc", "val/codebook_usage", "train/loss_recon"):
        assert metric in metrics


@pytest.mark.slow
def test_continuous_variant_runs(e2e):
    run = e2e.by_variant["cont"]
    metrics = run.data.metrics
    assert run.data.params["model.quantizer.name"] == "none"
    for metric in ("val/psnr", "val/ssim", "val/zeroshot_acc", "val/linprobe_acc", "train/loss"):
        assert metric in metrics
    assert all(finite(v) for v in metrics.values()), metrics
    for metric in ("val/codebook_usage", "val/perplexity", "val/dead_codes", "val/code_mi_bits", "val/code_stability"):
        assert metric not in metrics
        assert "continuous" in run.data.tags.get(f"absent.{metric}", "")


@pytest.mark.parametrize(
    ("trainer", "ddp"),
    [
        ({"strategy": "ddp", "devices": 2, "accelerator": "cpu"}, True),
        ({"strategy": "auto", "devices": 2, "accelerator": "cpu"}, True),  # auto on several devices is DDP too
        ({"strategy": "auto", "devices": 1, "accelerator": "cpu"}, False),
        ({"strategy": "auto", "devices": 1, "num_nodes": 2, "accelerator": "cpu"}, True),
    ],
)
def test_auto_strategy_on_several_devices_gets_the_ddp_settings(trainer, ddp):
    from lightning.pytorch.strategies import DDPStrategy

    from tokzoo.runner import trainer_kwargs

    kwargs = trainer_kwargs({"trainer": {"max_steps": 5, **trainer}})
    if ddp:  # the quantizers sync their own state: no per-forward broadcast of rank 0's buffers
        assert (
            isinstance(kwargs["strategy"], DDPStrategy) and kwargs["strategy"]._ddp_kwargs["broadcast_buffers"] is False
        )
    else:
        assert kwargs["strategy"] == "auto"
