"""One prepared GPU check: the large preset's training throughput and memory, the quantizers, the generation probe.

    python benchmarks/device_check.py --out DIR                        # on one GPU, everything, about 8 minutes
    python benchmarks/device_check.py --device cpu --smoke --out DIR   # seconds on any CPU: tests this script

GPU time for this project is rare and short, so everything runs in one go, each section inside what is left of
`--budget-s` (default 480 s; a section that would not fit is recorded as skipped, with the reason), and the
results are written to DIR/device_check.json as each section ends, so an interrupted run keeps what it measured.

Tokenizer (the UniTok-like large preset of benchmarks/train_step.py at 256 px: vit_large_unitok encoder and
decoder, mcq 8 x 4096 at dim 64, transformer_unitok text tower; bf16-mixed): the real TokenizerModule's training
step (its `loss_terms`, backward, its own AdamW) on synthetic batches already on the device (random images, shape
captions), so that the loader is not what is measured. Cases: `eager`; `grad_ckpt` (activation checkpointing in
encoder, decoder and text tower); `compile` (config `compile: true`, the module's own in-place compile);
`recon_0.25` (loss.recon_batch_fraction 0.25). `eager` and `grad_ckpt` each search the largest batch that fits
(doubling from --start-batch until CUDA runs out of memory or --max-batch); `compile` and `recon_0.25` run at
`eager`'s batch, so their images/s compare at equal batch. Per case: images/s over the timed steps (CUDA
synchronised), peak memory (torch.cuda.max_memory_allocated over one step), and the model-FLOP utilisation:
FLOPs per image from torch's FlopCounterMode over one eager forward + backward (matmuls and convolutions),
times images/s, over the GPU's dense bf16 peak (the datasheet table below, or --peak-tflops).

Quantizers: benchmarks/quantizers.py as a subprocess at 65,536 tokens on the same device (it needs
vector-quantize-pytorch: `pip install -e '.[bench]'`; without it the section says so).

Generation probe: the token prior of eval.generation (tokzoo/generation) at the large preset's code shape
(16 x 16 positions x 8 codes of 4,096), its default width/depth/batch: seconds per training step and for one
held-out scoring pass of 256 images.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _machine import cpu_name  # noqa: E402
from train_step import LARGE_PRESET, autocast, build_optimizer  # noqa: E402

from tokzoo.config import defaults, load_variants  # noqa: E402

# Dense (no sparsity) bf16 Tensor Core peaks from NVIDIA's datasheets, TFLOP/s; the first name found in the
# device name wins (so "H100 PCIe" before "H100").
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H200", 989.4), ("H100", 989.4), ("GH200", 989.4), ("B200", 2250.0),
    ("A100", 312.0), ("L40S", 362.1), ("A10G", 70.0), ("L4", 121.0),
)  # fmt: skip
CAPTIONS = [f"a photo of a {size} {colour} {shape}." for size in ("small", "large") for colour in
            ("red", "green", "blue", "yellow") for shape in ("circle", "square", "triangle")]  # fmt: skip
CASES = {
    "eager": {"search": True},
    "grad_ckpt": {"search": True, "grad_checkpointing": True},
    "compile": {"overrides": ["compile=true"]},
    "recon_0.25": {"overrides": ["loss.recon_batch_fraction=0.25"]},
}


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_tflops(device: torch.device, given: float | None) -> tuple[float | None, str]:
    if given:
        return given, "--peak-tflops"
    if device.type != "cuda":
        return None, "no bf16 peak for a CPU: MFU not computed"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops, f"datasheet dense bf16 peak of {key}"
    return None, f"{name} is not in the peak table: pass --peak-tflops for an MFU"


def tokenizer_config(smoke: bool, overrides: list[str]) -> dict[str, Any]:
    # smoke: the default 32 px config in fp32; else the large preset at 256 px in bf16-mixed
    preset = [] if smoke else [*LARGE_PRESET, "trainer.precision=bf16-mixed"]
    _, (variant,) = load_variants(str(ROOT / "tokzoo" / "configs" / "default.yaml"), preset + overrides)
    config = variant.config
    config["eval"] = {**config["eval"], "lpips": False}  # no VGG weights needed for the training step
    config["loss"] = {**config["loss"], "lpips_weight": 0.0}
    return config


class StepRunner:
    """The module's real training step on synthetic device batches of a given size."""

    def __init__(self, config: dict[str, Any], device: torch.device, grad_checkpointing: bool):
        from tokzoo.lit.module import TokenizerModule

        torch.manual_seed(0)
        self.config, self.device = config, device
        self.module = TokenizerModule(config).to(device).train()
        if grad_checkpointing:
            for part in (self.module.model.encoder, self.module.model.decoder, self.module.model.text_tower):
                if part is not None and hasattr(part, "set_grad_checkpointing"):
                    part.set_grad_checkpointing(True)
        self.opt, self.sched = build_optimizer(self.module)
        self.step_index = 0

    def batch(self, size: int) -> dict[str, Any]:
        s = self.config["model"]["image_size"]
        images = torch.rand(size, 3, s, s, device=self.device) * 2 - 1
        return {"image": images, "caption": [CAPTIONS[i % len(CAPTIONS)] for i in range(size)]}

    def step(self, batch: dict[str, Any]) -> None:
        with autocast(self.config, self.device):
            _, terms = self.module.loss_terms(batch, self.step_index)
        terms["loss"].backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        self.step_index += 1

    def fits(self, size: int) -> bool:
        try:
            for _ in range(2):
                self.step(self.batch(size))
            sync(self.device)
            return True
        except torch.cuda.OutOfMemoryError:
            self.opt.zero_grad(set_to_none=True)
            free(self.device)
            return False

    def measure(self, size: int, warmup: int, steps: int) -> dict[str, float]:
        batch = self.batch(size)
        for _ in range(warmup):
            self.step(batch)
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step(batch)
        sync(self.device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        return {"batch": size, "images_per_sec": size * steps / seconds, "step_ms": 1e3 * seconds / steps,
                "peak_gib": peak}  # fmt: skip

    def flops_per_image(self, size: int = 2) -> float:
        from torch.utils.flop_counter import FlopCounterMode

        batch = self.batch(size)
        with FlopCounterMode(display=False) as counter:
            with autocast(self.config, self.device):
                _, terms = self.module.loss_terms(batch, self.step_index)
            terms["loss"].backward()
        self.opt.zero_grad(set_to_none=True)
        return counter.get_total_flops() / size


def largest_batch(runner: StepRunner, start: int, cap: int) -> int:
    size, best = start, 0
    while size <= cap and runner.fits(size):
        best, size = size, size * 2
    if best == 0:
        raise RuntimeError(f"even a batch of {start} does not fit; use --start-batch 1")
    return best


def tokenizer_section(args: argparse.Namespace, device: torch.device, budget: Budget, out: dict) -> None:
    section = out.setdefault("tokenizer", {"cases": {}, "skipped": {}})
    peak, peak_why = peak_tflops(device, args.peak_tflops)
    section["peak_tflops"], section["peak_source"] = peak, peak_why
    warmup, steps = (1, 2) if args.smoke else (3, 10)
    eager_batch = None
    for name, case in CASES.items():
        if budget.left() < args.reserve_s:
            section["skipped"][name] = f"not enough of --budget-s left ({budget.left():.0f} s)"
            continue
        if args.smoke and name == "compile":  # compiling three towers takes about a minute on a CPU
            section["skipped"][name] = "--smoke: compile runs on the GPU check only (tests/test_compile.py covers it)"
            continue
        started = time.monotonic()
        config = tokenizer_config(args.smoke, case.get("overrides", []))
        runner = StepRunner(config, device, case.get("grad_checkpointing", False))
        size = largest_batch(runner, args.start_batch, args.max_batch) if case.get("search") else eager_batch
        size = size or args.start_batch
        result = runner.measure(size, warmup + (2 if name == "compile" else 0), steps)
        if name == "eager":
            eager_batch = size
            section["flops_per_image"] = runner.flops_per_image()
        flops = section.get("flops_per_image")
        if peak and flops:
            result["mfu"] = flops * result["images_per_sec"] / (peak * 1e12)
        result["seconds"] = time.monotonic() - started
        section["cases"][name] = result
        del runner
        free(device)
        write(args.out, out)


def quantizer_section(args: argparse.Namespace, device: torch.device, budget: Budget, out: dict) -> None:
    tokens = 1024 if args.smoke else 65536
    script, report = str(ROOT / "benchmarks" / "quantizers.py"), str(args.out / "quantizers.json")
    cmd = [sys.executable, script, "--device", str(device), "--tokens", str(tokens), "--json", report]
    if args.smoke:
        cmd += ["--repeats", "1", "--min-seconds", "0", "--no-memory", "--no-forward", "--only", "vq", "mcq"]
    else:
        cmd += ["--only", "vq", "mcq", "rq", "lfq", "fsq"]
    timeout = max(10.0, budget.left() - args.reserve_s / 2)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        out["quantizers"] = {"skipped": f"did not finish within {timeout:.0f} s"}
        return
    if proc.returncode != 0:
        out["quantizers"] = {"skipped": (proc.stdout + proc.stderr).strip().splitlines()[-1][:500]}
        return
    out["quantizers"] = {"tokens": tokens, "results": json.loads((args.out / "quantizers.json").read_text())}


def probe_section(args: argparse.Namespace, device: torch.device, budget: Budget, out: dict) -> None:
    from tokzoo.generation.prior import TokenPrior

    cfg = defaults()["eval"]["generation"]
    positions, codes, size = (64, 4, 256) if args.smoke else (256, 8, 4096)
    steps = 3 if args.smoke else 30
    torch.manual_seed(0)
    prior = TokenPrior([size] * codes, positions, num_classes=10, width=cfg["width"], depth=cfg["depth"],
                       heads=cfg["heads"], head_depth=cfg["head_depth"]).to(device)  # fmt: skip
    opt = torch.optim.AdamW(prior.parameters(), lr=cfg["lr"])
    batch = torch.randint(0, size, (cfg["batch_size"], positions, codes), device=device)
    labels = torch.randint(0, 10, (cfg["batch_size"],), device=device)

    def train_step() -> None:
        loss = prior.nll_bits(batch, labels).sum(dim=(1, 2)).mean() / positions
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    train_step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        train_step()
    sync(device)
    step_s = (time.perf_counter() - start) / steps
    held_out = torch.randint(0, size, (256, positions, codes), device=device)
    start = time.perf_counter()
    with torch.no_grad():
        prior.nll_bits(held_out, torch.randint(0, 10, (256,), device=device))
    sync(device)
    out["generation_probe"] = {
        "positions": positions, "codes_per_position": codes, "codebook_size": size, "batch": cfg["batch_size"],
        "train_step_s": step_s, "score_256_images_s": time.perf_counter() - start,
        "prior_steps_of_default_probe_s": step_s * cfg["steps"] if cfg["steps"] else None,
    }  # fmt: skip


def write(folder: Path, out: dict) -> None:
    (folder / "device_check.json").write_text(json.dumps(out, indent=1, default=str))


def render(out: dict) -> None:
    tok = out.get("tokenizer", {})
    print(f"\n{out['device']} | torch {out['torch']} | {out['seconds']:.0f} s in all")
    print(f"FLOPs per image (forward + backward): {tok.get('flops_per_image', float('nan')) / 1e12:.3f} TFLOP; "
          f"peak {tok.get('peak_tflops')} TFLOP/s ({tok.get('peak_source')})")  # fmt: skip
    print(f"{'case':<12}{'batch':>7}{'images/s':>11}{'step ms':>10}{'peak GiB':>10}{'MFU':>8}")
    for name, r in tok.get("cases", {}).items():
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        print(f"{name:<12}{r['batch']:>7}{r['images_per_sec']:>11.1f}{r['step_ms']:>10.1f}{peak:>10}{mfu:>8}")
    for name, why in {**tok.get("skipped", {}), **out.get("errors", {})}.items():
        print(f"{name:<12} skipped or failed: {why}")
    quant = out.get("quantizers", {})
    print(f"quantizers: {quant.get('skipped') or 'see quantizers.json (table printed by quantizers.py)'}")
    probe = out.get("generation_probe")
    if probe:
        print(f"generation probe: {probe['train_step_s'] * 1e3:.1f} ms per prior step at batch {probe['batch']}, "
              f"{probe['score_256_images_s']:.2f} s to score 256 images")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for device_check.json and quantizers.json")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:1, or cpu (with --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes and few steps: a test of the script")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-time budget for everything")
    p.add_argument("--reserve-s", type=float, default=45.0, help="a section starts only with this much left")
    p.add_argument("--start-batch", type=int, default=None, help="batch search start (default 16; smoke 2)")
    p.add_argument("--max-batch", type=int, default=None, help="batch search cap (default 1024; smoke 4)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for the MFU")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device}: CUDA is not available here; use --device cpu --smoke", file=sys.stderr)
        return 2
    args.start_batch = args.start_batch or (2 if args.smoke else 16)
    args.max_batch = args.max_batch or (4 if args.smoke else 1024)
    args.out.mkdir(parents=True, exist_ok=True)
    budget, started = Budget(args.budget_s), time.monotonic()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    out: dict[str, Any] = {"device": name, "torch": torch.__version__, "smoke": args.smoke, "cpus": os.cpu_count()}
    for section in (tokenizer_section, probe_section, quantizer_section):
        try:  # one section failing must not cost the others their (rare) GPU minutes
            section(args, device, budget, out)
        except Exception as err:
            out.setdefault("errors", {})[section.__name__] = f"{type(err).__name__}: {err}"[:2000]
        out["seconds"] = time.monotonic() - started
        write(args.out, out)
    render(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
