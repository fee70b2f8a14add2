"""Weights sharded by FSDP2 (``fully_shard``): each rank holds a block of rows of every weight
(a ``DTensor`` placed ``Shard(0)`` on a 1-D device mesh), and the engine keeps the mask of that
block only.

Selections are computed across the shards so that they equal what one process picks from the
same scores (:func:`sharded_top_k`): each rank proposes its candidates at or past a threshold
that all ranks agree on (an all-reduce), the proposals are all-gathered (about ``k`` values and
their positions: far less than the weights), and every rank runs the same exact selection on
them, ties ordered by global position and drawn with the engine's seeded generator, as
:func:`~sparselearn.selection.top_k` draws them. A rank then keeps the positions in its block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..selection import _kth_value, _sample_without_replacement, _split, _split_at_sampled_pivot


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


# ---------------------------------------------------------------------- collectives


def _comm_device(group: Any) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(values: list[float], group: Any, dtype: torch.dtype = torch.float64) -> list[float]:
    """Element-wise sums over the ranks (one all-reduce)."""
    t = torch.tensor(values, dtype=dtype, device=_comm_device(group))
    dist.all_reduce(t, group=group)
    return t.tolist()


def all_counts(values: list[int], group: Any) -> list[int]:
    return [int(v) for v in all_sum([float(v) for v in values], group, torch.int64)]


def any_rank(flag: bool, group: Any) -> bool:
    """True on every rank when it is true on some rank."""
    return all_counts([int(flag)], group)[0] > 0


def _all_gather_varying(tensor: Tensor, group: Any) -> Tensor:
    """Concatenation, in rank order, of each rank's 1-D ``tensor`` (lengths may differ)."""
    dev = _comm_device(group)
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


# ---------------------------------------------------------------------- selection


@dataclass
class Part:
    """One rank's share of a selection over one weight: the block's scores with a bool tensor of
    its candidates (``candidates``), or the scores of listed positions only (``positions``,
    flat within the block); ``start`` is the block's first position in the selection's global
    numbering (the layer's offset among several layers plus the block's flat start)."""

    scores: Tensor
    start: int
    numel: int  # the block's entries
    candidates: Tensor | None = None
    positions: Tensor | None = None

    def best(self, k: int, largest: bool) -> tuple[Tensor, Tensor, int]:
        """The scores and block positions of the candidates at or past this part's k-th best
        (all of them where there are no more than ``k``), and the number of candidates.
        Without ranking every candidate where most positions are candidates (growth): the
        sampled pivot of :func:`~sparselearn.selection.top_k`."""
        flat = self.scores.reshape(-1)
        if flat.dtype in (torch.float16, torch.bfloat16) or not flat.is_floating_point():
            flat = flat.float()
        if self.positions is not None:
            n = self.positions.numel()
            if n <= k:
                return flat, self.positions, n
            reach = _reaching(flat, _kth_value(flat, k, largest), largest)
            return flat[reach], self.positions[reach], n
        assert self.candidates is not None
        cand = self.candidates.reshape(-1)
        n = int(torch.count_nonzero(cand))
        if n <= k:
            idx = cand.nonzero().squeeze(1)
            return flat[idx], idx, n
        found = _split_at_sampled_pivot(flat, cand, k, n, largest)
        picked, ties = (
            found if found is not None else _split(flat, cand.nonzero()[:, 0], k, largest)
        )
        idx = torch.cat([picked, ties])
        return flat[idx], idx, n


def _reaching(values: Tensor, threshold: Tensor | float, largest: bool) -> Tensor:
    return values >= threshold if largest else values <= threshold


def sharded_top_k(
    parts: list[Part],
    k: int,
    generator: torch.Generator,
    group: Any,
    *,
    largest: bool = True,
    count: int | None = None,
) -> list[Tensor]:
    """Exactly ``k`` candidates with the largest (``largest=False``: smallest) scores over every
    rank's parts, the result of :func:`~sparselearn.selection.top_k` on the whole scores: one
    flat bool tensor per part (its block's entries). ``count``: the candidates on all ranks.

    Why it is exact: a rank whose candidates number more than ``k`` has ``k`` of them at or past
    its own k-th best value ``t``, so the global k-th best lies at or past ``t``; the largest
    such ``t`` over the ranks (``T``) is a threshold every selected or tied candidate reaches.
    The candidates at or past ``T`` (at least ``k``, at most about ``k`` per rank) are
    all-gathered and selected from; the ties at the k-th best are drawn in the order of their
    global positions, as one process draws them.
    """
    out = [torch.zeros(p.numel, dtype=torch.bool, device=p.scores.device) for p in parts]
    found = [p.best(max(k, 1), largest) for p in parts]
    n_local = sum(n for _, _, n in found)
    n_cand = all_counts([n_local], group)[0] if count is None else count
    if k < 0 or k > n_cand:
        raise ValueError(f"cannot select {k} of {n_cand} candidates")
    if k == 0:
        return out
    if k == n_cand:
        for o, (_, idx, _) in zip(out, found, strict=True):
            o[idx] = True
        return out
    vals = torch.cat([v for v, _, _ in found])
    sign = 1.0 if largest else -1.0
    own = float(_kth_value(vals, k, largest)) * sign if n_local > k else -math.inf
    t = torch.tensor([own], dtype=torch.float64, device=_comm_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    threshold = float(t) * sign
    reach = _reaching(vals, threshold, largest)
    positions = torch.cat(
        [idx.to(torch.int64) + p.start for p, (_, idx, _) in zip(parts, found, strict=True)]
    )
    every_v = _all_gather_varying(vals[reach], group)
    every_p = _all_gather_varying(positions[reach], group)
    kth = _kth_value(every_v, k, largest)
    beyond = every_v > kth if largest else every_v < kth
    picked = every_p[beyond]
    ties = every_p[every_v == kth].sort().values  # in global position order
    need = k - picked.numel()
    if need == ties.numel():
        chosen = torch.cat([picked, ties])
    else:
        draw = _sample_without_replacement(ties.numel(), need, generator, ties.device)
        chosen = torch.cat([picked, ties[draw]])
    for o, p in zip(out, parts, strict=True):
        here = chosen[(chosen >= p.start) & (chosen < p.start + p.numel)] - p.start
        o[here.to(o.device)] = True
    return out


def sharded_argmax(scores: Tensor, candidates: Tensor, shard: Shard) -> int:
    """The global flat position of the best candidate (the first, by position, among equal
    best scores: what ``argmax`` of the whole tensor gives)."""
    flat = torch.where(candidates.reshape(-1), scores.reshape(-1).double(), -math.inf)
    if flat.numel():
        best = int(flat.argmax())
        mine = torch.tensor([float(flat[best]), float(best + shard.flat_start)])
    else:
        mine = torch.tensor([-math.inf, math.inf])
    every = _all_gather_varying(mine.double(), shard.group).view(-1, 2)
    top = every[:, 0].max()
    return int(every[every[:, 0] == top, 1].min())


def refuse_sharded(model: Any, what: str, instead: str) -> None:
    """``what`` needs whole weights: refuse a model sharded by FSDP2, saying what to do."""
    if any(is_dtensor(p) for p in model.parameters()):
        raise TypeError(
            f"{what} needs whole weights, and this model is sharded by fully_shard: {instead}"
        )
