"""What a criterion sees of one sparsified weight tensor at a mask update."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

SIGNALS = ("grad", "momentum")
"""The signals a criterion may declare in ``needs``."""


class Reduction(NamedTuple):
    """A layer's statistic as a reduction over positions (what :meth:`LayerView.mean` and
    :meth:`LayerView.total` return): the engine reduces ``values`` over the whole layer,
    wherever its parts are held, without gathering them."""

    values: Tensor  # 1-D, the values at the positions reduced over
    mean: bool  # their mean, else their sum (a bool tensor sums to its count)


class LayerView:
    """What a criterion may look at for one sparsified weight tensor during a mask update.

    Attributes:
        name: fully qualified parameter name, as in ``model.named_parameters()``.
        weight: the weight values, detached (criteria must not modify them); materialised on
            first access for a weight held as CSR values.
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

    __slots__ = (
        "_cache",
        "_generator",
        "_noise",
        "_signals",
        "_weight",
        "_weight_at",
        "kept",
        "mask",
        "n_grow",
        "name",
    )

    def __init__(
        self,
        name: str,
        weight: Tensor | Callable[[], Tensor],
        mask: Tensor,
        *,
        signals: Mapping[str, Callable[[], Tensor]] | None = None,
        generator: torch.Generator | None = None,
        kept: Tensor | None = None,
        n_grow: int | None = None,
        noise: Callable[[torch.Generator, Tensor], Tensor] | None = None,
        weight_at: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.name = name
        # the weight, or how to get it when a criterion first reads it (a weight held as CSR
        # values is dense only then); weight_at: its values at listed positions, without it
        self._weight = weight
        self._weight_at = weight_at
        self.mask = mask
        self.kept = kept
        self.n_grow = n_grow
        self._signals = dict(signals or {})
        self._generator = generator
        self._noise = noise
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
    def weight(self) -> Tensor:
        if not isinstance(self._weight, Tensor):
            self._weight = self._weight()
        return self._weight

    @property
    def shape(self) -> torch.Size:
        """The weight's shape (without materialising it)."""
        return self.mask.shape

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
        if self._noise is not None:  # the engine's draw for the part of the weight held here
            return self._noise(self._generator, self.mask)
        noise = torch.rand(self.mask.shape, generator=self._generator, device=self.mask.device)
        return noise.to(torch.float32)

    def mean(self, values: Tensor, where: Tensor | None = None) -> Reduction:
        """The mean of ``values`` over the positions ``where`` (bool, ``values``' shape; all of
        them if None), as a redistribution returns it: ``return
        layer.mean(layer.weight.abs(), where=layer.mask)``, or, cheaper where few are active,
        ``layer.mean(layer.weight[layer.mask].abs())``."""
        return Reduction(_at(values, where), True)

    def total(self, values: Tensor, where: Tensor | None = None) -> Reduction:
        """The sum of ``values`` over the positions ``where`` (a bool ``values``: their count),
        as a redistribution returns it."""
        return Reduction(_at(values, where), False)

    def release(self) -> None:
        """Drop the signals computed so far (the engine calls it once no criterion of this
        update reads them again); a later read computes them anew."""
        self._cache.clear()

    def with_growth(self, kept: Tensor, n_grow: int | None) -> LayerView:
        """The same view for the growth phase, sharing already computed signals."""
        view = LayerView(
            self.name,
            self._weight,
            self.mask,
            signals=self._signals,
            generator=self._generator,
            kept=kept,
            n_grow=n_grow,
            noise=self._noise,
            weight_at=self._weight_at,
        )
        view._cache = self._cache
        return view

    def at(self, idx: Tensor) -> LayerView:
        """The view restricted to the flat positions ``idx``: 1-D weight, mask and signals (the
        full signals are computed once and shared). For elementwise prune criteria."""
        signals = {key: functools.partial(_gather_signal, self, key, idx) for key in self._signals}
        if isinstance(self._weight, Tensor) or self._weight_at is None:
            weight = self.weight.reshape(-1)[idx]
        else:
            weight = self._weight_at(idx)
        return LayerView(
            self.name,
            weight,
            torch.ones(idx.numel(), dtype=torch.bool, device=idx.device),
            signals=signals,
        )


def _at(values: Tensor, where: Tensor | None) -> Tensor:
    return values.reshape(-1) if where is None else values[where]


def _gather_signal(view: LayerView, key: str, idx: Tensor) -> Tensor:
    return view._signal(key).reshape(-1)[idx]
