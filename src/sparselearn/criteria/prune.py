"""The built-in prune criteria: the active weights with the lowest scores go."""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import register_prune
from .view import LayerView


@register_prune("magnitude", elementwise=True)
def magnitude(layer: LayerView) -> Tensor:
    """Smallest |w| goes (sparse momentum, RigL, SET-style magnitude pruning, GMP)."""
    return layer.weight.abs()


@register_prune("global_magnitude", scope="global", elementwise=True)
def global_magnitude(layer: LayerView) -> Tensor:
    """Smallest |w| across all layers goes (DSR's global threshold, with an exact count)."""
    return layer.weight.abs()


@register_prune("set", active_only=True)
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


@register_prune("saliency", needs=("grad",), scope="global", elementwise=True)
def saliency(layer: LayerView) -> Tensor:
    """SNIP (Lee et al. 2019): connection sensitivity |g * w| on one batch, compared globally."""
    return (layer.grad * layer.weight).abs()
