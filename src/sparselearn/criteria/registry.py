"""The registries of criteria, and the decorators that fill them."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, TypeVar

from torch import Tensor

from .._registry import Registry
from .view import SIGNALS, LayerView, Reduction

Scope = Literal["layer", "global"]

ScoreFn = Callable[[LayerView], Tensor]
StatFn = Callable[[LayerView], "float | Reduction"]


@dataclass(frozen=True)
class Criterion:
    """A registered prune or growth criterion."""

    name: str
    fn: ScoreFn
    needs: frozenset[str]
    scope: Scope
    doc: str
    elementwise: bool = False  # a position's score depends only on the values at it
    # (prune) the active positions' scores depend only on the active positions' values, as a
    # rank among them does: true of every elementwise criterion
    active_only: bool = False


@dataclass(frozen=True)
class Redistribution:
    """A registered redistribution. ``fn`` is ``None`` for "each layer regrows what it lost"."""

    name: str
    fn: StatFn | None
    needs: frozenset[str]
    doc: str
    # reads the layer only at its active (``mask``) or kept positions, reducing over them: a
    # layer held in index form gets a 1-D view of its active positions instead of the whole
    elementwise: bool = False


PRUNE: Registry[Criterion] = Registry("prune criterion")
GROWTH: Registry[Criterion] = Registry("growth criterion")
REDISTRIBUTION: Registry[Redistribution] = Registry("redistribution")

F = TypeVar("F", bound=Callable[..., object])


def _check_needs(needs: Iterable[str]) -> frozenset[str]:
    if isinstance(needs, str):
        raise TypeError(f"needs must be a sequence of signal names, got the string {needs!r}")
    out = frozenset(needs)
    bad = sorted(out - set(SIGNALS))
    if bad:
        raise ValueError(f"unknown signal(s) {bad} in needs; choices: {', '.join(SIGNALS)}")
    return out


def _check_scope(scope: str) -> Scope:
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    return "layer" if scope == "layer" else "global"


def register_prune(
    name: str,
    *,
    needs: Iterable[str] = (),
    scope: str = "layer",
    elementwise: bool = False,
    active_only: bool = False,
) -> Callable[[ScoreFn], ScoreFn]:
    """Register a prune criterion: ``fn(layer) -> scores``; the lowest-scoring active weights go.

    ``scope="global"`` compares scores across layers (the engine still never empties a layer).
    ``elementwise=True`` promises that a position's score depends only on the values at that
    position (``torch.abs(layer.weight)`` does; a rank within the layer, or ``layer.rand()``,
    does not): the engine may then call ``fn`` on any subset of the layer's positions, e.g. a
    view of the active weights only, with 1-D tensors, which saves a pass over the whole
    layer when few weights are active. Without it, ``fn`` always sees the whole layer.
    ``active_only=True`` promises less: the scores of the active positions depend only on the
    values at active positions (a rank among the active weights, as SET's rule): a layer held
    as CSR values is then scored as a 1-D view of its active positions, never built dense.
    """
    needs_set, scope_v = _check_needs(needs), _check_scope(scope)

    def decorator(fn: ScoreFn) -> ScoreFn:
        doc = (fn.__doc__ or "").strip()
        PRUNE.register(
            name,
            Criterion(name, fn, needs_set, scope_v, doc, elementwise, elementwise or active_only),
        )
        return fn

    return decorator


def register_growth(
    name: str, *, needs: Iterable[str] = (), scope: str = "layer", elementwise: bool = False
) -> Callable[[ScoreFn], ScoreFn]:
    """Register a growth criterion: ``fn(layer) -> scores``; the highest-scoring inactive grow.

    A criterion that needs ``momentum`` makes the engine leave gradients unmasked, so that the
    momentum of missing weights keeps accumulating (the growth signal of sparse momentum).
    ``scope="global"`` grows across all layers at once and needs ``redistribution="none"``.
    ``elementwise=True`` promises that a position's score depends only on the values at that
    position (``layer.rand()`` counts as such: it is drawn per position of the whole weight):
    the engine may then call ``fn`` on any subset of the layer's positions.
    """
    needs_set, scope_v = _check_needs(needs), _check_scope(scope)

    def decorator(fn: ScoreFn) -> ScoreFn:
        doc = (fn.__doc__ or "").strip()
        GROWTH.register(name, Criterion(name, fn, needs_set, scope_v, doc, elementwise))
        return fn

    return decorator


def register_redistribution(
    name: str, *, needs: Iterable[str] = (), elementwise: bool = False
) -> Callable[[StatFn], StatFn]:
    """Register a redistribution: ``fn(layer)`` gives one number >= 0 per layer; regrowth is
    shared in proportion. Return a float, or, for a mean or a sum over positions, what
    ``layer.mean(values, where=...)`` or ``layer.total(values, where=...)`` gives: the engine
    then reduces it over the whole layer wherever its parts are held, never gathering them.

    ``elementwise=True`` says that ``fn`` reads the layer only at the positions of its
    ``mask`` or ``kept`` and reduces over them (``layer.mean(layer.weight[layer.mask].abs())``
    does): a layer held as CSR values is then given as a 1-D view of its active positions,
    with no tensor of the weight's size (:mod:`sparselearn.engine.listed`)."""
    needs_set = _check_needs(needs)

    def decorator(fn: StatFn) -> StatFn:
        doc = (fn.__doc__ or "").strip()
        REDISTRIBUTION.register(name, Redistribution(name, fn, needs_set, doc, elementwise))
        return fn

    return decorator
