"""What `tokzoo fit` prints: tokzoo's own lines and nothing else (no Lightning tips, MLflow INFO, deprecation or
weights_only notes), progress in steps of max_steps (a live bar on a terminal, plain lines elsewhere), and the
libraries' logs again with --verbose. The real command runs in a subprocess with stdout a pipe (not a terminal)."""

from __future__ import annotations

import io
import logging
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import run_tokzoo, tiny_ablation
from rich.console import Console

from tokzoo.lit.callbacks import StepProgress
from tokzoo.output import LIBRARY_LOGGERS, VERBOSE_ENV, configure_output

NAME = r"[\w./-]+"  # a variant name (seeds add "/seed<k>")
# Every line tokzoo prints during a successful fit, on stdout or stderr.
TOKZOO_LINES = {
    "start": rf"{NAME}: (training for \d+ steps|resuming at step \d+/\d+)",
    "progress": rf"{NAME}: step \d+/\d+ \(\d+%\)( \| loss \S+)? \| [\d.]+ it/s \| \d+ images/s \| elapsed [\d:]+ \| "
    rf"ETA ([\d:]+|\?)",
    "validating": rf"{NAME}: validating at step \d+( \(\d+ batches\))?",
    "table title": r"\s*tokzoo fit: \S+\s*",
    "table": r"[┏┃┡│└].*[┓┃┩│┘]",
    "checkpoint": rf"{NAME}: checkpoint \S+, MLflow run [0-9a-f]+",
    "log record": r"tokzoo: .+",  # tokzoo's own warnings (tokzoo.output)
}
PROGRESS = re.compile(rf"(?P<name>{NAME}): step (?P<step>\d+)/(?P<total>\d+) ")
STEPS = 20  # plain lines every ceil(20 / 10) = 2 steps


