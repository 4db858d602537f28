"""Data-parallel training across processes started by ``torchrun`` (NCCL on GPUs, gloo on CPUs).

Every rank samples the same regions (same seeds), takes every ``world``-th sample of the epoch's order and
steps a :class:`torch.nn.parallel.DistributedDataParallel` wrapper, so gradients are averaged and all ranks
keep identical weights; only rank 0 validates and writes checkpoints and logs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Rank, world size and local rank of the current process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True when more than one process trains."""
        return self.world > 1

    @property
    def main(self) -> bool:
        """True on the rank that validates and writes files."""
        return self.rank == 0


def setup(device: str | None) -> tuple[DistInfo, str]:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE`` > 1); returns the info and device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device or ("cuda" if torch.cuda.is_available() else "cpu")
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    dev = f"cuda:{local}" if use_cuda else "cpu"
    if use_cuda:
        torch.cuda.set_device(local)
    log.info("rank %d of %d on %s (%s)", rank, world, dev, dist.get_backend())
    return DistInfo(rank, world, local), dev


class LossModule(torch.nn.Module):
    """Routes ``training_losses`` through ``forward`` so DistributedDataParallel synchronises gradients."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, xn: torch.Tensor, y: torch.Tensor, epoch: int, barrier_t: float, sigma: float | None = None
    ) -> dict[str, Any]:
        """The wrapped model's training losses."""
        net: Any = self.model
        return dict(net.training_losses(xn, y, epoch=epoch, barrier_t=barrier_t, sigma=sigma))


def wrap(model: torch.nn.Module, info: DistInfo, device: str) -> torch.nn.Module:
    """The module whose ``forward`` computes the losses: DDP-wrapped when distributed."""
    lm = LossModule(model)
    if not info.enabled:
        return lm
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.local_rank] if device.startswith("cuda") else None
    return DistributedDataParallel(lm, device_ids=ids, find_unused_parameters=True)


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op when not distributed)."""
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def teardown(info: DistInfo) -> None:
    """Leave the process group."""
    if info.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def sync_buffers(model: torch.nn.Module, info: DistInfo) -> None:
    """Make BatchNorm running statistics identical on every rank (mean of the ranks' statistics).

    DistributedDataParallel broadcasts buffers from rank 0 before each forward, but every rank then updates
    them with its own batch, and SyncBatchNorm does not run on CPUs; averaging after each epoch keeps the
    ranks' models identical (checked by the torchrun test).
    """
    if not info.enabled:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for buf in model.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                buf.div_(info.world)
            else:
                dist.broadcast(buf, src=0)
