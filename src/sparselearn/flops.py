"""FLOP accounting for Linear and Conv layers, dense and sparse.

One multiply-add counts as 2 FLOPs. A sparse layer is charged only for its active weights:
``2 * active weights * output positions`` (Linear: one position per sample). Normalisation,
activations, pooling and biases are not counted (they are a small share and stay dense).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

_COUNTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class LayerFlops:
    name: str  # the weight's name, e.g. "features.0.weight"
    dense: int  # FLOPs per sample with every weight active
    sparse: int  # FLOPs per sample counting active weights only
    density: float


@dataclass(frozen=True)
class FlopReport:
    """Inference FLOPs per sample."""

    layers: list[LayerFlops] = field(default_factory=list)

    @property
    def dense(self) -> int:
        return sum(layer.dense for layer in self.layers)

    @property
    def sparse(self) -> int:
        return sum(layer.sparse for layer in self.layers)

    @property
    def ratio(self) -> float:
        """Sparse FLOPs as a fraction of dense FLOPs."""
        return self.sparse / self.dense if self.dense else 1.0

    @property
    def theoretical_speedup(self) -> float:
        return self.dense / self.sparse if self.sparse else float("inf")


@torch.no_grad()
def count_flops(
    model: nn.Module,
    input_shape: tuple[int, ...],
    masks: Mapping[str, Tensor] | None = None,
) -> FlopReport:
    """Inference FLOPs per sample of ``model`` for one input of ``input_shape`` (no batch dim).

    ``masks`` (e.g. ``engine.masks``) gives the active weights; without it the model's own
    non-zero weights count as active.
    """
    names = {id(m): n for n, m in model.named_modules()}
    positions: dict[str, int] = {}

    def hook(module: nn.Module, _inputs: object, output: Tensor) -> None:
        # output positions per sample: spatial size for convolutions, 1 for Linear
        rows = _weight_shape(module)[0]
        per_channel = output[0].numel() // rows if output.dim() > 1 else 1
        positions[names[id(module)]] = per_channel

    handles = [m.register_forward_hook(hook) for m in model.modules() if _counted(m)]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()

    layers = []
    for module_name, module in model.named_modules():
        if not _counted(module) or module_name not in positions:
            continue
        weight_name = f"{module_name}.weight" if module_name else "weight"
        numel = math.prod(_weight_shape(module))
        if masks is not None and weight_name in masks:
            active = int(torch.count_nonzero(masks[weight_name]))
        elif hasattr(module, "weight_sparse"):  # an accelerated layer: its stored weights
            active = int(module.weight_sparse.nnz)
        else:
            active = int(torch.count_nonzero(_weight(module)))
        dense = 2 * numel * positions[module_name]  # every weight is used at every position
        sparse = 2 * active * positions[module_name]
        layers.append(LayerFlops(weight_name, dense, sparse, active / numel))
    return FlopReport(layers)


def _counted(module: nn.Module) -> bool:
    return isinstance(module, _COUNTED) or hasattr(module, "weight_sparse")


def _weight(module: nn.Module) -> Tensor:
    w = module.weight
    assert isinstance(w, Tensor)
    return w


def _weight_shape(module: nn.Module) -> tuple[int, ...]:
    if hasattr(module, "weight_sparse"):  # SparseLinear / SparseConv2d
        storage: Any = module.weight_sparse
        return tuple(storage.shape)
    return tuple(_weight(module).shape)


@dataclass(frozen=True)
class TrainingLayerFlops:
    """FLOPs per sample of one layer: inference, and a training step (forward, input gradient,
    weight gradient)."""

    name: str
    density: float
    inference_dense: int
    inference_sparse: int
    train_dense: int
    train_sparse: int  # as this engine computes it, dense-gradient steps amortised
    train_paper: int  # every product at the active weights only (the 2019 paper's accounting)


@dataclass(frozen=True)
class TrainingFlopReport:
    """:func:`flops`: per layer and in total; ``dense_gradient_share`` is the fraction of
    training steps on which the engine needs the dense weight gradient."""

    layers: list[TrainingLayerFlops]
    dense_gradient_share: float

    def total(self, field_name: str) -> int:
        return sum(getattr(layer, field_name) for layer in self.layers)

    @property
    def inference_speedup(self) -> float:
        return self.total("inference_dense") / max(1, self.total("inference_sparse"))

    @property
    def train_speedup(self) -> float:
        """Theoretical training-step speedup as the engine computes (dense gradients included)."""
        return self.total("train_dense") / max(1, self.total("train_sparse"))

    @property
    def paper_speedup(self) -> float:
        """The speedup the paper's FLOP accounting would claim (all products sparse)."""
        return self.total("train_dense") / max(1, self.total("train_paper"))

    def table(self) -> str:
        """Per-layer text table, in MFLOPs per sample."""
        head = (
            f"{'layer':<28} {'density':>8} {'infer dense':>12} {'infer sparse':>13} "
            f"{'train dense':>12} {'train sparse':>13} {'train paper':>12}"
        )
        rows = [head, "-" * len(head)]

        def mf(x: int) -> str:
            return f"{x / 1e6:.2f}"

        for r in self.layers:
            rows.append(
                f"{r.name:<28} {r.density:>8.4f} {mf(r.inference_dense):>12} "
                f"{mf(r.inference_sparse):>13} {mf(r.train_dense):>12} "
                f"{mf(r.train_sparse):>13} {mf(r.train_paper):>12}"
            )
        rows.append(
            f"{'total':<28} {'':>8} {mf(self.total('inference_dense')):>12} "
            f"{mf(self.total('inference_sparse')):>13} {mf(self.total('train_dense')):>12} "
            f"{mf(self.total('train_sparse')):>13} {mf(self.total('train_paper')):>12}"
        )
        rows.append(
            f"theoretical speedup: inference {self.inference_speedup:.2f}x, training step "
            f"{self.train_speedup:.2f}x as computed (dense weight gradient on "
            f"{100 * self.dense_gradient_share:.1f}% of steps), {self.paper_speedup:.2f}x by the "
            "paper's accounting"
        )
        return "\n".join(rows)


