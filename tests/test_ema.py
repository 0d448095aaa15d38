"""EMA of the tokenizer's weights (tokzoo/lit/ema.py, config `ema`): the average after real optimizer steps against
one computed by hand from the recorded raw weights (warm-up included); validation on the EMA weights with the raw
weights' headline metrics beside them (val_raw/*), both recomputed from the final checkpoint; a run stopped by
SIGTERM and resumed ends with the EMA of an uninterrupted run, bit for bit.

The runs use one thread, which fixes the order of float reductions (so two histories of the same steps agree bit
for bit, as in test_reliability.py), and the in-process runner with a SQLite MLflow store of their own."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from conftest import TINY_BASE, sqlite_uri, write_yaml
from lightning.pytorch.utilities.exceptions import SIGTERMException

import tokzoo.runner as runner
from tokzoo.catalogue import HEADLINE, RAW_HEADLINE, lookup, raw_name
from tokzoo.config import config_hash, load_variants
from tokzoo.errors import ConfigError
from tokzoo.lit.ema import STATE_KEY, WeightEMA, ema_callback, ema_state_dict
from tokzoo.lit.module import TokenizerModule

STEPS = 6  # the resumed run is stopped after STEPS // 2
FAST_EVAL = {"grid_images": 2, "lpips": False, "rfid": False, "token_diagnostics": False, "linear_probe": False}


def config_file(folder: Path, ema: dict[str, Any], **base: Any) -> Path:
    config = {
        **TINY_BASE,
        "output_dir": str(folder / "outputs"),
        "checkpoint_every": STEPS // 2,
        "trainer": {"max_steps": STEPS, "log_every_n_steps": 1, "enable_progress_bar": False},
        "data": {"batch_size": 8, "kwargs": {"num_train": 64, "num_val": 16}},
        "eval": FAST_EVAL,
        "ema": ema,
        **base,
    }
    return write_yaml(folder / "ema.yaml", config)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- config


def test_ema_is_off_by_default_and_its_keys_are_validated(yaml_file):
    _, (variant,) = load_variants(yaml_file("off.yaml", {}))
    assert variant.config["ema"] == {"decay": 0.0, "warmup": True, "raw_metrics": True}
    assert ema_callback(variant.config) is None and ema_callback({}) is None
    on = {**variant.config, "ema": {"decay": 0.999, "warmup": False, "raw_metrics": True}}
    callback = ema_callback(on)
    assert isinstance(callback, WeightEMA) and callback.decay == 0.999 and not callback.warmup
    for bad, message in [(1.0, "must be < 1"), (-0.1, "must be >= 0"), ("high", "must be float")]:
        with pytest.raises(ConfigError, match=rf"ema\.decay.*{message}"):
            load_variants(yaml_file("bad.yaml", {"ema": {"decay": bad}}))
    with pytest.raises(ConfigError, match=r"ema\.warmup"):
        load_variants(yaml_file("bad.yaml", {"ema": {"decay": 0.9, "warmup": "yes"}}))
    with pytest.raises(ConfigError, match=r"unknown config key 'ema\.beta'"):
        load_variants(yaml_file("bad.yaml", {"ema": {"beta": 0.9}}))


def test_config_hash_sees_the_ema_only_when_it_is_on(yaml_file):
    _, (variant,) = load_variants(yaml_file("off.yaml", {}))
    config = variant.config
    without = {k: v for k, v in config.items() if k != "ema"}
    assert config_hash(config) == config_hash(without)  # runs from before the section keep their hash
    assert config_hash({**config, "ema": {**config["ema"], "warmup": False}}) == config_hash(config)
    assert config_hash({**config, "ema": {**config["ema"], "decay": 0.99}}) != config_hash(config)


def test_warmup_rule():
    ema = WeightEMA(0.3)
    assert [ema.decay_at(t) for t in (1, 2, 3, 100)] == [2 / 11, 3 / 12, 0.3, 0.3]
    assert WeightEMA(0.3, warmup=False).decay_at(1) == 0.3


def test_raw_metrics_are_catalogued_beside_the_headline():
    # every headline metric of validation has a raw twin; the generation probe's run once, after training, on the EMA
    validated = tuple(m for m in HEADLINE if not m.startswith("val/gen_"))
    assert RAW_HEADLINE == tuple(raw_name(m) for m in validated) and raw_name("val/psnr") == "val_raw/psnr"
    for name in RAW_HEADLINE:
        entry, ema_entry = lookup(name), lookup(name.replace("val_raw/", "val/"))
        assert entry is not None and not entry.headline and entry.direction == ema_entry.direction
        assert entry.header.startswith("raw ")


def test_an_exception_during_validation_puts_the_raw_weights_back():
    """A SIGTERM mid-validation: the checkpoint written next (checkpoint callbacks run after this one) must hold
    the raw weights, not the EMA swapped in for validation."""
    model = torch.nn.Linear(3, 2)
    ema, trainer, module = WeightEMA(0.5, warmup=False, raw_metrics=False), SimpleNamespace(), SimpleNamespace()
    trainer.global_step, trainer.sanity_checking, module.model = 0, False, model
    ema.on_train_start(trainer, module)
    with torch.no_grad():
        model.weight.add_(1.0)
    trainer.global_step = 1
    ema.on_train_batch_end(trainer, module, None, None, 0)
    raw = model.weight.detach().clone()
    ema.on_validation_epoch_start(trainer, module)
    assert torch.equal(model.weight, ema.ema[ema.names.index("model.weight")]) and not torch.equal(model.weight, raw)
    ema.on_exception(trainer, module, SIGTERMException())
    assert torch.equal(model.weight, raw)
    ema.on_exception(trainer, module, SIGTERMException())  # nothing swapped in: nothing changes
    assert torch.equal(model.weight, raw)


# ---------------------------------------------------------------- the average, by hand


class Recorder(L.Callback):
    """The tracked raw tensors at the start of training and after every optimizer step, plus the frozen ones."""

    def __init__(self, ema: WeightEMA):
        self.ema, self.raw, self.frozen, self.validated_on_ema = ema, [], {}, []

    def snapshot(self, module: L.LightningModule) -> dict[str, torch.Tensor]:
        state = module.state_dict()
        return {n: state[n].detach().clone().double() for n in self.ema.names}

    def on_train_start(self, trainer, module):
        self.raw.append(self.snapshot(module))
        self.frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.raw.append(self.snapshot(module))

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        state = module.state_dict()  # the weights validation runs on
        self.validated_on_ema.append(all(torch.equal(state[n], e) for n, e in zip(self.ema.names, self.ema.ema)))


def test_ema_matches_a_hand_computed_average(tmp_path, one_thread):
    """Real optimizer steps through the module and Lightning's Trainer (a frozen text tower, warm-up on, decay 0.3
    so that both branches of min(decay, (1 + t) / (10 + t)) occur); the validation at the end swaps the EMA in and
    the raw weights back out."""
    _, (variant,) = load_variants(config_file(tmp_path, {"decay": 0.3}), ["trainer.max_steps=4"])
    config = variant.config
    L.seed_everything(0, verbose=False)
    module = TokenizerModule(config)
    module.model.text_tower.requires_grad_(False)  # what an lr multiplier of 0 does to a part
    ema = WeightEMA(0.3, warmup=True, raw_metrics=False)
    recorder = Recorder(ema)
    kwargs = {**runner.trainer_kwargs(config), "enable_checkpointing": False, "enable_model_summary": False}
    trainer = L.Trainer(**kwargs, logger=False, callbacks=[ema, recorder])
    trainer.fit(module, datamodule=runner.build_datamodule(config))

    # What is averaged: the tokenizer's trainable parameters and floating-point persistent buffers, nothing else.
    trainable = {f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad}
    buffers = dict(module.model.named_buffers())
    persistent = set(module.model.state_dict()) - {n for n, _ in module.model.named_parameters()}
    float_buffers = {f"model.{n}" for n in persistent if buffers[n].is_floating_point()}
    assert set(ema.names) == trainable | float_buffers and trainable < set(ema.names)
    assert not [n for n in ema.names if n.startswith(("model.text_tower.", "objective.", "fidelity."))]

    assert len(recorder.raw) == 5 and ema.updates == 4
    expected = dict(recorder.raw[0])
    for t, raw in enumerate(recorder.raw[1:], start=1):
        d = min(0.3, (1 + t) / (10 + t))
        expected = {n: d * expected[n] + (1 - d) * raw[n] for n in expected}
    got = dict(zip(ema.names, ema.ema))
    worst = max(float((got[n].double() - expected[n]).abs().max()) for n in expected)
    assert worst < 1e-6, worst
    moved = max(float((got[n].double() - recorder.raw[-1][n]).abs().max()) for n in expected)
    assert moved > 1e-3  # the EMA is not the raw weights: the comparison above could fail

    # Validation ran on the EMA and put the raw weights back bit for bit; frozen and integer state untouched.
    assert recorder.validated_on_ema and all(recorder.validated_on_ema) and "val/psnr" in trainer.callback_metrics
    final = module.state_dict()
    assert [n for n in ema.names if not torch.equal(final[n].double(), recorder.raw[-1][n])] == []
    assert all(torch.equal(p, recorder.frozen[n]) for n, p in module.named_parameters() if n in recorder.frozen)
    steps = [int(b) for n, b in module.model.named_buffers() if n.endswith("tracker.step")]  # integer: not averaged
    assert recorder.frozen and steps == [4]


# ---------------------------------------------------------------- validation and resume, through the runner


def validate_by_hand(config: dict[str, Any], *weights: dict[str, torch.Tensor]) -> list[dict[str, float]]:
    """The module's own validation hooks over the validation set, once per set of weights, without Lightning."""
    datamodule = runner.build_datamodule(config)
    datamodule.setup("fit")
    module = TokenizerModule(config).eval()
    module.class_names = datamodule.class_names or None
    module.prompt_templates = list(datamodule.prompt_templates or module.prompt_templates)
    out: list[dict[str, float]] = []
    module.log = lambda name, value, **_: out[-1].__setitem__(name, float(value))  # what the hooks would log
    for state in weights:
        module.load_state_dict(state)
        out.append({})
        with torch.no_grad():
            module.on_validation_epoch_start()
            for i, batch in enumerate(datamodule.val_dataloader()):
                module.validation_step(batch, i)
            module.on_validation_epoch_end()
    return out


