"""Every rank / world-size question tokzoo asks, in one place.

Two kinds of answer: the process group's (set up by Lightning or torchrun; decided at call time, because
components are built before the group exists) and the launcher's, from Lightning's own cluster-environment
detection (torchrun, SLURM, LSF, MPI, Lightning's DDP launcher), asked before any group exists by the CLI and the
sweep's trial process to decide who prints and who writes result files. Collectives are torch.distributed's and
torchmetrics' own; nothing here hand-rolls one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) outside one."""
    return rank(), world_size()


def launcher_environment():
    """The cluster environment Lightning would pick for this process (TorchElastic for torchrun, SLURM for srun,
    Lightning's own for its DDP launcher and plain runs), asked before any process group exists."""
    from lightning.fabric.plugins.environments import (
        LightningEnvironment,
        LSFEnvironment,
        MPIEnvironment,
        SLURMEnvironment,
        TorchElasticEnvironment,
    )

    for env in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment):
        if env.detect():
            return env() if env is not SLURMEnvironment else env(auto_requeue=False)
    if MPIEnvironment.detect():
        return MPIEnvironment()
    return LightningEnvironment()


def env_rank() -> int:
    """This process's global rank as its launcher assigned it, before any process group exists.

    Under Lightning's own launcher the global rank is not known before the Trainer counts devices, but rank zero
    is exactly node 0, local rank 0; other processes get a distinct positive number (node * 1000 + local)."""
    env = launcher_environment()
    from lightning.fabric.plugins.environments import LightningEnvironment

    if isinstance(env, LightningEnvironment):
        return env.node_rank() * 1000 + env.local_rank()
    return env.global_rank()


def is_env_rank_zero() -> bool:
    return env_rank() == 0


def all_reduce_sum(t: Tensor) -> Tensor:
    """In place; a no-op outside a multi-rank group."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_from_rank0(t: Tensor) -> Tensor:
    if world_size() > 1:
        dist.broadcast(t, src=0)
    return t


def gather_rows(t: Tensor) -> Tensor:
    """Concatenate a (n_rank, ...) tensor from every rank in rank order; ranks may hold different n."""
    if world_size() <= 1:
        return t
    from torchmetrics.utilities.distributed import gather_all_tensors

    return torch.cat(gather_all_tensors(t.contiguous()))


def gather_with_grad(x: Tensor) -> Tensor:
    """(B, D) on each rank -> (world * B, D); the backward sums every rank's gradient into the local slice."""
    if world_size() <= 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)
