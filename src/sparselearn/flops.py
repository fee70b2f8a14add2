"""FLOP accounting for Linear and Conv layers, dense and sparse.

One multiply-add counts as 2 FLOPs. A sparse layer is charged only for its active weights:
``2 * active weights * output positions`` (Linear: one position per sample). Normalisation,
activations, pooling and biases are not counted (they are a small share and stay dense).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

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
        weight: Tensor = module.weight  # type: ignore[assignment]
        per_channel = output[0].numel() // weight.shape[0] if output.dim() > 1 else 1
        positions[names[id(module)]] = per_channel

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _COUNTED)]
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
        if not isinstance(module, _COUNTED) or module_name not in positions:
            continue
        weight_name = f"{module_name}.weight" if module_name else "weight"
        w = module.weight
        if masks is not None and weight_name in masks:
            active = int(torch.count_nonzero(masks[weight_name]))
        else:
            active = int(torch.count_nonzero(w))
        dense = 2 * w.numel() * positions[module_name]  # every weight is used at every position
        sparse = 2 * active * positions[module_name]
        layers.append(LayerFlops(weight_name, dense, sparse, active / w.numel()))
    return FlopReport(layers)
