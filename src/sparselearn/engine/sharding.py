"""Weights sharded by FSDP2 (``fully_shard``): each rank holds a block of rows of every weight
(a ``DTensor`` placed ``Shard(0)`` on a 1-D device mesh). :class:`Shard` says where a rank's
block lies; the engine keeps the mask of that block only, and its placement
(:class:`~sparselearn.engine.placement.RowBlock`) does the mask update's selections across the
blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def is_dtensor(t: object) -> bool:
    """A ``DTensor``, told by what it carries (``torch.distributed.tensor`` need not load)."""
    return hasattr(t, "device_mesh") and hasattr(t, "placements") and hasattr(t, "to_local")


def local_tensor(t: Tensor) -> Tensor:
    """The rank's block of a DTensor (the same storage: in-place changes reach it); a plain
    tensor as it is."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


UNSUPPORTED = (
    "sparselearn supports weights sharded by FSDP2's fully_shard on a 1-D device mesh (placement "
    "Shard(0)); {name} is a DTensor on a {ndim}-D mesh with placements {placements}. Shard the "
    "model with fully_shard(module) over one mesh dimension (no HSDP replicate dimension, no "
    "tensor parallelism), or train data-parallel with DistributedDataParallel"
)


@dataclass(frozen=True)
class Shard:
    """Where one rank's block of a weight lies in the whole weight: rows ``[start, stop)``."""

    mesh: Any  # torch.distributed.device_mesh.DeviceMesh
    placements: tuple[Any, ...]
    group: Any  # the mesh's process group
    shape: torch.Size  # the whole weight's
    start: int
    stop: int

    @property
    def row(self) -> int:
        """Entries in one row (dim 0 index) of the weight."""
        return math.prod(self.shape[1:])

    @property
    def flat_start(self) -> int:
        """The flat (row-major) position of the block's first entry in the whole weight."""
        return self.start * self.row

    def dtensor(self, local: Tensor) -> Tensor:
        """``local`` (this rank's block) as a DTensor sharded like the weight."""
        from torch.distributed.tensor import DTensor

        stride = tuple(math.prod(self.shape[i + 1 :]) for i in range(len(self.shape)))
        return DTensor.from_local(
            local, self.mesh, self.placements, run_check=False, shape=self.shape, stride=stride
        )

    def gather(self, local: Tensor) -> Tensor:
        """The whole tensor from every rank's block (an all-gather)."""
        if local.dtype == torch.bool:  # gloo reduces and gathers no bool tensors
            return self.gather(local.to(torch.uint8)).to(torch.bool)
        return self.dtensor(local.contiguous()).full_tensor()  # type: ignore[attr-defined, no-any-return]

    def block(self, whole: Tensor) -> Tensor:
        """This rank's block of a whole tensor."""
        return whole[self.start : self.stop]


def shard_of(name: str, param: Tensor) -> Shard | None:
    """The shard layout of a sharded parameter, None for a plain one; an error for layouts the
    engine does not handle (named, with what to do)."""
    if not is_dtensor(param):
        return None
    mesh = param.device_mesh  # type: ignore[attr-defined]
    placements = tuple(param.placements)  # type: ignore[attr-defined]
    if mesh.ndim != 1 or len(placements) != 1 or repr(placements[0]) != "Shard(dim=0)":
        raise TypeError(
            UNSUPPORTED.format(name=name, ndim=mesh.ndim, placements=list(map(repr, placements)))
        )
    rows = param.shape[0]
    world, rank = mesh.size(), mesh.get_local_rank()
    chunk = -(-rows // world)  # torch.chunk's split, which fully_shard uses
    start = min(rank * chunk, rows)
    stop = min(start + chunk, rows)
    local = param.to_local()  # type: ignore[attr-defined]
    if local.shape[0] != stop - start or tuple(local.shape[1:]) != tuple(param.shape[1:]):
        raise TypeError(
            f"{name}: this rank holds a block of shape {tuple(local.shape)}, not rows "
            f"[{start}, {stop}) of {tuple(param.shape)} as fully_shard's even split would; "
            "sparselearn supports fully_shard's default sharding (no custom shard placement)"
        )
    return Shard(mesh, placements, mesh.get_group(), param.shape, start, stop)


def refuse_sharded(model: Any, what: str, instead: str) -> None:
    """``what`` needs whole weights: refuse a model sharded by FSDP2, saying what to do."""
    if any(is_dtensor(p) for p in model.parameters()):
        raise TypeError(
            f"{what} needs whole weights, and this model is sharded by fully_shard: {instead}"
        )
