"""Runs on a real `mlflow server` (127.0.0.1, SQLite backend, proxied artifacts): the pending-calls journal on its
own, and `tokzoo fit` through the real CLI while the server is stopped for about 20 s and started again on the
same store, with MLflow's HTTP retries on and off (off stands for an outage longer than the retry window)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_tokzoo, tokzoo_command, write_yaml

from tokzoo.errors import ConfigError
from tokzoo.tracking_buffer import JOURNAL_NAME, BufferedClient, replay_pending, server_answers

URL_ENV = "TOKZOO_TEST_MLFLOW_URL"  # a server .ci/run started for the whole suite
OUTAGE_S = 20.0
STEPS = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on a free loopback port, with its store (SQLite + artifacts folder) under root; stop() and
    start() again keep the port and the store, as a maintenance restart would."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        root.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    def start(self, timeout_s: float = 120) -> None:
        script = Path(sys.executable).with_name("mlflow")
        command = [str(script)] if script.is_file() else [sys.executable, "-m", "mlflow"]
        command += ["server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        command += ["--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}"]
        command += ["--serve-artifacts", "--artifacts-destination", str(self.artifacts)]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no GenAI job workers: not used here
        with open(self.root / "server.log", "ab") as out:  # its own session: stop() ends its worker processes too
            self.proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not server_answers(self.url, timeout_s=2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (self.root / "server.log").read_text(errors="replace")[-1500:]
                pytest.skip(f"`mlflow server` did not start on {self.url}: {tail}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path / "server")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The suite's server ($TOKZOO_TEST_MLFLOW_URL, from .ci/run), else one of this module's own."""
    url = os.environ.get(URL_ENV)
    if url:
        if not server_answers(url):
            pytest.skip(f"${URL_ENV}={url} does not answer on /health")
        yield url
        return
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    server.start()
    yield server.url
    server.stop()