class SigtermAfter(runner.ImagesPerSecond):
    """The runner's throughput callback, which also sends this process SIGTERM after step `at` (Lightning's own
    handler turns it into a checkpoint and a SIGTERMException at the end of the step, as for `kill -TERM`)."""

    at = STEPS // 2

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step == self.at:
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One variant (EMA decay 0.9 with warm-up) trained STEPS steps uninterrupted, and the same variant in another
    experiment stopped by SIGTERM after STEPS // 2 steps, then resumed by the same call."""
    folder = tmp_path_factory.mktemp("ema")
    uri = sqlite_uri(folder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, (variant,) = load_variants(config_file(folder, {"decay": 0.9, "warmup": True}))
        whole = runner.fit_variant("whole", variant, uri)
        patch = pytest.MonkeyPatch()
        patch.setattr(runner, "ImagesPerSecond", SigtermAfter)
        with pytest.raises(SIGTERMException):
            runner.fit_variant("stopped", variant, uri)
        patch.undo()
        stopped_ckpt = runner.checkpoint_path("stopped", variant)
        at_stop = torch.load(stopped_ckpt, map_location="cpu", weights_only=True)
        resumed = runner.fit_variant("stopped", variant, uri)
    finally:
        torch.set_num_threads(threads)
    import mlflow

    client = mlflow.MlflowClient(uri)
    return SimpleNamespace(
        config=variant.config,
        whole=whole,
        resumed=resumed,
        at_stop=at_stop,
        run=client.get_run(whole.run_id),
        history=client.get_metric_history(whole.run_id, "val_raw/psnr"),
        final={r.status: torch.load(r.checkpoint, map_location="cpu", weights_only=True) for r in (whole, resumed)},
    )


@pytest.mark.slow
def test_validation_uses_the_ema_and_logs_the_raw_weights_beside_it(runs):
    metrics, run = runs.whole.metrics, runs.run
    assert runs.whole.status == "trained"
    present = [m for m in HEADLINE if m in metrics]
    assert "val/psnr" in present and "val/codebook_usage" in present
    assert all(raw_name(m) in metrics and raw_name(m) in run.data.metrics for m in present)
    assert not [k for k in metrics if k.startswith("val_raw/") and k not in RAW_HEADLINE]  # headline only
    assert [(h.step, h.value) for h in runs.history] == [(STEPS, pytest.approx(metrics["val_raw/psnr"]))]
    # the raw weights' metrics inherit the absence reasons of the EMA's
    assert run.data.tags["absent.val_raw/lpips"] == run.data.tags["absent.val/lpips"] == "eval.lpips=false"

    ckpt = runs.final["trained"]
    assert ckpt["callbacks"][STATE_KEY]["updates"] == STEPS
    by_ema, by_raw = validate_by_hand(runs.config, ema_state_dict(ckpt), ckpt["state_dict"])
    assert not math.isclose(by_ema["val/psnr"], by_raw["val/psnr"], rel_tol=1e-4)  # EMA and raw differ
    for m in present:
        assert metrics[m] == pytest.approx(by_ema[m], rel=1e-5, abs=1e-6), m
        assert metrics[raw_name(m)] == pytest.approx(by_raw[m], rel=1e-5, abs=1e-6), m


@pytest.mark.slow
def test_a_resumed_run_continues_the_ema_exactly(runs):
    at_stop = runs.at_stop["callbacks"][STATE_KEY]
    assert runs.at_stop["global_step"] == STEPS // 2 and at_stop["updates"] == at_stop["step"] == STEPS // 2
    assert runs.resumed.status == "resumed"
    whole, resumed = runs.final["trained"], runs.final["resumed"]
    a, b = whole["callbacks"][STATE_KEY], resumed["callbacks"][STATE_KEY]
    assert (a["updates"], a["step"]) == (b["updates"], b["step"]) == (STEPS, STEPS)
    assert sorted(a["ema"]) == sorted(b["ema"])
    assert [n for n in a["ema"] if not torch.equal(a["ema"][n], b["ema"][n])] == []
    assert [n for n in whole["state_dict"] if not torch.equal(whole["state_dict"][n], resumed["state_dict"][n])] == []
    # and the EMA at the stop was not yet the final one (the comparison above could fail)
    assert any(not torch.equal(at_stop["ema"][n], a["ema"][n]) for n in a["ema"])
    val = {k: v for k, v in runs.whole.metrics.items() if k.startswith(("val/", "val_raw/"))}
    assert "val_raw/psnr" in val and {k: runs.resumed.metrics.get(k) for k in val} == pytest.approx(val, rel=1e-6)
