"""Forward+backward time and peak memory of tokzoo's quantizers against vector-quantize-pytorch (the peer).

    python benchmarks/quantizers.py                           # CPU: 4,096 tokens; CUDA (auto-detected): 65,536
    python benchmarks/quantizers.py --device cpu --tokens 4096 --threads 1 --json bench.json
    python benchmarks/quantizers.py --update grad --only vq rq
    python benchmarks/quantizers.py --only vq-rot bsq bsq-g1 simvq ibq msrq msrq-hvq --tokens 16384

Shapes of vq, mcq, rq, lfq, fsq and vq-rot are UniTok's: latent 64; mcq 8 x 4096; rq depth 8 x 4096; vq 16,384
codes; lfq 16 bits (two groups of 8 bits); fsq levels [8, 8, 8, 5, 5, 5]. Their tokens are laid out as (B, 256, dim):
256 tokens per image (16 x 16). bsq, simvq, ibq and msrq run at their ablations/quantizer_zoo.yaml shapes: latent 32,
4096 codes (bsq: 32 bits in 4 groups of 8), (B, 64, 32): 64 tokens per image (8 x 8, msrq's scales 1, 2, 4, 8).

One step: the module in training mode, the SAME input z (a leaf that requires grad) and the same fixed upstream
gradient w for both libraries; forward, objective = sum(z_q * w) + the module's auxiliary loss, backward. Codebook
side effects (EMA updates, usage tracking) happen inside the step, as in training. The forward columns time the same
forward and objective alone (graph built, no backward; `--no-forward` skips them).

The quantizers added for issue 16 (the peer's constructor arguments as of vector-quantize-pytorch 1.32):
- vq-rot: vq with rotation_trick=True -> VectorQuantize(rotation_trick=True), otherwise the vq row's settings
  (--update applies). The trick is the same on both sides (Fifty et al. 2024; lambda R e with R, lambda detached).
- bsq -> LFQ(spherical=True, codebook_size=256, num_codebooks=4): the same 4 spheres of 8 bits, entropy weights
  0.1 / 0.1 (the peer's entropy_loss_weight 0.1 with diversity_gamma 1), inverse temperature 1 (passed to the peer's
  forward), no commitment. bsq computes the codebook entropy exactly over each group's 256 corners
  (entropy_group_bits=8), as LFQ does. bsq-g1 is bsq's default (and the zoo's) entropy_group_bits=1: the codebook
  entropy factorised per bit, a cheaper and different quantity than the peer's, timed against the same LFQ.
- simvq -> SimVQ(rotation_trick=False): frozen N(0, 1/d) codebook through a learned d x d linear map, Euclidean
  search, straight-through, codebook weight 1, commitment 0.25 (the peer's commitment_weight 1 and
  input_to_quantize_commit_loss_weight 0.25). The peer maps all K codes with a graph each step; tokzoo maps them
  without one for the search, then only the M chosen rows with one (the same gradient).
- ibq: vector-quantize-pytorch has no index-backpropagation quantizer (VectorQuantize(straight_through=True) forms
  onehot + p - sg(p) but then applies the plain straight-through to the input, which drops that path's gradient,
  and it refuses a learnable codebook), so ibq is timed against tokzoo's own vq at the same codebook size and
  token count: the zoo's vq (32 dims, 4096 codes, cosine, learned by gradient). Target: at most 1.5x vq.
- msrq: against the same tokzoo vq (target 1.5x), and as msrq-hvq against the peer's HierarchicalVQ (VAR-style
  multi-scale residual VQ, one shared codebook, one shared 3x3 phi with ratio 0.5, scales 1, 2, 4, 8, commitment
  0.25, no k-means, no dead-code replacement). It differs from msrq in ways that the peer's arguments cannot
  remove: its shared VectorQuantize is always an EMA codebook (decay 0.99; msrq learns its codebook by gradient),
  it upsamples bilinearly (msrq bicubically, as VAR), it does not detach the residual, and its commitment loss is
  per level on the pooled residual (msrq's loss compares the running sum with z). No target: for reference only.

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
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
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
ZOO_TOKENS_PER_IMAGE = 64  # the quantizer_zoo's 8 x 8 grid (vit_tiny at 32 px)
CASE_NAMES = ("vq", "mcq", "rq", "lfq", "fsq", "vq-rot", "bsq", "bsq-g1", "simvq", "ibq", "msrq", "msrq-hvq")
MAX_REPEATS = 200
MIB = 1 << 20


@dataclass
class Case:
    name: str
    dim: int
    target: float | None  # the largest acceptable tokzoo / peer time ratio; None: no target (for reference)
    ours: Callable[[], nn.Module]
    peer: Callable[[], nn.Module]  # a vector-quantize-pytorch module, or tokzoo's vq where the peer has none
    peer_objective: Callable[[nn.Module, Tensor, Tensor], Tensor]
    peer_module: str
    settings: str
    tokens_per_image: int = TOKENS_PER_IMAGE
    needs_grid: bool = False  # msrq: every image must be exactly its tokens_per_image grid


def ours_objective(module: nn.Module, z: Tensor, w: Tensor) -> Tensor:
    out = module(z)
    return (out.z_q * w).sum() + out.loss


def peer_objective_with_loss(module: nn.Module, z: Tensor, w: Tensor, **forward_kwargs) -> Tensor:
    # VectorQuantize / ResidualVQ / LFQ / SimVQ return (quantized, indices, aux loss); ResidualVQ's loss is per depth.
    quantized, _, loss = module(z, **forward_kwargs)
    return (quantized * w).sum() + loss.sum()


def peer_objective_grid(module: nn.Module, z: Tensor, w: Tensor) -> Tensor:
    # HierarchicalVQ(accept_image_fmap=True, channel_first=False) reads (B, h, w, dim): the same memory as z.
    b, n, c = z.shape
    side = math.isqrt(n)
    quantized, _, loss = module(z.view(b, side, side, c))
    return (quantized.reshape(b, n, c) * w).sum() + loss.sum()


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
        Case(
            name="vq-rot",
            dim=64,
            target=0.5,
            ours=lambda: build_quantizer(
                "vq", dim=64, codebook_size=16384, normalize=cosine, update=update, rotation_trick=True
            ),
            peer=lambda: VectorQuantize(
                dim=64, codebook_size=16384, use_cosine_sim=cosine, **{**rule, "rotation_trick": True}
            ),
            peer_objective=peer_objective_with_loss,
            peer_module="VectorQuantize, rotation",
            settings=f"vq's, with the rotation trick instead of the straight-through on both sides: 16384 codes of 64 "
            f"dims, {lookup}, {rule_desc}, commitment 0.25, no k-means init, no dead-code restarts",
        ),
        *zoo_cases(),
    ]


def zoo_vq() -> nn.Module:
    """The vq variant of ablations/quantizer_zoo.yaml (cosine lookup, codebook learned by gradient): ibq's and msrq's
    yardstick where vector-quantize-pytorch has no equivalent."""
    return build_quantizer("vq", dim=32, codebook_size=4096)


def peer_class(name: str) -> type[nn.Module]:
    """A vector-quantize-pytorch class that older releases lack (SimVQ, HierarchicalVQ), imported when used."""
    import vector_quantize_pytorch

    if not hasattr(vector_quantize_pytorch, name):
        raise ImportError(f"vector-quantize-pytorch {version('vector-quantize-pytorch')} has no {name}")
    return getattr(vector_quantize_pytorch, name)


def zoo_cases() -> list[Case]:
    """The quantizers of issue 16 at their quantizer_zoo shapes: latent 32, 4096 codes, 8 x 8 tokens per image."""
    from vector_quantize_pytorch import LFQ

    def bsq(entropy_group_bits: int) -> nn.Module:
        return build_quantizer(
            "bsq",
            dim=32,
            num_codebooks=4,
            entropy_group_bits=entropy_group_bits,
            sample_entropy_weight=0.1,
            codebook_entropy_weight=0.1,
            commitment_weight=0.0,
            inv_temperature=1.0,
        )

    def spherical_lfq() -> nn.Module:
        return LFQ(
            dim=32,
            codebook_size=256,
            num_codebooks=4,
            spherical=True,
            entropy_loss_weight=0.1,
            diversity_gamma=1.0,
            commitment_loss_weight=0.0,
        )

    spheres = "32 bits in 4 groups of 8, each on its unit sphere, entropy weights 0.1 / 0.1, inverse temperature 1"
    vq_yardstick = "tokzoo vq (no peer)"
    vq_desc = "against tokzoo vq (32 dims, 4096 codes, cosine, learned by gradient) at the same token count"
    return [
        Case(
            name="bsq",
            dim=32,
            target=1.0,
            tokens_per_image=ZOO_TOKENS_PER_IMAGE,
            ours=lambda: bsq(8),
            peer=spherical_lfq,
            peer_objective=partial(peer_objective_with_loss, inv_temperature=1.0),
            peer_module="LFQ, spherical, 4 codebooks",
            settings=f"{spheres}, codebook entropy exact over 256 corners on both sides (entropy_group_bits=8), "
            "no commitment",
        ),
        Case(
            name="bsq-g1",
            dim=32,
            target=1.0,
            tokens_per_image=ZOO_TOKENS_PER_IMAGE,
            ours=lambda: bsq(1),
            peer=spherical_lfq,
            peer_objective=partial(peer_objective_with_loss, inv_temperature=1.0),
            peer_module="LFQ, spherical, 4 codebooks",
            settings=f"{spheres}, no commitment; NOT the same entropy: ours factorised per bit (bsq's default, "
            "entropy_group_bits=1), the peer's exact over 256 corners",
        ),
        Case(
            name="simvq",
            dim=32,
            target=1.0,
            tokens_per_image=ZOO_TOKENS_PER_IMAGE,
            ours=lambda: build_quantizer("simvq", dim=32, codebook_size=4096),
            peer=lambda: peer_class("SimVQ")(
                dim=32,
                codebook_size=4096,
                rotation_trick=False,
                commitment_weight=1.0,
                input_to_quantize_commit_loss_weight=0.25,
            ),
            peer_objective=peer_objective_with_loss,
            peer_module="SimVQ",
            settings="4096 frozen codes of 32 dims through a learned 32 x 32 linear map, euclidean, straight-through "
            "(the peer's rotation trick off), codebook weight 1, commitment 0.25",
        ),
        Case(
            name="ibq",
            dim=32,
            target=1.5,
            tokens_per_image=ZOO_TOKENS_PER_IMAGE,
            ours=lambda: build_quantizer("ibq", dim=32, codebook_size=4096),
            peer=zoo_vq,
            peer_objective=ours_objective,
            peer_module=vq_yardstick,
            settings=f"4096 codes of 32 dims, dot-product logits, temperature 1, double quant / commitment / "
            f"codebook weights 1 / 1 / 0.25, no entropy term; {vq_desc}",
        ),
        Case(
            name="msrq",
            dim=32,
            target=1.5,
            tokens_per_image=ZOO_TOKENS_PER_IMAGE,
            needs_grid=True,
            ours=lambda: build_quantizer("msrq", dim=32, codebook_size=4096, scales=[1, 2, 4, 8]),
            peer=zoo_vq,
            peer_objective=ours_objective,
            peer_module=vq_yardstick,
            settings=f"one shared codebook of 4096 codes of 32 dims at scales 1, 2, 4, 8 (85 codes per 64 tokens), "
            f"euclidean, learned by gradient, phi ratio 0.5; {vq_desc}",
        ),
        Case(
            name="msrq-hvq",
            dim=32,
            target=None,
            tokens_per_image=ZOO_TOKENS_PER_IMAGE,
            needs_grid=True,
            ours=lambda: build_quantizer("msrq", dim=32, codebook_size=4096, scales=[1, 2, 4, 8]),
            peer=lambda: peer_class("HierarchicalVQ")(
                dim=32,
                codebook_size=4096,
                scales=[1, 2, 4, 8],
                accept_image_fmap=True,
                channel_first=False,
                decay=0.99,
                commitment_weight=0.25,
                rotation_trick=False,
                kmeans_init=False,
                threshold_ema_dead_code=0,
                quant_resi=0.5,
                share_quant_resi=1,
            ),
            peer_objective=peer_objective_grid,
            peer_module="HierarchicalVQ",
            settings="scales 1, 2, 4, 8, one shared codebook of 4096 codes of 32 dims, one shared phi (ratio 0.5), "
            "commitment 0.25; NOT the same rule: the peer's codebook is EMA (decay 0.99, not configurable), ours "
            "learned by gradient; bilinear vs our bicubic upsampling; see the docstring",
        ),
    ]


# ---- measurement ----------------------------------------------------------------------------------------------
class Runner:
    """One module, its input and its objective: `step()` is one training forward+backward, `forward()` its
    forward and objective alone."""

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

    def forward(self) -> float:
        """The step's forward and objective, graph built; freeing the graph is left out of the timed part."""
        sync(self.device)
        start = time.perf_counter()
        objective = self.objective(self.module, self.z, self.w)
        sync(self.device)
        elapsed = time.perf_counter() - start
        del objective
        return elapsed


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    runners: list[Runner], warmup: int, repeats: int, min_seconds: float, timed: Callable[[Runner], float] = Runner.step
) -> list[list[float]]:
    """Seconds per call of `timed` (Runner.step or Runner.forward) for each runner: calls interleaved, the order
    alternated every round."""
    for _ in range(warmup):
        for r in runners:
            timed(r)
    probe = max(timed(r) for r in runners)  # one more untimed round sizes the number of repeats
    rounds = max(repeats, min(MAX_REPEATS, int(min_seconds / max(probe, 1e-9))))
    times: list[list[float]] = [[] for _ in runners]
    for rnd in range(rounds):
        order = range(len(runners)) if rnd % 2 == 0 else reversed(range(len(runners)))
        for i in order:
            times[i].append(timed(runners[i]))
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


