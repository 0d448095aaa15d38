"""Time per stage, images/s and peak memory of tokzoo's real training step, plus loader throughput alone.

    python benchmarks/train_step.py                                   # tokzoo's default config on CPU
    python benchmarks/train_step.py --steps 20 --warmup 3 --json bench-train-step.json
    python benchmarks/train_step.py --preset large --batch-size 2 --steps 3 --warmup 1 --val-batches 1
    python benchmarks/train_step.py --config mcq_vs_rq --variant rq trainer.max_steps=300

Config: `--config` takes a run config or an ablation file (a path, or a bare name looked up in ablations/), and
`--variant` picks one variant (default: the first). Without `--config` it is tokzoo/configs/default.yaml, which is
the base of ablations/mcq_vs_rq.yaml (mcq 4 x 256, dim 32, vit_tiny at 32 px, supervision both). `--preset large`
overrides the model with the UniTok-like shape: vit_large_unitok encoder and decoder at 256 px, mcq dim 64 x 8
codebooks x 4096 codes, transformer_unitok text tower (embed_dim 768, context 77). The embedded shapes dataset
only renders 32 / 64 px, so for other sizes the script writes a small JPEG imagefolder (shapes rendered at 64 px,
resized) into a temporary directory and reads it through the real `imagefolder` loader. Dot-list overrides
(`data.num_workers=2`) apply last.

The step is the one TokenizerModule.training_step runs, on the real module built from the resolved config: the
module's own `loss_terms(batch, step)` (the forward and the objective that training_step calls), `loss.backward()`,
then AdamW and the LR schedule from the module's own `optimizer_and_schedule(max_steps)` (what
configure_optimizers hands to Lightning).
Left out: Lightning's logging (`self.log`, reading quantizer statistics every `log_every_n_steps`) and the
non-finite check, which are not model work; `grad_cos_every` (off by default). Batches come from the real train
loader but are fetched and moved to the device outside the timed region.

Stages: forward hooks on the submodules time each call with time.perf_counter (bracketed by
torch.cuda.synchronize on CUDA): encoder, factorization down, quantizer (its own loss, the commitment /
codebook terms, is computed inside its forward and is counted there), factorization up, decoder (with the
width adapter), text tower (`encode_text`: BPE tokenization + transformer + normalisation), pixel loss, LPIPS and
GAN when present, contrastive loss. "forward, other" is what the forward + objective took beyond those (image
head, pooling, adding terms). Backward and the optimizer step (with zero_grad and the scheduler) are timed whole.
The table shows the mean over the timed steps (so that shares add up to 100 %); the JSON also keeps every step.
images/s = batch / mean step time.

Validation: one pass as the module runs it (on_validation_epoch_start, validation_step per batch under
no_grad / eval, on_validation_epoch_end with FidelityMetrics, CodebookUsage, zero-shot and the linear probe) over
`--val-batches` batches of the real val loader (default: all of it). It is reported against one training step
and as its share of a run of `trainer.max_steps` steps that validates once (tokzoo's default schedule).

Peak memory: CUDA: torch.cuda.max_memory_allocated() over one extra step (after reset_peak_memory_stats): all
live tensor memory, parameters and optimizer state included. CPU: one extra step under
torch.profiler(profile_memory=True), whose running total of PyTorch-allocator bytes gives the most tensor memory
the step allocated at once; added to it are the bytes of parameters, buffers and optimizer state that were live
before the step (counted directly; gradients are set to None before the step, so the profiler sees them). Chosen
over ru_maxrss, which mixes in the interpreter, libraries, the dataset and allocator caching and never goes down;
it is recorded in the JSON for reference. MKL / oneDNN scratch outside PyTorch's allocator is not counted.

Loader: the real TokzooDataModule train loader (same batch size, num_workers from the config) iterated alone for
`--loader-batches` batches after one untimed batch (worker start-up), images/s and the ratio to training.

Threads: `--threads` sets torch.set_num_threads (default: torch's own default, which is what `tokzoo fit`
uses). The load average before and after is recorded: above the core count, other processes competed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from _machine import cpu_name  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from _memory import cpu_step_peak_bytes  # noqa: E402
from rich.console import Console
from rich.table import Table
from torch import nn

from tokzoo.config import DEFAULTS_PATH, load_variants
from tokzoo.errors import ConfigError, TokzooError
from tokzoo.lit.module import TokenizerModule
from tokzoo.runner import build_datamodule

MIB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
SHAPES_SIZES = (32, 64)
LARGE_PRESET = [
    "model.image_size=256",
    "model.embed_dim=768",
    "model.encoder={name: vit_large_unitok}",
    "model.decoder={name: vit_large_unitok}",
    "model.quantizer={name: mcq, dim: 64, num_codebooks: 8, codebook_size: 4096}",
    "model.text={name: transformer_unitok}",
    "model.tokenizer={name: clip_bpe, context_length: 77}",
]
FORWARD_STAGES = [
    ("encoder", "encoder"),
    ("factor_down", "factorization down"),
    ("quantizer", "quantizer (+ its loss)"),
    ("factor_up", "factorization up"),
    ("decoder", "decoder"),
    ("text", "text tower (encode_text)"),
    ("loss_pixel", "loss: pixel"),
    ("loss_lpips", "loss: lpips"),
    ("loss_gan", "loss: gan (discriminator)"),
    ("loss_contra", "loss: contrastive"),
    ("forward_other", "forward, other"),
]
WHOLE_STAGES = [("backward", "backward"), ("optimizer", "optimizer step")]


# ---- timing ---------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Accumulates seconds per stage from forward hooks while `active`; `reset()` between steps."""

    def __init__(self, device: torch.device):
        self.device = device
        self.active = False
        self.seconds: dict[str, float] = {}
        self._start: dict[str, float] = {}

    def reset(self) -> None:
        self.seconds = {}

    def begin(self, key: str) -> None:
        if self.active:
            sync(self.device)
            self._start[key] = time.perf_counter()

    def end(self, key: str) -> None:
        if self.active and key in self._start:
            sync(self.device)
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - self._start.pop(key)

    def hook(self, module: nn.Module | None, key: str) -> None:
        if module is None:
            return
        module.register_forward_pre_hook(lambda *_: self.begin(key))
        module.register_forward_hook(lambda *_: self.end(key))

    def wrap(self, fn: Callable, key: str) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.begin(key)
            try:
                return fn(*args, **kwargs)
            finally:
                self.end(key)

        return timed


