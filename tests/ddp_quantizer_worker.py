"""Two gloo ranks on CPU train each quantizer on DIFFERENT data and save what must agree across ranks.

Run by tests/test_quantizer_ddp.py (not a test module itself):
    python tests/ddp_quantizer_worker.py OUT_DIR [STEPS]
writes OUT_DIR/rank0.pt and OUT_DIR/rank1.pt, each
    {case: {"init", "state", "stats", "input_sum", "indices"}}.

Every rank builds the module from the same seed (as a real run does before DDP syncs it), then reseeds
with its rank, so data, k-means seeds and restart picks differ per rank; only the quantizers' own
all-reduces and broadcasts (and DDP's gradient averaging for gradient codebooks) can make them agree.
"""

from __future__ import annotations

import inspect
import os
import socket
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from tokzoo.quantizers import QUANTIZERS, build_quantizer

__test__ = False
WORLD = 2
# Newer torch renames DDP's per-forward buffer broadcast; it must be off for the test to mean anything.
NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)

# Every discrete quantizer of the registry with its example arguments (case name = registry name), plus variants
# that exercise the DDP-sensitive machinery: EMA, k-means init, dead-code restarts, expiring usage windows.
# Variant codebooks are larger than a step's 24 tokens per rank, so dead codes exist and restarts really run.
CODEBOOK_VARIANTS: dict[str, tuple[str, dict]] = {
    "vq_ema": (
        "vq",
        dict(dim=8, codebook_size=16, update="ema", kmeans_init=True, restart_dead_after=2, stats_window=3),
    ),
    "vq_grad": (
        "vq",
        dict(dim=8, codebook_size=16, update="grad", kmeans_init=True, restart_dead_after=2, stats_window=3),
    ),
    "vq_euclid_grad": ("vq", dict(dim=8, codebook_size=16, normalize=False, update="grad", restart_dead_after=3)),
    "mcq_ema": (
        "mcq",
        dict(dim=8, num_codebooks=2, codebook_size=32, update="ema", kmeans_init=True, restart_dead_after=2),
    ),
    "mcq_grad": (
        "mcq",
        dict(dim=8, num_codebooks=2, codebook_size=32, update="grad", restart_dead_after=2, stats_window=3),
    ),
    "rq_ema": (
        "rq",
        dict(dim=8, depth=3, codebook_size=32, update="ema", kmeans_init=True, restart_dead_after=2),
    ),
    "rq_shared_ema": (
        "rq",
        dict(dim=8, depth=3, codebook_size=128, shared_codebook=True, update="ema", restart_dead_after=2),
    ),
    "rq_grad": ("rq", dict(dim=8, depth=2, codebook_size=32, update="grad", restart_dead_after=2)),
}
# Lookup-free ones have only usage trackers; a 3-step window makes codes expire within the run.
VARIANTS = {
    **CODEBOOK_VARIANTS,
    "lfq_short_window": ("lfq", dict(dim=8, num_codebooks=2, stats_window=3)),
    "fsq_short_window": ("fsq", dict(levels=[5, 4], num_codebooks=2, stats_window=3)),
}


def cases() -> dict[str, tuple[str, dict]]:
    """case -> (quantizer, kwargs). Continuous quantizers have no codebook state to agree on."""
    examples = {n: (n, QUANTIZERS.example(n)) for n in QUANTIZERS.names() if not QUANTIZERS.get(n).continuous}
    return {**examples, **VARIANTS}


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def run_case(rank: int, kind: str, kwargs: dict, steps: int) -> dict:
    torch.manual_seed(0)  # identical construction on every rank
    q = build_quantizer(kind, **kwargs).train()
    model = q
    # Gradient-learned codebooks: wrap in DDP and step an optimizer (DDP refuses modules with nothing to learn).
    ddp = any(p.requires_grad for p in q.parameters())
    if ddp:
        # No per-forward buffer sync: buffers (trackers, EMA state, flags) must agree because the quantizer
        # all-reduces them, not because DDP copies rank 0's over everyone at each forward.
        model = DistributedDataParallel(q, **NO_BUFFER_SYNC)
    init = snapshot(q)
    opt = torch.optim.SGD(q.parameters(), lr=0.5) if ddp else None
    torch.manual_seed(1000 + rank)  # from here on every rank draws different numbers
    input_sum = 0.0
    for _ in range(steps):
        # Different data per rank, and a different distribution, so per-rank statistics would differ.
        z = torch.randn(4, q.num_tokens or 6, q.dim) * (1.0 + rank) + 0.5 * rank  # msrq: its grid's tokens
        input_sum += float(z.sum())
        out = model(z)
        if opt is not None:
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    return {
        "init": init,
        "state": snapshot(q),
        "stats": {k: v.detach().clone() for k, v in out.stats.items()},
        "input_sum": input_sum,
        "indices": out.indices.clone(),
    }


def worker(rank: int, port: int, out_dir: str, steps: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),  # ranks that diverge in control flow deadlock: fail fast,
    )
    try:
        results = {name: run_case(rank, kind, kwargs, steps) for name, (kind, kwargs) in cases().items()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        dist.destroy_process_group()  # no barrier: the other rank may never reach it
        raise
    # Both ranks past their last collective before either tears gloo down (a teardown racing the peer's last
    # transfer is the likely cause of a rank 0 SIGABRT seen once on a loaded CI machine).
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    out_dir = Path(sys.argv[1])
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    out_dir.mkdir(parents=True, exist_ok=True)
    mp.spawn(worker, args=(free_port(), str(out_dir), steps), nprocs=WORLD, join=True)


if __name__ == "__main__":
    main()