def dense_gradient_share(engine: Any) -> float:
    """Fraction of training steps on which ``engine`` needs the dense weight gradient: every
    step for sparse momentum without a momentum window, update steps (and window steps) for the
    others, none for fixed masks (:meth:`sparselearn.engine.Calendar.dense_gradient_share`)."""
    share: float = engine.calendar.dense_gradient_share()
    return share


def flops(model: nn.Module, engine: Any, input_shape: tuple[int, ...]) -> TrainingFlopReport:
    """FLOPs per sample of ``model`` under ``engine``'s masks for one input of ``input_shape``
    (no batch dimension): inference and a training step, dense and sparse, per layer.

    A training step is counted as three products per layer (forward, input gradient, weight
    gradient), each ``2 * weights * positions`` dense. Sparse: the forward and input gradient
    at the active weights; the weight gradient at the active weights, or dense on the steps
    where the engine needs the dense gradient (``dense_gradient_share``). The paper's
    accounting charges every product at the active weights only.
    """
    inference = count_flops(model, input_shape, engine.masks)
    share = dense_gradient_share(engine)
    layers = []
    for r in inference.layers:
        sparsified = r.name in engine.masks
        grad_w = (share * r.dense + (1 - share) * r.sparse) if sparsified else r.dense
        layers.append(
            TrainingLayerFlops(
                name=r.name,
                density=r.density,
                inference_dense=r.dense,
                inference_sparse=r.sparse,
                train_dense=3 * r.dense,
                train_sparse=int(2 * r.sparse + grad_w),
                train_paper=3 * r.sparse,
            )
        )
    return TrainingFlopReport(layers, share)