def layout(case: Case, tokens: int) -> int:
    """Tokens per image: the case's own when it divides the token count, else all tokens in one image."""
    return case.tokens_per_image if tokens % case.tokens_per_image == 0 else tokens


def run_case(case: Case, tokens: int, device: torch.device, args: argparse.Namespace) -> dict:
    n = layout(case, tokens)
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
    fwd_times = [None, None]
    if not args.no_forward:
        fwd_times = time_interleaved(runners, args.warmup, args.repeats, args.min_seconds, Runner.forward)
    peaks = [None if args.no_memory else peak_memory_bytes(r, device) for r in runners]
    result = {"name": case.name, "settings": case.settings, "peer_module": case.peer_module, "target": case.target}
    result["batch"], result["tokens_per_image"] = tokens // n, n
    for label, t, ft, peak in zip(("tokzoo", "peer"), times, fwd_times, peaks, strict=True):
        result[label] = {
            "median_ms": statistics.median(t) * 1e3,
            "times_ms": [x * 1e3 for x in t],
            "fwd_median_ms": None if ft is None else statistics.median(ft) * 1e3,
            "fwd_times_ms": None if ft is None else [x * 1e3 for x in ft],
            "peak_mib": None if peak is None else peak / MIB,
        }
    result["repeats"] = len(times[0])
    result["fwd_repeats"] = None if args.no_forward else len(fwd_times[0])
    result["time_ratio"] = result["tokzoo"]["median_ms"] / result["peer"]["median_ms"]
    result["fwd_ratio"] = None
    if not args.no_forward:
        result["fwd_ratio"] = result["tokzoo"]["fwd_median_ms"] / result["peer"]["fwd_median_ms"]
    result["memory_ratio"] = None
    if not args.no_memory and result["peer"]["peak_mib"] > 0:
        result["memory_ratio"] = result["tokzoo"]["peak_mib"] / result["peer"]["peak_mib"]
    result["meets_target"] = None if case.target is None else result["time_ratio"] <= case.target
    del runners, ours, peer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ---- reporting ------------------------------------------------------------------------------------------------