def foreign(text: str) -> list[str]:
    """The lines of `text` that are none of tokzoo's."""
    return [line for line in text.splitlines() if not any(re.fullmatch(p, line) for p in TOKZOO_LINES.values())]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The tiny two-variant ablation, quiet (STEPS steps) and with --verbose (3 steps), two processes at once."""
    quiet_dir, verbose_dir = tmp_path_factory.mktemp("quiet"), tmp_path_factory.mktemp("verbose")
    jobs = {
        "quiet": (["fit", str(tiny_ablation(quiet_dir)), f"trainer.max_steps={STEPS}"], quiet_dir),
        "verbose": (["fit", "--verbose", str(tiny_ablation(verbose_dir))], verbose_dir),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = dict(zip(jobs, pool.map(lambda job: run_tokzoo(job[0], job[1], timeout=420), jobs.values())))
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}: rc={proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return SimpleNamespace(**procs)


@pytest.mark.slow
def test_fit_prints_only_tokzoos_lines(runs):
    stray = foreign(runs.quiet.stdout) + foreign(runs.quiet.stderr)
    assert not stray, "lines that are not tokzoo's:\n" + "\n".join(stray)
    assert runs.quiet.stderr == "", runs.quiet.stderr  # a healthy run has nothing to warn about
    assert "tokzoo fit: tiny" in runs.quiet.stdout


@pytest.mark.slow
def test_plain_progress_lines_count_steps_of_max_steps(runs):
    lines = runs.quiet.stdout.splitlines()
    for variant in ("mcq", "rq"):
        steps = [(int(m["step"]), int(m["total"])) for m in map(PROGRESS.match, lines) if m and m["name"] == variant]
        assert steps == [(s, STEPS) for s in range(2, STEPS + 1, 2)], f"{variant}: {steps}"
        first = lines.index(f"{variant}: training for {STEPS} steps")
        assert lines[first + 1].startswith(f"{variant}: step 2/{STEPS} (10%) | loss ")
        assert lines[first + STEPS // 2 + 1].startswith(f"{variant}: validating at step {STEPS}")


@pytest.mark.slow
def test_verbose_shows_the_libraries_logs_again(runs):
    assert "GPU available" in runs.verbose.stderr  # Lightning's accelerator summary, one of the held-back lines
    assert foreign(runs.verbose.stdout + runs.verbose.stderr), "--verbose showed nothing beyond tokzoo's lines"
    assert re.search(r"^mcq: step 3/3 ", runs.verbose.stdout, re.M)  # tokzoo's own lines are still there


# ---------------------------------------------------------------- in process: the progress bar, the filters


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def training_step(self, batch, batch_idx):
        loss = (self.w * batch["image"].mean()) ** 2
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        images = [{"image": torch.randn(2, 3, 4, 4)} for _ in range(4)]  # 4 batches of 2 per epoch
        return torch.utils.data.DataLoader(images, batch_size=None)


def fit_tiny(bar: StepProgress, max_steps: int) -> None:
    trainer = L.Trainer(
        max_steps=max_steps, max_epochs=-1, logger=False, enable_checkpointing=False, enable_model_summary=False,
        callbacks=[bar], accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.fit(Tiny())


def test_plain_lines_every_n_steps_across_epochs():
    out = io.StringIO()
    fit_tiny(StepProgress("tiny", live=False, every=3, stream=out), max_steps=10)  # crosses two epoch boundaries
    lines = out.getvalue().splitlines()
    assert lines[0] == "tiny: training for 10 steps"
    assert [int(PROGRESS.match(line)["step"]) for line in lines[1:]] == [3, 6, 9, 10]
    assert all(re.fullmatch(TOKZOO_LINES["progress"], line) for line in lines[1:]), lines
    assert int(re.search(r"(\d+) images/s", lines[-1])[1]) > 0 and lines[-1].endswith("ETA 0:00")


def test_live_bar_on_a_terminal_counts_steps():
    screen = io.StringIO()
    bar = StepProgress("tiny", console=Console(file=screen, force_terminal=True, width=160))
    assert bar.live
    fit_tiny(bar, max_steps=6)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())  # without the terminal's control codes
    assert "tiny" in text and "6/6 steps" in text and "it/s" in text and "loss" in text
    assert "Epoch" not in text


@pytest.fixture
def clean_slate(monkeypatch):
    """Undo configure_output: logger levels and handlers, warning filters, the environment variables it sets."""
    names = (*LIBRARY_LOGGERS, "tokzoo")
    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).handlers)) for n in names}
    for var in (VERBOSE_ENV, "MLFLOW_LOGGING_LEVEL"):
        monkeypatch.delenv(var, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
    for n, (level, handlers) in saved.items():
        logging.getLogger(n).setLevel(level)
        logging.getLogger(n).handlers = handlers
    for var in (VERBOSE_ENV, "MLFLOW_LOGGING_LEVEL"):
        os.environ.pop(var, None)


def lightning_noise(monkeypatch) -> None:
    """Three held-back warnings, raised by Lightning's own code: the LeafSpec deprecation, the few-workers hint and
    the unused-GPU hint (as on a many-core GPU machine)."""
    from lightning.pytorch.accelerators import CPUAccelerator
    from lightning.pytorch.trainer import setup
    from lightning.pytorch.trainer.connectors import data_connector
    from lightning.pytorch.utilities._pytree import _tree_flatten

    _tree_flatten(1)
    monkeypatch.setattr(data_connector, "suggested_max_num_workers", lambda devices: 8)
    stub = SimpleNamespace(num_devices=1, reload_dataloaders_every_n_epochs=0, accelerator=CPUAccelerator())
    data_connector._worker_check(stub, torch.utils.data.DataLoader([1]), "train_dataloader")
    monkeypatch.setattr(setup.CUDAAccelerator, "is_available", staticmethod(lambda: True))
    setup._log_device_info(stub)


def test_quiet_output_holds_library_noise_back_and_keeps_tokzoos_and_real_warnings(clean_slate, monkeypatch, capsys):
    configure_output(verbose=False)
    lightning_noise(monkeypatch)
    warnings.warn("a real warning of some library", UserWarning, stacklevel=1)
    logging.getLogger("tokzoo.data").warning("skipping unreadable image x.png")
    assert [str(w.message) for w in clean_slate] == ["a real warning of some library"]
    assert capsys.readouterr().err == "tokzoo: skipping unreadable image x.png\n"
    assert not logging.getLogger("lightning.pytorch.utilities.rank_zero").isEnabledFor(logging.INFO)
    assert not logging.getLogger("mlflow.store.db.utils").isEnabledFor(logging.INFO)
    assert logging.getLogger("lightning.pytorch").isEnabledFor(logging.WARNING)  # its warnings still show
    assert os.environ["MLFLOW_LOGGING_LEVEL"] == "WARNING" and VERBOSE_ENV not in os.environ


def test_verbose_output_leaves_the_libraries_alone(clean_slate, monkeypatch):
    configure_output(verbose=True)
    lightning_noise(monkeypatch)
    messages = [str(w.message) for w in clean_slate]
    assert any("LeafSpec" in m for m in messages) and any("does not have many workers" in m for m in messages)
    assert any("GPU available but not used" in m for m in messages)
    assert logging.getLogger("lightning.pytorch.utilities.rank_zero").isEnabledFor(logging.INFO)
    assert os.environ[VERBOSE_ENV] == "1" and "MLFLOW_LOGGING_LEVEL" not in os.environ  # sweep trials inherit it
    configure_output()  # a trial process: verbose from the environment
    assert logging.getLogger("lightning.pytorch").isEnabledFor(logging.INFO)


def test_readme_quick_start_says_what_fit_prints():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme[readme.index("## Quick start") : readme.index("## Commands")]
    assert "progress line" in start and "--verbose" in start