def test_journal_keeps_calls_while_down_and_replays_them_in_order(server_url, tmp_path, monkeypatch):
    """Calls to a server that does not answer go to the journal (artifacts as they were then); a later process
    sends them with their original steps and timestamps, once, skipping a line torn by a crash."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a closed port fails at once
    live = MlflowClient(server_url)
    exp = live.create_experiment(f"journal-{tmp_path.name}-{time.time_ns()}")
    run_id = live.create_run(exp).info.run_id
    folder = tmp_path / "variant"
    down = BufferedClient(f"http://127.0.0.1:{free_port()}", folder)

    start = time.monotonic()
    base = 1_700_000_000_000
    for step in range(10):
        down.log_batch(run_id, metrics=[Metric("train/loss", 1.0 / (step + 1), base + step, step)])
    down.log_metric(run_id, "val/psnr", 21.5, step=9)
    down.log_param(run_id, "model.quantizer.name", "mcq")
    down.set_tag(run_id, "tokzoo.complete", "true")
    grid = tmp_path / "recon_grid.png"
    grid.write_bytes(b"as logged")
    down.log_artifact(run_id, str(grid))
    grid.write_bytes(b"overwritten later")  # the journal sends the file as it was when logged
    down.set_terminated(run_id, "FINISHED", end_time=base + 99)
    assert time.monotonic() - start < 10, "calls waited on the unreachable server"
    assert down.pending == 15 and (folder / JOURNAL_NAME).is_file()
    assert not live.get_run(run_id).data.metrics, "nothing reached the server"
    with open(folder / JOURNAL_NAME, "a") as f:
        f.write('{"op": "batch", "run": "torn by a cr')  # the process died mid-write

    replay_pending(server_url, folder)
    run = live.get_run(run_id)
    history = live.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.timestamp) for m in history] == [(s, base + s) for s in range(10)]
    assert run.data.metrics["val/psnr"] == 21.5
    assert run.data.params["model.quantizer.name"] == "mcq"
    assert run.data.tags["tokzoo.complete"] == "true"
    assert run.info.status == "FINISHED" and run.info.end_time == base + 99
    got = Path(live.download_artifacts(run_id, "recon_grid.png", str(tmp_path / "download")))
    assert got.read_bytes() == b"as logged"
    assert not any(folder.iterdir()), "the journal and its copies are gone once sent"

    # a call the server refuses (an unknown run) is one clear message naming the file, not a silent loss
    refused = BufferedClient(f"http://127.0.0.1:{free_port()}", folder)
    refused.set_tag("0" * 32, "k", "v")
    with pytest.raises(ConfigError, match=JOURNAL_NAME):
        replay_pending(server_url, folder)


# How each fit meets the same outage. retries: MLflow's own retries (7, backing off) bridge 20 s, as they did before
# the journal. no_retries_*: every call to the stopped server fails at once, standing for an outage longer than the
# retry window; the journal keeps the calls (back-off 2 s) and sends them when the server answers, during training
# or at the end of the variant (wait), or, with no wait, when the same command runs again (rerun: the server stays
# down until that fit has ended).
CASES = {
    "retries": {},
    "no_retries_wait": {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "TOKZOO_TRACKING_RETRY_S": "2"},
    "no_retries_rerun": {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "TOKZOO_TRACKING_RETRY_S": "2", "TOKZOO_TRACKING_WAIT_S": "0",
    },
}  # fmt: skip


def fit_config(folder: Path, name: str) -> Path:
    """One small variant: tens of steps, every step logged, a recon grid at the end."""
    small = {"name": "vit_tiny", "width": 32, "depth": 1}
    config = {
        "data": {"batch_size": 8, "kwargs": {"num_train": 64, "num_val": 16}},
        "trainer": {"max_steps": STEPS, "log_every_n_steps": 1},
        "eval": {"grid_images": 4, "lpips": False, "rfid": False},
        "loss": {"supervision": "recon"},
        "model": {"encoder": small, "decoder": small},
        "output_dir": str(folder / "outputs"),
    }
    return write_yaml(folder / f"{name}.yaml", config)


def first_metric_everywhere(url: str, experiments: list[str], key: str, timeout_s: float) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(url)
    deadline = time.monotonic() + timeout_s
    waiting = set(experiments)
    while waiting and time.monotonic() < deadline:
        for name in sorted(waiting):
            exp = client.get_experiment_by_name(name)
            if exp is not None and any(key in r.data.metrics for r in client.search_runs([exp.experiment_id])):
                waiting.discard(name)
        time.sleep(0.5)
    assert not waiting, f"no {key} on the server after {timeout_s:.0f} s for {sorted(waiting)}"


@pytest.mark.slow
def test_fit_survives_server_restart(own_server, tmp_path):
    """Three fits log to one server, which goes away for 20 s once every run's first metrics are in and comes back
    on the same store: each run ends FINISHED and complete, with its metrics, every train/loss step and its grid
    in the server's artifact store, at the latest after one rerun of the same command."""
    from mlflow import MlflowClient

    started = time.monotonic()
    fits: dict[str, tuple[Path, subprocess.Popen]] = {}
    env = {**os.environ, "MLFLOW_TRACKING_URI": own_server.url, "PYTHONUNBUFFERED": "1"}
    try:
        for name, extra in CASES.items():
            folder = tmp_path / name
            config = fit_config(folder, name)
            with open(folder / "fit.log", "w") as out:
                command = [*tokzoo_command(), "fit", str(config)]
                proc = subprocess.Popen(command, cwd=folder, env={**env, **extra}, stdout=out, stderr=subprocess.STDOUT)
            fits[name] = (config, proc)
        first_metric_everywhere(own_server.url, list(CASES), "train/loss", timeout_s=240)
        own_server.stop()
        time.sleep(OUTAGE_S)
        fits["no_retries_rerun"][1].wait(timeout=240)  # it ends while the server is down, leaving its journal
        own_server.start()
        codes = {name: proc.wait(timeout=300) for name, (_, proc) in fits.items()}
    finally:
        for _, proc in fits.values():
            if proc.poll() is None:
                proc.kill()

    client = MlflowClient(own_server.url)
    for name, (config, _) in fits.items():
        folder = config.parent
        output = (folder / "fit.log").read_text()
        assert codes[name] == 0, f"{name}:\n{output[-4000:]}"
        (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
        reran = run.data.tags.get("tokzoo.complete") != "true"
        if reran:  # the fit ended while the server was down: the same command sends what was left
            again = run_tokzoo(["fit", str(config)], folder, env={"MLFLOW_TRACKING_URI": own_server.url})
            output += again.stdout + again.stderr
            assert again.returncode == 0 and "done earlier" in again.stdout, f"{name}:\n{output[-4000:]}"
            (run,) = client.search_runs([run.info.experiment_id])
        report = f"{name} (rerun: {reran}):\n{output[-4000:]}"
        assert run.info.status == "FINISHED" and run.data.tags.get("tokzoo.complete") == "true", report
        for key in ("val/psnr", "val/codebook_usage", "perf/wall_seconds"):
            assert key in run.data.metrics, (key, sorted(run.data.metrics), report)
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
        assert steps == list(range(STEPS)), (f"train/loss steps {steps}", report)
        assert "recon_grid.png" in [a.path for a in client.list_artifacts(run.info.run_id)], report
        assert not list(folder.glob("outputs/**/" + JOURNAL_NAME)), f"a journal was left behind: {report}"
        assert not (folder / "mlruns").exists() and not (folder / "mlartifacts").exists(), report
        assert reran == (name == "no_retries_rerun"), report
        if name != "retries":  # the log says when the server went away, what is pending, when it was sent
            assert "unreachable at" in output, report
            assert ("left pending by an earlier run" if reran else "answers again") in output, report
        print(f"{name}: rerun {reran}")
    assert len(list(own_server.artifacts.rglob("recon_grid.png"))) == len(CASES), "grids not in the server's store"
    print(f"outage test: {time.monotonic() - started:.0f} s")


def test_artifacts_outside_the_server_store_are_named(caplog):
    """An experiment whose artifact location is a plain path would have each client write grids on its own disk."""
    from tokzoo.tracking import check_artifact_store

    with caplog.at_level("WARNING", logger="tokzoo.tracking"):
        check_artifact_store("http://127.0.0.1:5000", "mlflow-artifacts:/3")
        check_artifact_store("sqlite:///mlflow.db", "file:///tmp/mlartifacts")
        assert not caplog.records
        check_artifact_store("http://127.0.0.1:5000", "/srv/mlruns/3")
    assert "--serve-artifacts" in caplog.text and "/srv/mlruns/3" in caplog.text


@pytest.mark.parametrize("value", ["soon", "-1"])
def test_bad_journal_setting_is_one_clear_message(tmp_path, monkeypatch, value):
    monkeypatch.setenv("TOKZOO_TRACKING_RETRY_S", value)
    with pytest.raises(ConfigError, match="TOKZOO_TRACKING_RETRY_S"):
        BufferedClient("http://127.0.0.1:5000", tmp_path)