def render(results: list[dict], config: dict, console: Console) -> None:
    title = (
        f"training step (fwd+bwd) and forward, tokzoo vs vector-quantize-pytorch {config['peer_version']} | "
        f"{config['device']} | {config['tokens']} tokens per step | {config['threads']} thread(s) | "
        f"codebooks: {config['update']}"
    )
    table = Table(title=title, title_justify="left")
    columns = ("quantizer", "peer module", "B x N", "steps", "tokzoo ms", "peer ms", "ratio", "target",
               "tokzoo fwd ms", "peer fwd ms", "fwd ratio", "tokzoo MiB", "peer MiB", "mem ratio",
               "status")  # fmt: skip
    for col in columns:
        numeric = col in ("steps", "ratio") or col.endswith(("ms", "MiB", "ratio"))
        table.add_column(col, justify="right" if numeric else "left", no_wrap=True)

    def number(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for r in results:
        status = "-" if r["meets_target"] is None else "ok" if r["meets_target"] else "MISS"
        table.add_row(
            r["name"],
            r["peer_module"],
            f"{r['batch']} x {r['tokens_per_image']}",
            str(r["repeats"]),
            f"{r['tokzoo']['median_ms']:.1f}",
            f"{r['peer']['median_ms']:.1f}",
            f"{r['time_ratio']:.2f}",
            "-" if r["target"] is None else f"<= {r['target']:g}",
            number(r["tokzoo"]["fwd_median_ms"], ".1f"),
            number(r["peer"]["fwd_median_ms"], ".1f"),
            number(r["fwd_ratio"], ".2f"),
            number(r["tokzoo"]["peak_mib"], ".1f"),
            number(r["peer"]["peak_mib"], ".1f"),
            number(r["memory_ratio"], ".2f"),
            status,
        )
    console.print(table)
    console.print(
        "ms: median over `steps` timed steps (fwd: forward + objective alone, as many calls); ratio = tokzoo / peer "
        "(below 1: tokzoo is faster / smaller); the target applies to the fwd+bwd ratio; 'tokzoo vq (no peer)': "
        "vector-quantize-pytorch has no equivalent, the yardstick is tokzoo's vq at the same token count"
    )
    console.print("settings (the same on both sides unless a line says otherwise):")
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
    p.add_argument("--only", nargs="+", choices=CASE_NAMES, help="run only these")
    p.add_argument("--no-forward", action="store_true", help="skip the forward-only timings")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=max(Console().width, 200))  # a pipe would otherwise wrap the table at 80 columns
    try:
        version("vector-quantize-pytorch")
    except Exception:
        console.print("vector-quantize-pytorch is not installed: pip install -e '.[bench]'", markup=False)
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
    cases = [case for case in make_cases(args.update) if not args.only or case.name in args.only]
    off_grid = [case.name for case in cases if case.needs_grid and tokens % case.tokens_per_image]
    if off_grid:
        console.print(
            f"{', '.join(off_grid)}: --tokens {tokens} is not a whole number of {ZOO_TOKENS_PER_IMAGE}-token "
            f"(8 x 8) images; use a multiple of {ZOO_TOKENS_PER_IMAGE}"
        )
        return 2
    config = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "tokens": tokens,
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
    results, skipped = [], []
    for case in cases:
        with console.status(f"benchmarking {case.name} ..."):
            try:
                results.append(run_case(case, tokens, device, args))
            except ImportError as err:  # an older vector-quantize-pytorch without this case's module
                skipped.append(f"{case.name} ({err})")
    config["load_after"] = load_average()
    render(results, config, console)
    if skipped:
        console.print(f"skipped: {'; '.join(skipped)}")
    missed = [r["name"] for r in results if r["meets_target"] is False]
    if missed:
        console.print(f"missed time target: {', '.join(missed)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": config, "results": results}, indent=2))
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
