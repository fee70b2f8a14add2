"""Structured sparsity: masks in which every group of a weight holds the same number of
active weights, the structures that hardware and serving stacks accelerate.

- ``"unstructured"``: any positions (the default).
- ``"fan_in"``: constant fan-in. Every output unit (a row of a Linear, an output channel of a
  convolution) keeps the same number of inputs (SRigL, Lasby et al. 2024); a layer's count is
  a whole number of rows' worth. Rows of equal length need no load balancing in a kernel.
- ``"n:m"`` (``"2:4"``, ``"1:4"``, ``"4:8"``): every block of ``m`` consecutive inputs keeps
  exactly ``n`` (NVIDIA's sparse tensor cores and vLLM serve 2:4). Every layer's density is
  ``n/m``.

A weight is seen as a matrix with one row per output unit and its inputs along the row: a
Linear's (out, in); a convolution's (out, in/groups, *kernel) with the input channel innermost,
so that an N:M block runs along input channels at one kernel position (the layout of NVIDIA's
sparse convolutions); Hugging Face's ``Conv1D`` (in, out) transposed. The groups are the rows
(``fan_in``) or the blocks of ``m`` along them (``n:m``). :class:`Groups` views any per-weight
tensor of a layer as ``(groups, group size)``, and :func:`pick_per_group` selects within every
group at once, ties drawn from the engine's generator.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

STRUCTURES = ("unstructured", "fan_in", "n:m")

_N_M = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Structure:
    """A parsed ``structure`` option."""

    kind: str  # "unstructured", "fan_in" or "n:m"
    n: int = 0
    m: int = 0

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "n:m" else self.kind

    @property
    def structured(self) -> bool:
        return self.kind != "unstructured"

    @property
    def density(self) -> float | None:
        """The density every layer has under N:M; None for the others."""
        return self.n / self.m if self.kind == "n:m" else None


UNSTRUCTURED = Structure("unstructured")


def parse_structure(value: object) -> Structure:
    """``"unstructured"``, ``"fan_in"`` or ``"N:M"`` (e.g. ``"2:4"``) as a :class:`Structure`;
    a ValueError saying what is accepted otherwise."""
    if isinstance(value, Structure):
        return value
    if not isinstance(value, str):
        raise TypeError(
            f"structure must be a string ('unstructured', 'fan_in' or 'N:M' such as '2:4'), "
            f"got {type(value).__name__}"
        )
    key = value.strip().lower().replace("-", "_")
    if key in ("unstructured", "fan_in"):
        return Structure(key)
    found = _N_M.match(key)
    if found is None:
        raise ValueError(
            f"unknown structure {value!r}: use 'unstructured', 'fan_in' (constant fan-in) or "
            "'N:M' with N < M (e.g. '2:4', '1:4', '4:8')"
        )
    n, m = int(found.group(1)), int(found.group(2))
    if not 0 < n < m:
        raise ValueError(
            f"structure {value!r}: N:M needs 0 < N < M (N of every M inputs kept), e.g. '2:4'"
        )
    return Structure("n:m", n, m)


class Groups:
    """How one weight of shape ``shape`` splits into equal groups under ``structure``.

    ``layout`` says where the weight keeps its output units: ``"out_first"`` (Linear,
    convolutions, attention projections: (out, in, *kernel)) or ``"in_first"`` (Hugging
    Face's Conv1D: (in, out)). :meth:`view` gives a tensor of the weight's shape as
    ``(count, size)``, one row per group; :meth:`unview` puts it back.
    """

    def __init__(self, name: str, shape: Sequence[int], layout: str, structure: Structure) -> None:
        if not structure.structured:
            raise ValueError("unstructured weights have no groups")
        self.name, self.shape, self.layout, self.structure = name, tuple(shape), layout, structure
        if layout == "in_first":
            if len(self.shape) != 2:
                raise ValueError(f"{name}: an (in, out) weight must be 2-D, got {self.shape}")
            self.out, inputs, kernel = self.shape[1], self.shape[0], 1
        else:
            self.out, inputs = self.shape[0], self.shape[1]
            kernel = math.prod(self.shape[2:])
        self.fan_in = inputs * kernel
        if structure.kind == "fan_in":
            self.count, self.size = self.out, self.fan_in
        else:
            m = structure.m
            if inputs % m:
                what = "input channels" if kernel > 1 else "inputs"
                raise ValueError(
                    f"structure {structure.name!r}: {name} has {inputs} {what}, not a multiple "
                    f"of {m}; exclude it (exclude=[{name!r}]) or choose another M"
                )
            self.count, self.size = self.out * self.fan_in // m, m

    @property
    def per_group(self) -> int:
        """How many a group holds under N:M (the structure fixes it), 0 otherwise."""
        return self.structure.n if self.structure.kind == "n:m" else 0

    def _matrix(self, t: Tensor) -> Tensor:
        """``t`` (the weight's shape) as (out, fan_in), inputs innermost."""
        if self.layout == "in_first":
            return t.t()
        if t.dim() > 2:  # (out, in, *kernel) -> (out, *kernel, in)
            return t.permute(0, *range(2, t.dim()), 1).reshape(self.out, self.fan_in)
        return t

    def view(self, t: Tensor) -> Tensor:
        """``t`` (the weight's shape) as ``(count, size)``: one row per group."""
        return self._matrix(t).reshape(self.count, self.size)

    def unview(self, g: Tensor) -> Tensor:
        """The inverse of :meth:`view`: a ``(count, size)`` tensor in the weight's shape."""
        if self.layout == "in_first":
            return g.reshape(self.out, self.fan_in).t().contiguous()
        if len(self.shape) > 2:
            inner = (self.out, *self.shape[2:], self.shape[1])
            back = (0, len(inner) - 1, *range(1, len(inner) - 1))
            return g.reshape(inner).permute(back).contiguous()
        return g.reshape(self.shape).contiguous()

    def counts(self, mask: Tensor) -> Tensor:
        """How many active weights each group holds (int64, one per group)."""
        return self.view(mask).sum(dim=1)

    def broken(self, mask: Tensor, *, pruning: bool = False, ablation: bool = False) -> str | None:
        """Why ``mask`` does not have this structure (None: it does). ``pruning``: the mask
        of a method that prunes from dense towards the structure, whose N:M blocks hold the
        same count, N or more, until the end. ``ablation``: units may be removed (rows of
        none), the others hold the same count."""
        counts = self.counts(mask)
        if ablation:
            counts = counts[counts > 0]
            if counts.numel() == 0:
                return f"{self.name}: every unit was removed"
        low, high = int(counts.min()), int(counts.max())
        n = self.per_group
        if n and (low < n if pruning else low != n or high != n):
            return (
                f"{self.name}: every block of {self.structure.m} inputs must hold {n} active "
                f"weights, found blocks holding {low} to {high}"
            )
        if low != high:
            return (
                f"{self.name}: every output unit must keep the same number of inputs "
                f"(constant fan-in), found {low} to {high}"
            )
        return None


def layout_of(module_type: str, shape: Sequence[int], name: str, experts: int | None) -> str:
    """Where a weight of a module of ``module_type`` keeps its output units, for
    :class:`Groups`; a ValueError for the weights a structure cannot describe."""
    if experts is not None or module_type.startswith("ConvTranspose"):
        what = "a stack of expert matrices" if experts is not None else "a transposed convolution"
        raise ValueError(
            f"{name} is {what}, which structured sparsity does not cover yet; keep it dense "
            f"(exclude=[{name!r}]) or use structure='unstructured'"
        )
    if len(shape) < 2:
        raise ValueError(f"{name}: structured sparsity needs a weight of 2 or more dimensions")
    return "in_first" if module_type == "Conv1D" else "out_first"


def ranks(
    scores: Tensor, candidates: Tensor, generator: torch.Generator, *, largest: bool
) -> Tensor:
    """The rank of every entry within its row of ``scores`` (groups, size): candidates first,
    by score (highest first when ``largest``), ties in an order drawn from ``generator``; the
    other entries after them. int64, the shape of ``scores``."""
    g, s = scores.shape
    noise = torch.rand((g, s), generator=generator, device=scores.device)
    order = noise.argsort(dim=1)  # a random order, which stable sorts keep among ties
    values = scores.float().gather(1, order)
    by_score = values.sort(dim=1, descending=largest, stable=True).indices
    order = order.gather(1, by_score)
    outside = (~candidates.gather(1, order)).to(torch.uint8)
    order = order.gather(1, outside.sort(dim=1, stable=True).indices)
    out = torch.empty_like(order)
    out.scatter_(1, order, torch.arange(s, device=order.device).expand(g, s))
    return out


def pick_per_group(
    scores: Tensor,
    candidates: Tensor,
    k: int | Tensor,
    generator: torch.Generator,
    *,
    largest: bool,
) -> Tensor:
    """Bool (groups, size): the ``k`` best candidates of every group (``k``: one count for all
    groups, or one per group), ties drawn from ``generator``. Every group must hold at least
    its ``k`` candidates."""
    counts = candidates.sum(dim=1)
    want = torch.as_tensor(k, device=scores.device).expand(counts.shape)
    if bool((want > counts).any()):
        raise ValueError("a group holds fewer candidates than it must select")
    if not bool(want.any()):
        return torch.zeros_like(candidates)
    return ranks(scores, candidates, generator, largest=largest) < want.unsqueeze(1)


def whole_groups(
    total: int,
    shares: Sequence[float],
    units: Sequence[int],
    lows: Sequence[int],
    highs: Sequence[int],
) -> list[int] | None:
    """Per-layer counts per group ``k`` with ``lows[i] <= k[i] <= highs[i]`` and
    ``sum(units[i] * k[i]) == total``, near ``shares[i] / units[i]`` (``units``: each layer's
    number of groups). Each layer first gets its share rounded down to whole groups; the rest
    goes in whole groups to the layers with the largest remaining fractions, and where that
    leaves a remainder no layer's unit fits, an exact change-making pass over the remainder
    finds the combination (layers with the largest fractions first). None when no split near
    the shares adds up to ``total`` exactly."""
    n = len(units)
    floors = [math.floor(shares[i] / units[i] + 1e-9) for i in range(n)]
    order = sorted(range(n), key=lambda i: (-(shares[i] / units[i] - floors[i]), i))
    # the shares rounded down; failing that, one group below them, which leaves a larger
    # remainder for the exact pass to place
    for below in (0, 1):
        k = [min(highs[i], max(lows[i], floors[i] - below)) for i in range(n)]
        found = _place(total, k, units, highs, order, greedy=below == 0)
        if found is not None:
            return found
    return None


def _place(
    total: int,
    k: list[int],
    units: Sequence[int],
    highs: Sequence[int],
    order: Sequence[int],
    *,
    greedy: bool,
) -> list[int] | None:
    """:func:`whole_groups`'s remainder placed on top of ``k``, or None."""
    rest = total - sum(u * c for u, c in zip(units, k, strict=True))
    if rest < 0:
        return None
    progressed = greedy
    while rest > 0 and progressed:
        progressed = False
        for i in order:
            if units[i] <= rest and k[i] < highs[i]:
                k[i] += 1
                rest -= units[i]
                progressed = True
    if rest == 0:
        return k
    if rest > 1 << 17:  # the change-making table below would be too large to be worth it
        return None
    # change-making over the remainder: via[r] = the layer whose unit last reached r
    via = [-1] * (rest + 1)
    reached = [False] * (rest + 1)
    reached[0] = True
    for i in order:
        u = units[i]
        if k[i] >= highs[i]:
            continue
        for r in range(u, rest + 1):
            if not reached[r] and reached[r - u]:
                reached[r], via[r] = True, i
    if not reached[rest]:
        return None
    r = rest
    while r:
        i = via[r]
        k[i] += 1
        r -= units[i]
    if any(c > h for c, h in zip(k, highs, strict=True)):
        return None
    return k
