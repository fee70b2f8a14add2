"""The few collectives a selection over several processes needs (``torch.distributed``, any
backend: gloo reduces and gathers on the CPU, NCCL on the current GPU)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def comm_device(group: Any) -> torch.device:
    """Where the tensors of a collective on ``group`` live."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(values: list[float], group: Any, dtype: torch.dtype = torch.float64) -> list[float]:
    """Element-wise sums over the ranks (one all-reduce)."""
    t = torch.tensor(values, dtype=dtype, device=comm_device(group))
    dist.all_reduce(t, group=group)
    return t.tolist()


def all_counts(values: list[int], group: Any) -> list[int]:
    return [int(v) for v in all_sum([float(v) for v in values], group, torch.int64)]


def any_rank(flag: bool, group: Any) -> bool:
    """True on every rank when it is true on some rank."""
    return all_counts([int(flag)], group)[0] > 0


def all_gather_varying(tensor: Tensor, group: Any) -> Tensor:
    """Concatenation, in rank order, of each rank's 1-D ``tensor`` (lengths may differ)."""
    dev = comm_device(group)
    world = dist.get_world_size(group)
    n = torch.tensor([tensor.numel()], dtype=torch.int64, device=dev)
    sizes = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    lengths = [int(s) for s in sizes]
    longest = max(lengths)
    buf = torch.zeros(longest, dtype=tensor.dtype, device=dev)
    buf[: tensor.numel()] = tensor.to(dev)
    out = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(out, buf, group=group)
    return torch.cat([o[:m] for o, m in zip(out, lengths, strict=True)]).to(tensor.device)
