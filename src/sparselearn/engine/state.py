"""The engine's state as plain tensors and Python values (``torch.load(..., weights_only=True)``
reads it), and the checks a saved state passes before any of it is applied."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .storage import LayerStorage

STATE_FORMAT = 1


def check_state(
    state: Any, config: Mapping[str, Any], layers: list[LayerStorage], ema: Mapping[str, Tensor]
) -> None:
    """Raise ``ValueError`` naming what in ``state`` does not fit an engine with this
    configuration (``config``: its ``to_dict()``), these layers and these gradient averages."""
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
        raise ValueError(
            f"not a sparselearn engine state (format {STATE_FORMAT} expected, got "
            f"{state.get('format') if isinstance(state, Mapping) else type(state).__name__})"
        )
    saved_cfg = dict(state["config"])
    diff = [k for k in sorted(set(saved_cfg) | set(config)) if saved_cfg.get(k) != config.get(k)]
    if diff:
        detail = ", ".join(f"{k}: saved {saved_cfg.get(k)!r}, here {config.get(k)!r}" for k in diff)
        raise ValueError(f"engine state was saved with a different configuration ({detail})")
    masks = state["masks"]
    names = [layer.name for layer in layers]
    if sorted(masks) != sorted(names):
        raise ValueError(
            f"engine state masks {sorted(masks)} do not match this engine's {sorted(names)}"
        )
    for layer in layers:
        m = masks[layer.name]
        if not isinstance(m, Tensor) or m.dtype != torch.bool or m.shape != layer.mask.shape:
            raise ValueError(
                f"saved mask for {layer.name} is not a bool tensor of shape "
                f"{tuple(layer.mask.shape)}"
            )
    saved_ema = state.get("ema", {})
    if sorted(saved_ema) != sorted(ema) or any(
        v.shape != ema[k].shape for k, v in saved_ema.items()
    ):
        raise ValueError("engine state EMA buffers do not match this engine")
    for layer in layers:
        problem = layer.check_loadable(masks[layer.name])
        if problem is not None:
            raise ValueError(problem)
