"""Forward+backward time and peak memory of tokzoo's quantizers against vector-quantize-pytorch (the peer).

    python benchmarks/quantizers.py                      # CPU: 4,096 tokens; CUDA (auto-detected): 65,536
    python benchmarks/quantizers.py --device cpu --tokens 4096 --threads 2 --json bench.json
    python benchmarks/quantizers.py --update grad --only vq rq

Shapes are UniTok's: latent 64; mcq 8 x 4096; rq depth 8 x 4096; vq 16,384 codes; lfq 16 bits (two groups of 8);
fsq levels [8, 8, 8, 5, 5, 5]. Tokens are laid out as (B, 256, dim), 256 tokens per image (a 16 x 16 grid).

What one step is: both modules in training mode, the SAME input z (a leaf that requires grad) and the same fixed
upstream gradient w; forward, objective = sum(z_q * w) + the module's auxiliary loss, backward. Codebook side
effects (EMA updates, usage tracking) happen inside the step, as they would in training.

Matched settings (printed with the results):
- update rule: `--update ema` (default) makes every codebook an EMA codebook (decay 0.99, Laplace-smoothed counts)
  in both libraries, with cosine lookup for vq / mcq (UniTok's lookup). The peer cannot learn a cosine codebook by
  gradient (it asserts against use_cosine_sim with learnable_codebook), so `--update grad` compares learnable
  codebooks with Euclidean lookup for vq / mcq / rq.
- straight-through estimator on both sides (the peer's default rotation trick is switched off), commitment weight
  0.25, no k-means init, no dead-code replacement (tokzoo's rq restarts every 100 steps by default: off here).
- mcq -> VectorQuantize(heads=8, separate_codebook_per_head=True, codebook_dim=8): like ours it splits the latent
  into 8 contiguous chunks ('b n (h d)') with one 4096-code codebook per chunk, searched as one batched codebook
  set. GroupedResidualVQ(groups=8, num_quantizers=1) computes the same thing but as 8 separate modules run in a
  Python loop, so it would only add overhead to the peer's side of the ratio.
- rq -> ResidualVQ(num_quantizers=8); lfq -> LFQ(codebook_size=256, num_codebooks=2), the same 2 x 8-bit grouping as
  ours (a single 2^16-way softmax would make the peer 256x costlier and the comparison meaningless), entropy
  weight 0.1, commitment 0.25, inverse temperature 100; fsq -> FSQ(levels=[8, 8, 8, 5, 5, 5]).
- tokzoo's quantizers also maintain and return usage / perplexity / dead-code statistics every step; the peer
  tracks none: that cost is counted on our side, as it is part of what our modules do.

Time: `--warmup` untimed steps, then `--repeats` timed steps, ours and the peer's interleaved (and the order
alternated) so that load from other processes hits both alike; we report the median. torch.set_num_threads is
fixed (`--threads`, default min(2, cores)); on CUDA every step is bracketed by torch.cuda.synchronize().

Peak memory: the largest amount of tensor memory a step allocates beyond what was live when it started.
- CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() before.
- CPU: one extra step under torch.profiler(profile_memory=True). The profiler records every allocation and free
  of PyTorch's CPU allocator with the running total of bytes allocated since profiling started; the peak of that
  running total is the step's peak of live tensor memory (activations, score blocks, one-hot matrices, gradients,
  new EMA buffers). It excludes the Python interpreter, library code and allocator caching, which a process RSS
  (ru_maxrss) measure would mix in; it also excludes scratch space that oneDNN/MKL allocate outside PyTorch's
  allocator. Blocks that were already live when the step began and are freed inside it are not subtracted (the
  profiler did not see them allocated), so the figure can only overstate, equally for both libraries.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from tokzoo.quantizers import build_quantizer

TOKENS_PER_IMAGE = 256
MIB = 1 << 20


@dataclass
class Case:
    name: str
    dim: int
    target: float  # the largest acceptable tokzoo / peer time ratio
    ours: Callable[[], nn.Module]
    peer: Callable[[], nn.Module]
    peer_objective: Callable[[nn.Module, Tensor, Tensor], Tensor]
    peer_desc: str
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
    from vector_quantize_pytorch import FSQ, LFQ, VectorQuantize, ResidualVQ

    ema = update == "ema"
    # The peer's codebook: EMA (decay 0.99) or learnable, straight-through, no dead-code replacement.
    rule = dict(decay=0.99, ema_update=ema, learnable_codebook=not ema, rotation_trick=False, commitment_weight=0.25,
                threshold_ema_dead_code=0, kmeans_init=False)
    cosine = ema  # the peer supports cosine lookup only with EMA codebooks
    lookup = "cosine" if cosine else "euclidean"
    rule_desc = "EMA 0.99" if ema else "learnable (gradient)"
    return [
        Case(
            "vq", 64, 0.5,
            lambda: build_quantizer("vq", dim=64, codebook_size=16384, normalize=cosine, update=update),
            lambda: VectorQuantize(dim=64, codebook_size=16384, use_cosine_sim=cosine, **rule),
            peer_objective_with_loss,
            "VectorQuantize",
            f"16384 codes, {lookup}, {rule_desc}",
        ),
        Case(
            "mcq", 64, 0.5,
            lambda: build_quantizer("mcq", dim=64, num_codebooks=8, codebook_size=4096, normalize=cosine,
                                    update=update),
            lambda: VectorQuantize(dim=64, codebook_size=4096, codebook_dim=8, heads=8, separate_codebook_per_head=True,
                                   use_cosine_sim=cosine, **rule),
            peer_objective_with_loss,
            "VectorQuantize(heads=8, separate)",
            f"8 x 4096 codes of 8 dims, {lookup}, {rule_desc}",
        ),
        Case(
            "rq", 64, 0.5,
            lambda: build_quantizer("rq", dim=64, depth=8, codebook_size=4096, update=update, restart_dead_after=0),
            lambda: ResidualVQ(dim=64, num_quantizers=8, codebook_size=4096, **rule),
            peer_objective_with_loss,
            "ResidualVQ",
            f"depth 8 x 4096 codes, euclidean, {rule_desc}",
        ),
        Case(
            "lfq", 16, 1.0,
            lambda: build_quantizer("lfq", dim=16, num_codebooks=2, entropy_weight=0.1, commitment_weight=0.25,
                                    inv_temperature=100.0),
            lambda: LFQ(dim=16, codebook_size=256, num_codebooks=2, entropy_loss_weight=0.1,
                        commitment_loss_weight=0.25),
            peer_objective_with_loss,
            "LFQ(num_codebooks=2)",
            "16 bits = 2 groups x 8, entropy 0.1, commit 0.25",
        ),
        Case(
            "fsq", 6, 1.0,
            lambda: build_quantizer("fsq", levels=[8, 8, 8, 5, 5, 5]),
            lambda: FSQ(levels=[8, 8, 8, 5, 5, 5]),
            peer_objective_no_loss,
            "FSQ",
            "levels [8,8,8,5,5,5] (2^16)",
        ),
    ]


# ---- measurement ----------------------------------------------------------------------------------------------
class Runner:
    """One module, its input and its objective: `step()` is one training forward+backward."""

    def __init__(self, module: nn.Module, objective: Callable, z: Tensor, w: Tensor):
        self.module, self.objective, self.z, self.w = module.train(), objective, z, w

    def reset(self) -> None:
        self.z.grad = None
        self.module.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.objective(self.module, self.z, self.w).backward()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(runners: list[Runner], warmup: int, repeats: int, device: torch.device) -> list[list[float]]:
    """Seconds per step for each runner, steps interleaved and the order alternated every repeat."""
    for _ in range(warmup):
        for r in runners:
            r.reset()
            r.step()
    times: list[list[float]] = [[] for _ in runners]
    for rep in range(repeats):
        order = list(range(len(runners)))
        if rep % 2:
            order.reverse()
        for i in order:
            runners[i].reset()
            sync(device)
            start = time.perf_counter()
            runners[i].step()
            sync(device)
            times[i].append(time.perf_counter() - start)
    return times


def peak_memory_bytes(runner: Runner, device: torch.device) -> int:
    """Peak tensor memory one step allocates beyond what was live before it (see the module docstring)."""
    runner.reset()
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        runner.step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runner.step()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    memory = sorted(
        (e for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0),
        key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)),
    )
    if not memory:
        return 0
    # The running total counts everything allocated since the profiler's first session in this process; its value
    # just before the first event of this step is the baseline.
    baseline = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in memory) - baseline


def run_case(case: Case, tokens: int, device: torch.device, warmup: int, repeats: int, memory: bool) -> dict:
    n = TOKENS_PER_IMAGE if tokens % TOKENS_PER_IMAGE == 0 else tokens
    b = tokens // n
    gen = torch.Generator().manual_seed(0)
    z0 = torch.randn(b, n, case.dim, generator=gen)
    w = torch.randn(b, n, case.dim, generator=gen).to(device)
    torch.manual_seed(0)
    ours = case.ours().to(device)
    torch.manual_seed(0)
    peer = case.peer().to(device)
    runners = [
        Runner(ours, ours_objective, z0.clone().to(device).requires_grad_(), w),
        Runner(peer, case.peer_objective, z0.clone().to(device).requires_grad_(), w),
    ]
    times = time_interleaved(runners, warmup, repeats, device)
    peaks = [peak_memory_bytes(r, device) if memory else None for r in runners]
    result = {"name": case.name, "settings": case.settings, "peer_module": case.peer_desc, "target": case.target}
    for label, t, peak in zip(("tokzoo", "peer"), times, peaks):
        result[label] = {
            "median_ms": statistics.median(t) * 1e3,
            "times_ms": [x * 1e3 for x in t],
            "peak_mib": None if peak is None else peak / MIB,
        }
    result["time_ratio"] = result["tokzoo"]["median_ms"] / result["peer"]["median_ms"]
    if memory:
        result["memory_ratio"] = result["tokzoo"]["peak_mib"] / max(result["peer"]["peak_mib"], 1e-9)
    result["meets_target"] = result["time_ratio"] <= case.target
    del runners, ours, peer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ---- reporting ------------------------------------------------------------------------------------------------
def render(results: list[dict], config: dict, console: Console) -> None:
    title = (
        f"tokzoo vs vector-quantize-pytorch {config['peer_version']} | {config['device']} | "
        f"{config['tokens']} tokens ({config['batch']} x {config['tokens_per_image']}) | "
        f"{config['threads']} threads | update={config['update']} | median of {config['repeats']} "
        f"after {config['warmup']} warmup"
    )
    table = Table(title=title, title_justify="left")
    for col in ("quantizer", "settings", "peer module", "tokzoo ms", "peer ms", "time ratio", "target",
                "tokzoo MiB", "peer MiB", "mem ratio", "status"):
        table.add_column(col, justify="right" if "ms" in col or "MiB" in col or "ratio" in col else "left")
    for r in results:
        mem = r.get("memory_ratio")
        table.add_row(
            r["name"],
            r["settings"],
            r["peer_module"],
            f"{r['tokzoo']['median_ms']:.1f}",
            f"{r['peer']['median_ms']:.1f}",
            f"{r['time_ratio']:.2f}",
            f"<= {r['target']:g}",
            "-" if mem is None else f"{r['tokzoo']['peak_mib']:.1f}",
            "-" if mem is None else f"{r['peer']['peak_mib']:.1f}",
            "-" if mem is None else f"{mem:.2f}",
            "ok" if r["meets_target"] else "MISS",
        )
    console.print(table)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--tokens", type=int, default=None, help="tokens per step (default: 4096 on CPU, 65536 on CUDA)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch.set_num_threads")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per module before timing")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per module (median reported)")
    p.add_argument("--update", choices=("ema", "grad"), default="ema", help="codebook update rule for both sides")
    p.add_argument("--only", nargs="+", choices=("vq", "mcq", "rq", "lfq", "fsq"), help="run only these quantizers")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    try:
        import vector_quantize_pytorch  # noqa: F401
    except ImportError:
        console.print("vector-quantize-pytorch is not installed: pip install -e '.[bench]'")
        return 2
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
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
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor()})",
        "tokens": tokens,
        "batch": tokens // n,
        "tokens_per_image": n,
        "threads": args.threads,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "update": args.update,
        "torch_version": torch.__version__,
        "peer_version": version("vector-quantize-pytorch"),
        "python": sys.version.split()[0],
        "memory": "cuda max_memory_allocated" if device.type == "cuda" else "torch.profiler CPU allocations",
    }
    results = []
    for case in make_cases(args.update):
        if args.only and case.name not in args.only:
            continue
        with console.status(f"benchmarking {case.name} ..."):
            results.append(run_case(case, tokens, device, args.warmup, args.repeats, not args.no_memory))
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
