"""Data-parallel helpers: every rank must hold identical masks."""

from __future__ import annotations

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