def instrument(module: TokenizerModule, timer: StageTimer) -> None:
    model, objective = module.model, module.objective
    timer.hook(model.encoder, "encoder")
    timer.hook(model.factor_down, "factor_down")
    timer.hook(model.quantizer, "quantizer")
    timer.hook(model.factor_up, "factor_up")
    timer.hook(model.decoder_in, "decoder")
    timer.hook(model.decoder, "decoder")
    timer.hook(objective.pixel, "loss_pixel")
    timer.hook(objective.perceptual, "loss_lpips")
    timer.hook(objective.discriminator, "loss_gan")
    timer.hook(objective.contrastive, "loss_contra")
    if model.text_tower is not None:
        model.encode_text = timer.wrap(model.encode_text, "text")  # the model's forward calls encode_text


def autocast(config: dict[str, Any], device: torch.device) -> contextlib.AbstractContextManager:
    precision = str(config["trainer"]["precision"])
    if precision.startswith("bf16") and "mixed" in precision:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision.startswith("16") and "mixed" in precision:
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def train_step(
    module: TokenizerModule, opt: torch.optim.Optimizer, sched: Any, batch: dict, step: int, timer: StageTimer
) -> dict[str, float]:
    """One training step as TokenizerModule.training_step + Lightning's optimisation loop run it; returns
    seconds per stage and the whole step."""
    device = timer.device
    timer.reset()
    sync(device)
    timer.active = True
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    with autocast(module.config, device):
        _, terms = module.loss_terms(batch, step)
    loss = terms["loss"]
    sync(device)
    t1 = time.perf_counter()
    timer.active = False  # gradient checkpointing re-runs forwards inside backward: not forward time
    loss.backward()
    sync(device)
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    sync(device)
    t3 = time.perf_counter()
    result = dict(timer.seconds)
    result["forward_other"] = (t1 - t0) - sum(result.values())
    result.update(backward=t2 - t1, optimizer=t3 - t2, step=t3 - t0)
    result["minor_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    return result


def build_optimizer(module: TokenizerModule) -> tuple[torch.optim.Optimizer, Any]:
    """The module's own optimiser and schedule, as configure_optimizers() gives them to Lightning."""
    conf = module.optimizer_and_schedule(module.config["trainer"]["max_steps"])
    return conf["optimizer"], conf["lr_scheduler"]["scheduler"]


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def cycle(loader: Any) -> Iterator[dict]:
    while True:
        yield from loader


# ---- memory ---------------------------------------------------------------------------------------------------
def state_bytes(module: nn.Module, opt: torch.optim.Optimizer) -> int:
    seen: set[int] = set()
    total = 0
    tensors = list(module.parameters()) + list(module.buffers())
    tensors += [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    for t in tensors:
        if id(t) not in seen and t.device.type == "cpu":
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def peak_memory(run_step: Callable[[], Any], module: nn.Module, opt: torch.optim.Optimizer, device: torch.device):
    """(peak MiB of the step including live state, MiB the step itself allocated at most)."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run_step()
        peak = torch.cuda.max_memory_allocated(device)
        return peak / MIB, (peak - before) / MIB

    before = state_bytes(module, opt)
    step_peak = cpu_step_peak_bytes(run_step)
    return (before + step_peak) / MIB, step_peak / MIB


def flop_profile(run_step: Callable[[], Any], steps: int, device: torch.device) -> dict:
    """FLOPs torch.profiler attributes to ops (matmuls and convolutions) over `steps` steps, the time those ops
    took and the rate they ran at; beside it, a lone 2048^3 fp32 matmul as the machine's practical peak. (The
    profiler slows the rest of the step, so the caller relates the ops' time to an unprofiled step.)"""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    start = time.perf_counter()
    with profile(activities=activities, with_flops=True) as prof:
        for _ in range(steps):
            run_step()
        sync(device)
    wall = (time.perf_counter() - start) / steps
    flops, seconds = 0, 0.0
    for event in prof.key_averages():
        if event.flops:
            flops += event.flops
            busy = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
            seconds += busy / 1e6
    a = torch.randn(2048, 2048, device=device)
    for _ in range(3):
        a @ a
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    sync(device)
    peak = 10 * 2 * 2048**3 / (time.perf_counter() - t)
    return {
        "gflop_per_step": flops / steps / 1e9,
        "flop_ops_ms_per_step": 1e3 * seconds / steps,
        "profiled_step_ms": 1e3 * wall,
        "flop_ops_gflops": flops / seconds / 1e9 if seconds else float("nan"),
        "peak_matmul_gflops": peak / 1e9,
    }


# ---- validation and loader ------------------------------------------------------------------------------------
def validation_pass(module: TokenizerModule, loader: Any, batches: int | None, device: torch.device) -> dict:
    """One validation epoch through the module's own hooks; returns seconds and the metrics it would log."""
    logged: dict[str, float] = {}
    module.log_dict = lambda metrics, **_: logged.update(metrics)  # no trainer here: keep what it would log
    module.eval()
    n_images = n_batches = 0
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        module.on_validation_epoch_start()
        for i, batch in enumerate(loader):
            if batches is not None and i >= batches:
                break
            batch = to_device(batch, device)
            module.validation_step(batch, i)
            n_images += batch["image"].shape[0]
            n_batches += 1
        sync(device)
        mid = time.perf_counter()
        module.on_validation_epoch_end()
    sync(device)
    end = time.perf_counter()
    del module.log_dict
    module.train()
    return {
        "seconds": end - start,
        "steps_seconds": mid - start,
        "epoch_end_seconds": end - mid,
        "batches": n_batches,
        "images": n_images,
        "metrics": {k: float(v) for k, v in logged.items()},
    }


def loader_throughput(datamodule: Any, batches: int) -> dict:
    loader = datamodule.train_dataloader()
    it = cycle(loader)
    next(it)  # worker start-up and first-batch costs are not steady-state throughput
    images = 0
    start = time.perf_counter()
    for _ in range(batches):
        images += next(it)["image"].shape[0]
    seconds = time.perf_counter() - start
    del it
    return {"batches": batches, "images": images, "seconds": seconds, "images_per_sec": images / seconds}


# ---- data at sizes the shapes dataset does not render ---------------------------------------------------------
def write_imagefolder(root: Path, image_size: int, num_train: int, num_val: int, seed: int) -> None:
    """Shapes rendered at 64 px, resized to image_size, saved as JPEG in root/{train,val}/<class>/."""
    from PIL import Image

    from tokzoo.data import build_dataset

    for split in ("train", "val"):
        ds = build_dataset("shapes", split=split, image_size=64, num_train=num_train, num_val=num_val, seed=seed)
        for i in range(len(ds)):
            folder = root / split / ds.class_names[ds.labels[i]].replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(ds.images[i].numpy()).resize((image_size, image_size), Image.BICUBIC)
            img.save(folder / f"{i:05d}.jpg", quality=90)


def resolve_config(args: argparse.Namespace, tmp: Path) -> tuple[str, dict[str, Any]]:
    path = DEFAULTS_PATH
    if args.config:
        path = Path(args.config)
        if not path.is_file() and (ROOT / "ablations" / f"{args.config}.yaml").is_file():
            path = ROOT / "ablations" / f"{args.config}.yaml"
    overrides = list(LARGE_PRESET if args.preset == "large" else [])
    if args.batch_size is not None:
        overrides.append(f"data.batch_size={args.batch_size}")
    _, variants = load_variants(path, overrides + list(args.overrides))
    names = [v.name for v in variants]
    if args.variant is None:
        variant = variants[0]
    elif args.variant in names:
        variant = variants[names.index(args.variant)]
    else:
        raise ConfigError(f"--variant '{args.variant}' is not in {path}; its variants are: {', '.join(names)}")
    config = variant.config
    size = config["model"]["image_size"]
    if config["data"]["name"] == "shapes" and size not in SHAPES_SIZES:
        bsz = config["data"]["batch_size"]
        num_train, num_val = max(4 * bsz, 32), max(2 * (config["data"]["val_batch_size"] or bsz), 16)
        write_imagefolder(tmp / "data", size, num_train, num_val, config["seed"])
        config["data"] = {**config["data"], "name": "imagefolder", "kwargs": {"root": str(tmp / "data")}}
    return f"{path.name}:{variant.name}" + (" +large" if args.preset == "large" else ""), config


# ---- machine facts and reporting ------------------------------------------------------------------------------
def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def rate(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def render(res: dict, console: Console) -> None:
    m, stages = res["machine"], res["stages"]
    step_ms = res["step_ms_mean"]
    title = (
        f"tokzoo training step | {res['config_name']} | {m['device']} | batch {res['batch_size']} at "
        f"{res['image_size']} px | {m['threads']} thread(s) | {res['params_millions']:.1f} M params"
    )
    table = Table(title=title, title_justify="left")
    for col in ("stage", "ms", "share"):
        table.add_column(col, justify="left" if col == "stage" else "right", no_wrap=True)
    for key, label in FORWARD_STAGES + WHOLE_STAGES:
        if key not in stages:
            continue
        ms = stages[key]["mean_ms"]
        table.add_row(label, f"{ms:.2f}", f"{100 * ms / step_ms:.1f} %")
    table.add_row("[b]training step[/b]", f"[b]{step_ms:.2f}[/b]", "100.0 %", end_section=True)
    val = res["validation"]
    table.add_row(
        f"validation pass ({val['batches']} batches, {val['images']} images)",
        f"{1e3 * val['seconds']:.1f}",
        f"{val['seconds'] * 1e3 / step_ms:.1f} steps",
    )
    end_ms = f"{1e3 * val['epoch_end_seconds']:.1f}"
    table.add_row("  of which epoch end (fidelity, codebook, probe, zero-shot)", end_ms, "")
    console.print(table)
    r = res["ratios"]
    console.print(
        f"images/s: training {rate(res['images_per_sec'])} (step median {res['step_ms_median']:.2f} ms over "
        f"{res['steps']} steps, {res['minor_faults_per_step']:.0f} minor page faults per step) | loader alone "
        f"{rate(res['loader']['images_per_sec'])} "
        f"(num_workers {res['num_workers']}) | loader / training {r['loader_over_training']:.1f}x"
    )
    console.print(
        f"(quantizer + factorization) / step: {100 * r['quant_factor_over_step']:.1f} % | validation share of a "
        f"{res['max_steps']}-step run validating once: {100 * r['validation_share_of_run']:.1f} %"
    )
    console.print(f"peak memory: {res['memory']['peak_mib']:.1f} MiB ({res['memory']['step_mib']:.1f} MiB "
                  f"allocated by the step itself); {res['memory']['how']}")  # fmt: skip
    if res["flops"]:
        f = res["flops"]
        console.print(
            f"FLOP profile: {f['gflop_per_step']:.2f} GFLOP per step in matmuls and convolutions, "
            f"{f['flop_ops_ms_per_step']:.1f} ms = {100 * f['flop_ops_share']:.0f} % of the median step, at "
            f"{f['flop_ops_gflops']:.0f} GFLOP/s; a lone 2048^3 matmul: "
            f"{f['peak_matmul_gflops']:.0f} GFLOP/s"
        )
    if res["absent"]:
        console.print("not measured (see `absent` in the JSON for why): " + ", ".join(res["absent"]))
    console.print(f"torch {m['torch']} | {m['cpu_count']} CPUs | load average before / after: "
                  f"{m['load_before']} / {m['load_after']}")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="run config or ablation file (path, or a name in ablations/)")
    p.add_argument("--variant", default=None, help="variant of an ablation file (default: the first)")
    p.add_argument("--preset", choices=("default", "large"), default="default", help="large: UniTok-like model")
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps first")
    p.add_argument("--batch-size", type=int, default=None, help="data.batch_size (default: the config's)")
    p.add_argument("--val-batches", type=int, default=None, help="validation batches (default: the whole set)")
    p.add_argument("--loader-batches", type=int, default=None, help="loader-only batches (default: max(steps, 20))")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:1")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument("--flops", type=int, default=0, metavar="N", help="also profile N steps for FLOPs and GFLOP/s")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument("overrides", nargs="*", help="dot-list config overrides, e.g. data.num_workers=2")
    return p.parse_args(argv)


def run(args: argparse.Namespace, console: Console, tmp: Path) -> dict:
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    if args.steps < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        raise ConfigError("--steps and --threads must be positive and --warmup non-negative")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = load_average()
    config_name, config = resolve_config(args, tmp)
    torch.manual_seed(config["seed"])
    datamodule = build_datamodule(config)
    datamodule.setup("fit")
    module = TokenizerModule(config).to(device)
    module.class_names = datamodule.class_names or None  # what module.setup() reads from the trainer
    module.prompt_templates = list(datamodule.prompt_templates or module.prompt_templates)
    module.train()
    opt, sched = build_optimizer(module)
    timer = StageTimer(device)
    instrument(module, timer)

    batches = cycle(datamodule.train_dataloader())
    step = 0

    def one_step() -> dict[str, float]:
        nonlocal step
        batch = to_device(next(batches), device)
        result = train_step(module, opt, sched, batch, step, timer)
        step += 1
        return result

    with console.status("training steps ..."):
        for _ in range(args.warmup):
            one_step()
        records = [one_step() for _ in range(args.steps)]
    keys = [k for k, _ in FORWARD_STAGES + WHOLE_STAGES if any(k in r for r in records)]
    stages = {}
    for k in keys:
        ms = [1e3 * r.get(k, 0.0) for r in records]
        stages[k] = {"mean_ms": statistics.fmean(ms), "ms": ms}
    step_ms = [1e3 * r["step"] for r in records]
    faults = [r["minor_faults"] for r in records]
    bsz = config["data"]["batch_size"]
    mean_step = statistics.fmean(step_ms)

    memory = {"peak_mib": float("nan"), "step_mib": float("nan"), "how": "skipped (--no-memory)"}
    if not args.no_memory:
        with console.status("peak memory ..."):
            peak, own = peak_memory(one_step, module, opt, device)
        how = (
            "torch.cuda.max_memory_allocated over one step"
            if device.type == "cuda"
            else "CPU: live parameters/buffers/optimizer state + torch.profiler peak of the step"
        )
        memory = {"peak_mib": peak, "step_mib": own, "how": how}

    flops = None
    if args.flops:
        with console.status("FLOP profile ..."):
            flops = flop_profile(one_step, args.flops, device)
        flops["flop_ops_share"] = flops["flop_ops_ms_per_step"] / statistics.median(step_ms)

    with console.status("validation pass ..."):
        val = validation_pass(module, datamodule.val_dataloader(), args.val_batches, device)
    with console.status("loader alone ..."):
        loader = loader_throughput(datamodule, args.loader_batches or max(args.steps, 20))

    ips = bsz / (mean_step / 1e3)
    quant_factor = sum(stages[k]["mean_ms"] for k in ("factor_down", "quantizer", "factor_up") if k in stages)
    max_steps = config["trainer"]["max_steps"]
    run_seconds = max_steps * mean_step / 1e3
    if args.val_batches is not None:  # a partial pass: scale to the whole val loader
        full = len(datamodule.val_dataloader())
        val_full = val["seconds"] * full / max(1, val["batches"])
    else:
        val_full = val["seconds"]
    n_params = sum(p.numel() for p in module.parameters())
    return {
        "config_name": config_name,
        "config": config,
        "batch_size": bsz,
        "image_size": config["model"]["image_size"],
        "num_workers": config["data"]["num_workers"],
        "max_steps": max_steps,
        "params_millions": n_params / 1e6,
        "steps": args.steps,
        "warmup": args.warmup,
        "stages": stages,
        "step_ms": step_ms,
        "step_ms_mean": mean_step,
        "step_ms_median": statistics.median(step_ms),
        "minor_faults_per_step": statistics.median(faults),
        "images_per_sec": ips,
        "memory": memory,
        "flops": flops,
        "validation": {**val, "full_pass_seconds_estimate": val_full},
        "loader": loader,
        "ratios": {
            "quant_factor_over_step": quant_factor / mean_step,
            "validation_share_of_run": val_full / (run_seconds + val_full),
            "loader_over_training": loader["images_per_sec"] / ips,
        },
        "absent": dict(module.absent),
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_before": load_before,
            "load_after": load_average(),
            "process_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=max(Console().width, 120))  # a pipe would otherwise wrap the table at 80 columns
    warnings.filterwarnings("ignore", message=".*self.log.*")
    tmp = Path(tempfile.mkdtemp(prefix="tokzoo-bench-"))
    try:
        res = run(args, console, tmp)
    except TokzooError as err:
        console.print(f"error: {err}")
        return 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    render(res, console)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2, default=str))
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
