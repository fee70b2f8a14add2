"""Exact integer budgets: initial distributions across layers and proportional allocation.

An initial distribution (``uniform``, ``er``, ``erk``) gives each weight shape a *relative*
density; :func:`layer_counts` scales them so that the total number of active weights is exactly
``round(density * total)``, with no layer above full density (the excess goes to the others, as in
Evci et al. 2020).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ._registry import Registry

InitFn = Callable[[torch.Size], float]

INIT: Registry[InitFn] = Registry("init")


def register_init(name: str) -> Callable[[InitFn], InitFn]:
    """Register an initial distribution: ``fn(shape) -> relative density`` (> 0)."""
    return INIT.decorator(name)


@register_init("uniform")
def uniform(shape: torch.Size) -> float:
    """Every layer at the same density (the sparse momentum paper)."""
    return 1.0


@register_init("er")
def erdos_renyi(shape: torch.Size) -> float:
    """Erdős–Rényi (SET): density ∝ (fan_out + fan_in) / (fan_out * fan_in), kernel ignored.
    (A stack of expert matrices is sized by one expert's (out, in) shape.)"""
    fan_out, fan_in = shape[0], shape[1]
    return (fan_out + fan_in) / (fan_out * fan_in)


@register_init("erk")
def erdos_renyi_kernel(shape: torch.Size) -> float:
    """Erdős–Rényi-Kernel (RigL): density ∝ sum of all dimensions / product of all dimensions.
    (A stack of expert matrices is sized by one expert's (out, in) shape.)"""
    return sum(shape) / math.prod(shape)


def allocate(total: int, weights: Sequence[float], caps: Sequence[int]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights``, each at most its cap.

    Shares that would exceed their cap are fixed at the cap and the excess is spread over the
    others (water-filling); the rounding remainder goes to the largest fractional parts. When the
    layers with positive weight cannot hold ``total``, the rest fills the others by free capacity.

    >>> allocate(10, [1.0, 1.0, 2.0], [10, 1, 10])
    [3, 1, 6]
    """
    n = len(weights)
    if len(caps) != n:
        raise ValueError(f"{n} weights but {len(caps)} caps")
    if any(c < 0 for c in caps):
        raise ValueError(f"caps must be >= 0, got {list(caps)}")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"weights must be finite and >= 0, got {list(weights)}")
    if total < 0 or total > sum(caps):
        raise ValueError(f"cannot allocate {total} into capacities summing to {sum(caps)}")

    shares = [0.0] * n
    open_ = [i for i in range(n) if weights[i] > 0 and caps[i] > 0]
    remaining = float(total)
    while open_ and remaining > 0:
        mass = sum(weights[i] for i in open_)
        # remaining * (w / mass): a fraction times the remainder never overflows
        want = {i: remaining * (weights[i] / mass) for i in open_}
        over = [i for i in open_ if want[i] >= caps[i]]
        if not over:
            for i in open_:
                shares[i] = want[i]
            remaining = 0.0
            break
        for i in over:
            shares[i] = float(caps[i])
            remaining -= caps[i]
        open_ = [i for i in open_ if i not in over]
    if remaining > 0:  # positive-weight layers are full: fill the rest by free capacity
        free = [caps[i] - shares[i] for i in range(n)]
        room = sum(free)
        for i in range(n):
            shares[i] += remaining * free[i] / room

    counts = [min(caps[i], math.floor(shares[i] + 1e-9)) for i in range(n)]
    short = total - sum(counts)
    order = sorted(range(n), key=lambda i: (-(shares[i] - counts[i]), i))
    while short > 0:  # largest remainder first; loops again only if caps block the first pass
        progressed = False
        for i in order:
            if short == 0:
                break
            if counts[i] < caps[i]:
                counts[i] += 1
                short -= 1
                progressed = True
        if not progressed:  # pragma: no cover - excluded by the capacity check above
            raise RuntimeError("allocation could not place its remainder")
    return counts


def layer_counts(
    init: str,
    shapes: Sequence[torch.Size],
    density: float,
    names: Sequence[str],
    numels: Sequence[int] | None = None,
) -> list[int]:
    """Active weights per layer for ``density`` under the ``init`` distribution (exact total).

    ``shapes``: what the distribution sizes (for a stack of expert matrices, one matrix);
    ``numels``: each layer's weights, where they are not the product of its shape (a stack).
    Raises ``ValueError`` naming the layers that would get no weight at all.
    """
    fn = INIT.get(init)
    numels = [math.prod(s) for s in shapes] if numels is None else list(numels)
    relative = []
    for name, shape in zip(names, shapes, strict=True):
        rho = float(fn(shape))
        if not math.isfinite(rho) or rho <= 0:
            raise ValueError(f"init {init!r} gave {name} a relative density of {rho}; need > 0")
        relative.append(rho)
    budget = round(density * sum(numels))
    counts = allocate(budget, [r * n for r, n in zip(relative, numels, strict=True)], numels)
    empty = [
        f"{name} ({n} weights)" for name, n, c in zip(names, numels, counts, strict=True) if c == 0
    ]
    if empty:
        raise ValueError(
            f"density {density} leaves no active weight in {', '.join(empty)} under init "
            f"{init!r}; raise the density, give these layers a layer_density, or exclude them"
        )
    return counts
