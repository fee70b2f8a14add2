"""Data-parallel helpers: every rank must hold identical masks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def is_parallel() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _device() -> torch.device:
    # NCCL communicates CUDA tensors only; gloo and others take CPU tensors
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def same_on_all_ranks(seed: int) -> int:
    """Rank 0's seed on every rank (ranks are often seeded differently for data order)."""
    if not is_parallel():
        return seed
    t = torch.tensor([seed], dtype=torch.int64, device=_device())
    dist.broadcast(t, src=0)
    return int(t.item())


def broadcast_(tensor: torch.Tensor) -> None:
    """Overwrite ``tensor`` in place with rank 0's copy."""
    dev = _device()
    buf = tensor.to(dev, dtype=torch.uint8 if tensor.dtype == torch.bool else tensor.dtype)
    dist.broadcast(buf, src=0)
    tensor.copy_(buf.to(tensor.device, dtype=tensor.dtype))


# odd 64-bit constants (splitmix64): positions are mixed before they are summed, so that two
# masks with the same count and the same sum of positions still get different checksums
_MIX = (-7046029254386353131, -4658895280553007687, -7723592293110705685)


def checksum(mask: torch.Tensor) -> torch.Tensor:
    """(count, mixed sum of positions) of a mask, int64: equal masks give equal checksums;
    a difference is missed only by a 64-bit collision."""
    idx = mask.reshape(-1).nonzero().squeeze(1).to(torch.int64)
    h = idx * _MIX[0] + _MIX[1]  # int64 arithmetic wraps around, as a hash wants
    h = h ^ (h >> 31)
    h = h * _MIX[2]
    h = h ^ (h >> 29)
    return torch.stack([torch.tensor(idx.numel(), dtype=torch.int64, device=idx.device), h.sum()])


def disagreeing(masks: Sequence[torch.Tensor]) -> list[int]:
    """Indices of the masks that are not the same on every rank (the same list on every rank:
    one all-gather of two numbers per mask)."""
    if not is_parallel() or not masks:
        return []
    mine = torch.stack([checksum(m).cpu() for m in masks]).to(_device())  # (layers, 2)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    every = torch.stack(gathered)  # (ranks, layers, 2)
    differs = (every != every[:1]).any(dim=2).any(dim=0)
    return differs.nonzero().squeeze(1).tolist()
