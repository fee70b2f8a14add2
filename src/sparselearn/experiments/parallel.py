"""Data-parallel runs under ``torchrun``: ``torchrun --nproc_per_node N -m sparselearn train``.

Every rank builds the same model (the same seed) and walks the same global batches in the same
order as one process would; each rank computes on its share of every global batch (contiguous
rows, sizes that differ by at most one) and scales its loss so that the gradient DDP averages is
the gradient of the whole global batch's mean loss. Sums for the metrics (losses, correct
predictions, counts) are all-reduced. Rank 0 alone writes the run directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1

    def share(self, n: int) -> slice:
        """This rank's rows of a global batch of ``n`` (contiguous; sizes differ by at most 1)."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks (float64)."""
        if not self.parallel:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=_device())
        dist.all_reduce(t)
        return [float(v) for v in t.cpu().tolist()]

    def barrier(self) -> None:
        if self.parallel:
            dist.barrier()


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def world_from_environment(device: torch.device) -> World:
    """The world torchrun started this process in (``WORLD_SIZE``, ``RANK``), with the process
    group initialised (gloo on CPU, NCCL on CUDA); one process otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch has no torch.distributed")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def local_loss_scale(world: World, local: int, total: int) -> float:
    """What a rank's mean loss over ``local`` of ``total`` samples is multiplied by, so that
    DDP's average over the ranks is the mean over the whole global batch."""
    return world.size * local / total if total else 0.0


def shard(world: World, *tensors: Tensor) -> tuple[Tensor, ...]:
    """This rank's rows of each tensor of one global batch."""
    if not world.parallel:
        return tensors
    rows = world.share(len(tensors[0]))
    return tuple(t[rows] for t in tensors)
