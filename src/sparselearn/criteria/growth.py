"""The built-in growth criteria: the inactive positions with the highest scores grow."""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import register_growth
from .view import LayerView


@register_growth("momentum", needs=("momentum",), elementwise=True)
def momentum(layer: LayerView) -> Tensor:
    """Sparse momentum: grow where the momentum of the missing weights is largest."""
    return layer.momentum.abs()


@register_growth("gradient", needs=("grad",), elementwise=True)
def gradient(layer: LayerView) -> Tensor:
    """RigL: grow where the instantaneous dense gradient is largest."""
    return layer.grad.abs()


@register_growth("random", elementwise=True)
def random(layer: LayerView) -> Tensor:
    """SET, DSR: grow at uniformly random inactive positions."""
    return layer.rand()


@register_growth("global_momentum", needs=("momentum",), scope="global", elementwise=True)
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
