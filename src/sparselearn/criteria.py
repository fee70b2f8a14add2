"""Prune, growth and redistribution criteria: small pure functions of a :class:`LayerView`.

A prune or growth criterion returns a *score* tensor of the weight's shape. The engine alone turns
scores into masks: pruning removes the active positions with the lowest scores, growth activates
the inactive positions with the highest scores, ties are broken with the engine's seeded generator,
and the budget is kept exact. A redistribution criterion returns one non-negative number per layer;
the engine shares the regrowth across layers in proportion to it.

Register your own with one decorator::

    import sparselearn as sl

    @sl.register_growth("gradient_x_weight", needs=("grad",))
    def gradient_x_weight(layer: sl.LayerView) -> torch.Tensor:
        return (layer.grad * layer.weight).abs()

    sl.sparsify(model, optimizer, method="rigl", density=0.1, total_steps=n,
                growth="gradient_x_weight")
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
from torch import Tensor

from ._registry import Registry

Scope = Literal["layer", "global"]
SIGNALS = ("grad", "momentum")

ScoreFn = Callable[["LayerView"], Tensor]
StatFn = Callable[["LayerView"], float]


class LayerView:
    """What a criterion may look at for one sparsified weight tensor during a mask update.

    Attributes:
        name: fully qualified parameter name, as in ``model.named_parameters()``.
        weight: the weight values, detached (criteria must not modify them).
        mask: bool tensor, the active positions before this update.
        kept: bool tensor, the active positions left after pruning (set for growth and
            redistribution criteria, ``None`` while pruning).
        n_grow: how many positions this update grows in this layer (set for per-layer growth).

    Signals, computed on first access and only if the criterion declared them in ``needs``:
        grad: the dense gradient of the loss at this update (zeros where no gradient flowed).
        momentum: the optimizer's momentum of the dense gradient (SGD: ``momentum_buffer``;
            Adam family: ``exp_avg / (sqrt(exp_avg_sq) + eps)``; otherwise an exponential moving
            average of the gradient that the engine keeps itself).
    """

    __slots__ = ("_cache", "_generator", "_signals", "kept", "mask", "n_grow", "name", "weight")

    def __init__(
        self,
        name: str,
        weight: Tensor,
        mask: Tensor,
        *,
        signals: Mapping[str, Callable[[], Tensor]] | None = None,
        generator: torch.Generator | None = None,
        kept: Tensor | None = None,
        n_grow: int | None = None,
    ) -> None:
        self.name = name
        self.weight = weight
        self.mask = mask
        self.kept = kept
        self.n_grow = n_grow
        self._signals = dict(signals or {})
        self._generator = generator
        self._cache: dict[str, Tensor] = {}

    def _signal(self, key: str) -> Tensor:
        if key not in self._cache:
            if key not in self._signals:
                raise RuntimeError(
                    f"this criterion reads layer.{key} but was registered without "
                    f"needs=({key!r},); declare it so the engine can provide it"
                )
            self._cache[key] = self._signals[key]()
        return self._cache[key]

    @property
    def grad(self) -> Tensor:
        return self._signal("grad")

    @property
    def momentum(self) -> Tensor:
        return self._signal("momentum")

    def rand(self) -> Tensor:
        """Uniform [0, 1) noise of the weight's shape, from the engine's seeded generator."""
        if self._generator is None:
            raise RuntimeError("no generator attached to this LayerView")
        return torch.rand(
            self.weight.shape, generator=self._generator, device=self.weight.device
        ).to(torch.float32)

    def with_growth(self, kept: Tensor, n_grow: int | None) -> LayerView:
        """The same view for the growth phase, sharing already computed signals."""
        view = LayerView(
            self.name,
            self.weight,
            self.mask,
            signals=self._signals,
            generator=self._generator,
            kept=kept,
            n_grow=n_grow,
        )
        view._cache = self._cache
        return view

    def at(self, idx: Tensor) -> LayerView:
        """The view restricted to the flat positions ``idx``: 1-D weight, mask and signals (the
        full signals are computed once and shared). For elementwise prune criteria."""
        signals = {key: functools.partial(_gather_signal, self, key, idx) for key in self._signals}
        return LayerView(
            self.name,
            self.weight.reshape(-1)[idx],
            torch.ones(idx.numel(), dtype=torch.bool, device=idx.device),
            signals=signals,
        )


def _gather_signal(view: LayerView, key: str, idx: Tensor) -> Tensor:
    return view._signal(key).reshape(-1)[idx]


@dataclass(frozen=True)
class Criterion:
    """A registered prune or growth criterion."""

    name: str
    fn: ScoreFn
    needs: frozenset[str]
    scope: Scope
    doc: str
    elementwise: bool = False  # prune: a position's score depends only on its own values


@dataclass(frozen=True)
class Redistribution:
    """A registered redistribution. ``fn`` is ``None`` for "each layer regrows what it lost"."""

    name: str
    fn: StatFn | None
    needs: frozenset[str]
    doc: str


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
    name: str, *, needs: Iterable[str] = (), scope: str = "layer", elementwise: bool = False
) -> Callable[[ScoreFn], ScoreFn]:
    """Register a prune criterion: ``fn(layer) -> scores``; the lowest-scoring active weights go.

    ``scope="global"`` compares scores across layers (the engine still never empties a layer).
    ``elementwise=True`` promises that a position's score depends only on the values at that
    position (``torch.abs(layer.weight)`` does; a rank within the layer, or ``layer.rand()``,
    does not): the engine may then call ``fn`` on a view of the active weights only, with 1-D
    tensors, which saves a pass over the whole layer when few weights are active.
    """
    needs_set, scope_v = _check_needs(needs), _check_scope(scope)

    def decorator(fn: ScoreFn) -> ScoreFn:
        doc = (fn.__doc__ or "").strip()
        PRUNE.register(name, Criterion(name, fn, needs_set, scope_v, doc, elementwise))
        return fn

    return decorator


def register_growth(
    name: str, *, needs: Iterable[str] = (), scope: str = "layer"
) -> Callable[[ScoreFn], ScoreFn]:
    """Register a growth criterion: ``fn(layer) -> scores``; the highest-scoring inactive grow.

    A criterion that needs ``momentum`` makes the engine leave gradients unmasked, so that the
    momentum of missing weights keeps accumulating (the growth signal of sparse momentum).
    ``scope="global"`` grows across all layers at once and needs ``redistribution="none"``.
    """
    needs_set, scope_v = _check_needs(needs), _check_scope(scope)

    def decorator(fn: ScoreFn) -> ScoreFn:
        GROWTH.register(name, Criterion(name, fn, needs_set, scope_v, (fn.__doc__ or "").strip()))
        return fn

    return decorator


def register_redistribution(name: str, *, needs: Iterable[str] = ()) -> Callable[[StatFn], StatFn]:
    """Register a redistribution: ``fn(layer) -> float >= 0``; regrowth is shared in proportion."""
    needs_set = _check_needs(needs)

    def decorator(fn: StatFn) -> StatFn:
        REDISTRIBUTION.register(
            name, Redistribution(name, fn, needs_set, (fn.__doc__ or "").strip())
        )
        return fn

    return decorator


# ----------------------------------------------------------------------------- prune criteria


@register_prune("magnitude", elementwise=True)
def magnitude(layer: LayerView) -> Tensor:
    """Smallest |w| goes (sparse momentum, RigL, SET-style magnitude pruning, GMP)."""
    return layer.weight.abs()


@register_prune("global_magnitude", scope="global")
def global_magnitude(layer: LayerView) -> Tensor:
    """Smallest |w| across all layers goes (DSR's global threshold, with an exact count)."""
    return layer.weight.abs()


@register_prune("set")
def set_rule(layer: LayerView) -> Tensor:
    """SET (Mocanu et al. 2018): the same fraction of the positive weights closest to zero and of
    the negative weights closest to zero goes. (The 2019 code removed the most negative weights.)

    Score = rank of |w| within the weight's sign group, divided by the group size, so removing the
    k lowest scores removes about k * group_size / active from each group.
    """
    w = layer.weight.reshape(-1)
    active = layer.mask.reshape(-1)
    score = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    for group in (active & (w >= 0), active & (w < 0)):
        idx = group.nonzero().squeeze(1)
        n = idx.numel()
        if n == 0:
            continue
        order = torch.argsort(w[idx].abs(), stable=True)  # ascending |w|
        ranks = torch.arange(1, n + 1, device=w.device, dtype=torch.float32) / n
        score[idx[order]] = ranks
    return score.view_as(layer.weight)


@register_prune("saliency", needs=("grad",), scope="global")
def saliency(layer: LayerView) -> Tensor:
    """SNIP (Lee et al. 2019): connection sensitivity |g * w| on one batch, compared globally."""
    return (layer.grad * layer.weight).abs()


# ----------------------------------------------------------------------------- growth criteria


@register_growth("momentum", needs=("momentum",))
def momentum(layer: LayerView) -> Tensor:
    """Sparse momentum: grow where the momentum of the missing weights is largest."""
    return layer.momentum.abs()


@register_growth("gradient", needs=("grad",))
def gradient(layer: LayerView) -> Tensor:
    """RigL: grow where the instantaneous dense gradient is largest."""
    return layer.grad.abs()


@register_growth("random")
def random(layer: LayerView) -> Tensor:
    """SET, DSR: grow at uniformly random inactive positions."""
    return layer.rand()


@register_growth("global_momentum", needs=("momentum",), scope="global")
def global_momentum(layer: LayerView) -> Tensor:
    """Largest momentum across all layers (the 2019 library's ``global_momentum_growth``)."""
    return layer.momentum.abs()


@register_growth("momentum_neuron", needs=("momentum",))
def momentum_neuron(layer: LayerView) -> Tensor:
    """The 2019 neuron-wise variant: each output neuron gets a share of this layer's regrowth in
    proportion to its mean |momentum| and fills it with its own largest-momentum positions;
    the rest of the regrowth goes to the largest momentum anywhere in the layer.
    """
    m = layer.momentum.abs().float().reshape(layer.weight.shape[0], -1)  # (out, fan_in)
    inactive = ~layer.mask.reshape(m.shape)
    cand = m * inactive
    share = m.mean(dim=1)
    total = share.sum()
    n_grow = layer.n_grow or 0
    if total <= 0 or n_grow == 0:
        return cand.view_as(layer.weight)
    quota = torch.floor(share / total * n_grow).long()
    quota = torch.minimum(quota, inactive.sum(dim=1))
    order = torch.argsort(cand, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    cols = torch.arange(m.shape[1], device=m.device).expand_as(order)
    rank.scatter_(1, order, cols)
    within_quota = rank < quota[:, None]
    # within-quota positions score in [2, 3], all others in [0, 1]: quotas are filled first
    score = cand / cand.max().clamp_min(torch.finfo(torch.float32).tiny) + 2.0 * within_quota
    return score.view_as(layer.weight)


# ----------------------------------------------------------------------------- redistribution

REDISTRIBUTION.register(
    "none",
    Redistribution(
        "none", None, frozenset(), "Each layer regrows exactly what it lost (no redistribution)."
    ),
)


@register_redistribution("momentum", needs=("momentum",))
def momentum_redistribution(layer: LayerView) -> float:
    """Sparse momentum: mean |momentum| over the layer's active weights."""
    return float(layer.momentum[layer.mask].abs().float().mean())


@register_redistribution("magnitude")
def magnitude_redistribution(layer: LayerView) -> float:
    """Mean |w| over the layer's active weights."""
    return float(layer.weight[layer.mask].abs().float().mean())


@register_redistribution("nonzero")
def nonzero_redistribution(layer: LayerView) -> float:
    """Number of active weights before the update (the 2019 library's ``nonzero``)."""
    return float(torch.count_nonzero(layer.mask))


@register_redistribution("survivors")
def survivors_redistribution(layer: LayerView) -> float:
    """DSR: number of weights that survived this update's pruning."""
    assert layer.kept is not None
    return float(torch.count_nonzero(layer.kept))
