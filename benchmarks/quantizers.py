"""Forward+backward time and peak memory of tokzoo's quantizers against vector-quantize-pytorch (the peer).

    python benchmarks/quantizers.py                           # CPU: 4,096 tokens; CUDA (auto-detected): 65,536
    python benchmarks/quantizers.py --device cpu --tokens 4096 --threads 1 --json bench.json
    python benchmarks/quantizers.py --update grad --only vq rq

Shapes are UniTok's: latent 64; mcq 8 x 4096; rq depth 8 x 4096; vq 16,384 codes; lfq 16 bits (two groups of
8 bits); fsq levels [8, 8, 8, 5, 5, 5]. Tokens are laid out as (B, 256, dim): 256 tokens per image (16 x 16).

One step: the module in training mode, the SAME input z (a leaf that requires grad) and the same fixed upstream
gradient w for both libraries; forward, objective = sum(z_q * w) + the module's auxiliary loss, backward. Codebook
side effects (EMA updates, usage tracking) happen inside the step, as in training.

Matched settings (printed with the results):
- update rule: `--update ema` (default) gives every codebook an EMA update (decay 0.99, Laplace-smoothed counts) in
  both libraries, with cosine lookup for vq / mcq (UniTok's lookup). The peer cannot learn a cosine codebook by
  gradient (it asserts against use_cosine_sim with learnable_codebook), so `--update grad` compares learnable
  codebooks with Euclidean lookup for vq / mcq / rq.
- straight-through estimator on both sides (the peer's default rotation trick is switched off), commitment
  weight 0.25, no k-means init, no dead-code replacement (tokzoo's rq restarts every 100 steps by default: off).
- mcq -> VectorQuantize(heads=8, separate_codebook_per_head=True, codebook_dim=8): like ours it splits the
  latent into 8 contiguous chunks ('b n (h d)'), one 4096-code codebook per chunk, searched as one batched
  codebook set. GroupedResidualVQ(groups=8, num_quantizers=1) computes the same thing as 8 separate modules in a
  Python loop, which would only add overhead to the peer's side of the ratio.
- rq -> ResidualVQ(num_quantizers=8). lfq -> LFQ(codebook_size=256, num_codebooks=2): the same 2 x 8-bit
  grouping as ours (one 2^16-way softmax would make the peer ~256x costlier and the comparison meaningless),
  entropy weight 0.1, commitment 0.25, inverse temperature 100. fsq -> FSQ(levels=[8, 8, 8, 5, 5, 5]).
- tokzoo's quantizers also update and return usage / perplexity / dead-code statistics over every code at every
  training step; the peer tracks none. That cost is counted on our side: it is part of what our modules do.

Time: `--warmup` untimed steps plus one that sizes the repeats, then timed steps, ours and the peer's interleaved
with their order alternated, so that load from other processes hits both alike; the median is reported. There
are at least `--repeats` timed steps per module, more for fast cases (as many as fit in about `--min-seconds`, at
most 200), so that sub-millisecond steps get a stable median. torch.set_num_threads is fixed by `--threads`,
default 1: with OpenMP every parallel region waits for its slowest worker, so on a machine shared with other
processes multi-threaded timings mostly measure the scheduler and penalise whichever side issues more small
parallel ops. Pass `--threads 2` on an idle machine to measure multi-threaded. On CUDA every step is bracketed by
torch.cuda.synchronize(). The load average before and after goes into the output: a load above the number of
cores means other processes competed for them and the timings are noisy.

Peak memory: the most tensor memory a step holds at once beyond what was live when it started.
- CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() before.
- CPU: one extra step under torch.profiler(profile_memory=True). The profiler records every allocation and free
  of PyTorch's CPU allocator with a running total of the bytes allocated since profiling began; the peak of that
  total over the step is the step's peak of live tensor memory (activations, score blocks, one-hot matrices,
  gradients, new EMA buffers). It leaves out the interpreter, library code and allocator caching, which a
  process RSS (ru_maxrss) would mix in, and scratch space that MKL / oneDNN allocate outside PyTorch's allocator.
  Tensors that were live before the step and freed during it are not subtracted (the profiler never saw them
  allocated), so the figure can only overstate, alike for both libraries.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch
from _machine import cpu_name  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from _memory import cpu_step_peak_bytes  # noqa: E402
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from tokzoo.quantizers import build_quantizer

TOKENS_PER_IMAGE = 256
MAX_REPEATS = 200
MIB = 1 << 20


@dataclass
class Case:
    name: str
    dim: int
    target: float  # the largest acceptable tokzoo / peer time ratio
    ours: Callable[[], nn.Module]
    peer: Callable[[], nn.Module]
    peer_objective: Callable[[nn.Module, Tensor, Tensor], Tensor]
    peer_module: str
    settings: str


def ours_objective(module: nn.Module, z: Tensor, w: Tensor) -> Tensor:
    out = module(z)
    return (out.z_q * w).sum() + out.loss


def peer_objective_with_loss(module: nn.Module, z: Tensor, w: Tensor) -> Tensor:
    # VectorQuantize / ResidualVQ / LFQ return (quantized, indices, aux loss); ResidualVQ's loss is per depth.
    quantized, _, loss = module(z)
    return (quantized * w).sum() + loss.sum()


def peer_objective_no_loss(module: nn.Module, z: Tensor, w: Tensor) -> Tensor:
    quantized, _ = module(z)  # FSQ has no auxiliary loss
    return (quantized * w).sum()


def make_cases(update: str) -> list[Case]:
    from vector_quantize_pytorch import FSQ, LFQ, ResidualVQ, VectorQuantize

    ema = update == "ema"
    # The peer's codebooks: EMA (decay 0.99) or learnable, straight-through, no k-means, no dead-code replacement.
    rule = dict(
        decay=0.99,
        ema_update=ema,
        learnable_codebook=not ema,
        rotation_trick=False,
        commitment_weight=0.25,
        threshold_ema_dead_code=0,
        kmeans_init=False,
    )
    cosine = ema  # the peer supports cosine lookup only with EMA codebooks
    lookup = "cosine" if cosine else "euclidean"
    rule_desc = "EMA decay 0.99" if ema else "learned by gradient"
    common = "straight-through, commitment 0.25, no k-means init, no dead-code restarts"
    return [
        Case(
            name="vq",
            dim=64,
            target=0.5,
            ours=lambda: build_quantizer("vq", dim=64, codebook_size=16384, normalize=cosine, update=update),
            peer=lambda: VectorQuantize(dim=64, codebook_size=16384, use_cosine_sim=cosine, **rule),
            peer_objective=peer_objective_with_loss,
            peer_module="VectorQuantize",
            settings=f"16384 codes of 64 dims, {lookup}, {rule_desc}, {common}",
        ),
        Case(
            name="mcq",
            dim=64,
            target=0.5,
            ours=lambda: build_quantizer(
                "mcq", dim=64, num_codebooks=8, codebook_size=4096, normalize=cosine, update=update
            ),
            peer=lambda: VectorQuantize(
                dim=64,
                codebook_size=4096,
                codebook_dim=8,
                heads=8,
                separate_codebook_per_head=True,
                use_cosine_sim=cosine,
                **rule,
            ),
            peer_objective=peer_objective_with_loss,
            peer_module="VectorQuantize, 8 heads",
            settings=f"8 codebooks x 4096 codes of 8 dims, {lookup}, {rule_desc}, {common}",
        ),
        Case(
            name="rq",
            dim=64,
            target=0.5,
            ours=lambda: build_quantizer(
                "rq", dim=64, depth=8, codebook_size=4096, update=update, restart_dead_after=0
            ),
            peer=lambda: ResidualVQ(dim=64, num_quantizers=8, codebook_size=4096, **rule),
            peer_objective=peer_objective_with_loss,
            peer_module="ResidualVQ",
            settings=f"depth 8 x 4096 codes of 64 dims, euclidean, {rule_desc}, {common}",
        ),
        Case(
            name="lfq",
            dim=16,
            target=1.0,
            ours=lambda: build_quantizer(
                "lfq", dim=16, num_codebooks=2, entropy_weight=0.1, commitment_weight=0.25, inv_temperature=100.0
            ),
            peer=lambda: LFQ(
                dim=16, codebook_size=256, num_codebooks=2, entropy_loss_weight=0.1, commitment_loss_weight=0.25
            ),
            peer_objective=peer_objective_with_loss,
            peer_module="LFQ, 2 codebooks",
            settings="16 bits in 2 groups of 8, entropy weight 0.1 (inverse temperature 100), commitment 0.25",
        ),
        Case(
            name="fsq",
            dim=6,
            target=1.0,
            ours=lambda: build_quantizer("fsq", levels=[8, 8, 8, 5, 5, 5]),
            peer=lambda: FSQ(levels=[8, 8, 8, 5, 5, 5]),
            peer_objective=peer_objective_no_loss,
            peer_module="FSQ",
            settings="levels [8, 8, 8, 5, 5, 5] (64,000 codes), no auxiliary loss",
        ),
    ]


# ---- measurement ----------------------------------------------------------------------------------------------
class Runner:
    """One module, its input and its objective: `step()` is one training forward+backward."""

    def __init__(self, module: nn.Module, objective: Callable, z: Tensor, w: Tensor, device: torch.device):
        self.module, self.objective, self.z, self.w, self.device = module.train(), objective, z, w, device

    def step(self) -> float:
        """Runs one step; returns its wall time in seconds (gradients are cleared outside the timed part)."""
        self.z.grad = None
        self.module.zero_grad(set_to_none=True)
        sync(self.device)
        start = time.perf_counter()
        self.objective(self.module, self.z, self.w).backward()
        sync(self.device)
        return time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(runners: list[Runner], warmup: int, repeats: int, min_seconds: float) -> list[list[float]]:
    """Seconds per step for each runner: steps interleaved, the order alternated every round."""
    for _ in range(warmup):
        for r in runners:
            r.step()
    probe = max(r.step() for r in runners)  # one more untimed round sizes the number of repeats
    rounds = max(repeats, min(MAX_REPEATS, int(min_seconds / max(probe, 1e-9))))
    times: list[list[float]] = [[] for _ in runners]
    for rnd in range(rounds):
        order = range(len(runners)) if rnd % 2 == 0 else reversed(range(len(runners)))
        for i in order:
            times[i].append(runners[i].step())
    return times


def peak_memory_bytes(runner: Runner, device: torch.device) -> int:
    """Peak tensor memory one step holds beyond what was live before it (see the module docstring)."""
    runner.z.grad = None
    runner.module.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        runner.step()
        return torch.cuda.max_memory_allocated(device) - before

    return cpu_step_peak_bytes(runner.step)


def run_case(case: Case, tokens: int, device: torch.device, args: argparse.Namespace) -> dict:
    n = TOKENS_PER_IMAGE if tokens % TOKENS_PER_IMAGE == 0 else tokens
    gen = torch.Generator().manual_seed(0)
    z0 = torch.randn(tokens // n, n, case.dim, generator=gen)
    w = torch.randn(tokens // n, n, case.dim, generator=gen).to(device)
    torch.manual_seed(0)
    ours = case.ours().to(device)
    torch.manual_seed(0)
    peer = case.peer().to(device)
    runners = [
        Runner(ours, ours_objective, z0.clone().to(device).requires_grad_(), w, device),
        Runner(peer, case.peer_objective, z0.clone().to(device).requires_grad_(), w, device),
    ]
    times = time_interleaved(runners, args.warmup, args.repeats, args.min_seconds)
    peaks = [None if args.no_memory else peak_memory_bytes(r, device) for r in runners]
    result = {"name": case.name, "settings": case.settings, "peer_module": case.peer_module, "target": case.target}
    for label, t, peak in zip(("tokzoo", "peer"), times, peaks, strict=True):
        result[label] = {
            "median_ms": statistics.median(t) * 1e3,
            "times_ms": [x * 1e3 for x in t],
            "peak_mib": None if peak is None else peak / MIB,
        }
    result["repeats"] = len(times[0])
    result["time_ratio"] = result["tokzoo"]["median_ms"] / result["peer"]["median_ms"]
    result["memory_ratio"] = None
    if not args.no_memory and result["peer"]["peak_mib"] > 0:
        result["memory_ratio"] = result["tokzoo"]["peak_mib"] / result["peer"]["peak_mib"]
    result["meets_target"] = result["time_ratio"] <= case.target
    del runners, ours, peer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ---- reporting ------------------------------------------------------------------------------------------------
def render(results: list[dict], config: dict, console: Console) -> None:
    title = (
        f"training fwd+bwd, tokzoo vs vector-quantize-pytorch {config['peer_version']} | {config['device']} | "
        f"{config['tokens']} tokens ({config['batch']} x {config['tokens_per_image']}) | {config['threads']} "
        f"thread(s) | codebooks: {config['update']}"
    )
    table = Table(title=title, title_justify="left")
    columns = ("quantizer", "peer module", "steps", "tokzoo ms", "peer ms", "ratio", "target", "tokzoo MiB",
               "peer MiB", "mem ratio", "status")  # fmt: skip
    for col in columns:
        numeric = col in ("steps", "ratio") or col.endswith(("ms", "MiB", "ratio"))
        table.add_column(col, justify="right" if numeric else "left", no_wrap=True)
    for r in results:
        mem = r["memory_ratio"]
        table.add_row(
            r["name"],
            r["peer_module"],
            str(r["repeats"]),
            f"{r['tokzoo']['median_ms']:.1f}",
            f"{r['peer']['median_ms']:.1f}",
            f"{r['time_ratio']:.2f}",
            f"<= {r['target']:g}",
            "-" if r["tokzoo"]["peak_mib"] is None else f"{r['tokzoo']['peak_mib']:.1f}",
            "-" if r["peer"]["peak_mib"] is None else f"{r['peer']['peak_mib']:.1f}",
            "-" if mem is None else f"{mem:.2f}",
            "ok" if r["meets_target"] else "MISS",
        )
    console.print(table)
    console.print("ms: median over `steps` timed steps; ratio = tokzoo / peer (below 1: tokzoo is faster / smaller)")
    console.print("same settings on both sides:")
    for r in results:
        console.print(f"  {r['name']}: {r['settings']}")
    console.print(f"peak memory: {config['memory']}")
    console.print(f"load average before / after: {config['load_before']} / {config['load_after']}")


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--tokens", type=int, default=None, help="tokens per step (default 4096 on CPU, 65536 on CUDA)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1, see the docstring)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per module before timing")
    p.add_argument("--repeats", type=int, default=5, help="at least this many timed steps per module")
    p.add_argument("--min-seconds", type=float, default=1.0, help="fast cases repeat to fill about this long")
    p.add_argument("--update", choices=("ema", "grad"), default="ema", help="codebook update rule, both sides")
    p.add_argument("--only", nargs="+", choices=("vq", "mcq", "rq", "lfq", "fsq"), help="run only these")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=max(Console().width, 150))  # a pipe would otherwise wrap the table at 80 columns
    try:
        version("vector-quantize-pytorch")
    except Exception:
        console.print("vector-quantize-pytorch is not installed: pip install -e '.[bench]'")
        return 2
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        console.print(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
        return 2
    tokens = args.tokens or (65536 if device.type == "cuda" else 4096)
    if tokens < 1 or args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        console.print("--tokens, --repeats and --threads must be positive and --warmup non-negative")
        return 2
    torch.set_num_threads(args.threads)
    n = TOKENS_PER_IMAGE if tokens % TOKENS_PER_IMAGE == 0 else tokens
    config = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "tokens": tokens,
        "batch": tokens // n,
        "tokens_per_image": n,
        "threads": args.threads,
        "warmup": args.warmup,
        "min_repeats": args.repeats,
        "min_seconds": args.min_seconds,
        "update": args.update,
        "torch_version": torch.__version__,
        "peer_version": version("vector-quantize-pytorch"),
        "python": platform.python_version(),
        "memory": (
            "torch.cuda.max_memory_allocated over one step, minus what was allocated before it"
            if device.type == "cuda"
            else "peak of live CPU tensor memory allocated during one step (torch.profiler, profile_memory=True)"
        ),
        "load_before": load_average(),
    }
    results = []
    for case in make_cases(args.update):
        if args.only and case.name not in args.only:
            continue
        with console.status(f"benchmarking {case.name} ..."):
            results.append(run_case(case, tokens, device, args))
    config["load_after"] = load_average()
    render(results, config, console)
    missed = [r["name"] for r in results if not r["meets_target"]]
    if missed:
        console.print(f"missed time target: {', '.join(missed)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": config, "results": results}, indent=2))
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
