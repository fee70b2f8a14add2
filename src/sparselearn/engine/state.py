"""The engine's state as plain tensors and Python values (``torch.load(..., weights_only=True)``
reads it), and the checks a saved state passes before any of it is applied."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..config import SparsityConfig
from ..schedules import MaskSchedule
from .storage import LayerStorage

STATE_FORMAT = 1

_HISTORY_FIELDS = ("step", "kind", "prune_rate", "pruned", "grown", "density", "seconds", "reason")


def check_state(
    state: Any,
    config: SparsityConfig,
    schedule: MaskSchedule,
    layers: Sequence[LayerStorage],
    ema: Mapping[str, Tensor],
) -> None:
    """Raise ``ValueError`` naming what in ``state`` does not fit an engine with this
    configuration, schedule, layers and gradient averages: a different configuration, masks of
    the wrong names, types or shapes, masks that break the budget, malformed buffers."""
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
        raise ValueError(
            f"not a sparselearn engine state (format {STATE_FORMAT} expected, got "
            f"{state.get('format') if isinstance(state, Mapping) else type(state).__name__})"
        )
    missing = [k for k in ("config", "step", "masks", "generators") if k not in state]
    if missing:
        raise ValueError(f"engine state lacks {', '.join(missing)}: it is damaged or incomplete")
    ours = config.to_dict()
    saved_cfg = dict(state["config"])
    # options added since a state could be saved, with the value that keeps the old behaviour
    for key, value in (("structure", "unstructured"), ("neuron_ablation", 0.0)):
        saved_cfg.setdefault(key, value)
    diff = [k for k in sorted(set(saved_cfg) | set(ours)) if saved_cfg.get(k) != ours.get(k)]
    if diff:
        detail = ", ".join(f"{k}: saved {saved_cfg.get(k)!r}, here {ours.get(k)!r}" for k in diff)
        raise ValueError(f"engine state was saved with a different configuration ({detail})")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"engine state: step must be an integer >= 0, got {step!r}")
    masks = state["masks"]
    names = [layer.name for layer in layers]
    if not isinstance(masks, Mapping) or sorted(masks) != sorted(names):
        saved = sorted(masks) if isinstance(masks, Mapping) else type(masks).__name__
        raise ValueError(f"engine state masks {saved} do not match this engine's {sorted(names)}")
    for layer in layers:
        m = masks[layer.name]
        shape = _mask_shape(layer)
        if isinstance(m, Tensor) and m.dtype == torch.int64 and m.dim() == 1:
            if m.numel() and (
                int(m[0]) < 0 or int(m[-1]) >= layer.numel or bool((m.diff() <= 0).any())
            ):
                raise ValueError(
                    f"saved positions for {layer.name} are not ascending positions of a weight "
                    f"of {layer.numel} entries"
                )
        elif not isinstance(m, Tensor) or m.dtype != torch.bool or m.shape != shape:
            raise ValueError(
                f"saved mask for {layer.name} is not a bool tensor of shape {tuple(shape)} "
                "(nor its active positions)"
            )
    _check_budget(state, schedule, layers, masks, ablation=config.neuron_ablation > 0)
    saved_ema = state.get("ema", {})
    if sorted(saved_ema) != sorted(ema) or any(
        not isinstance(v, Tensor) or v.shape != ema[k].shape for k, v in saved_ema.items()
    ):
        raise ValueError("engine state EMA buffers do not match this engine")
    shapes = {layer.name: _mask_shape(layer) for layer in layers}  # a sharded weight's block
    for name, value in state.get("window", {}).items():
        if name not in shapes or not isinstance(value, Tensor) or value.shape != shapes[name]:
            raise ValueError(
                f"engine state: window momentum {name!r} is not a tensor of a sparsified "
                "weight's shape"
            )
    csr = {layer.name for layer in layers if layer.kind == "csr"}
    for name, saved in state.get("window_factors", {}).items():
        betas = saved.get("betas") if isinstance(saved, Mapping) else None
        steps = saved.get("steps") if isinstance(saved, Mapping) else None
        if (
            name not in csr
            or not isinstance(betas, list)
            or not isinstance(steps, list)
            or len(betas) != len(steps)
            or any(
                not isinstance(part, (list, tuple))
                or len(part) != 2
                or not all(isinstance(t, Tensor) and t.dim() == 3 for t in part)
                for step in steps
                for part in step
            )
        ):
            raise ValueError(
                f"engine state: window_factors {name!r} is not the window of an accelerated "
                "layer (its steps' gradient factors)"
            )
    generators = state["generators"]
    if not isinstance(generators, Mapping) or any(
        not isinstance(g, Tensor) or g.dtype != torch.uint8 for g in generators.values()
    ):
        raise ValueError("engine state: generators must map devices to generator states")
    for i, update in enumerate(state.get("history", [])):
        if not isinstance(update, Mapping) or sorted(update) != sorted(_HISTORY_FIELDS):
            raise ValueError(f"engine state: history[{i}] is not a mask update record")
    for layer in layers:
        problem = layer.check_loadable(masks[layer.name])
        if problem is not None:
            raise ValueError(problem)


def _mask_shape(layer: LayerStorage) -> torch.Size:
    """The shape of the layer's mask (the part held here, for a sharded weight), without
    building the mask of a layer that holds none."""
    return layer.mask.shape if layer.kind == "masked" else layer.shape


def _check_budget(
    state: Mapping[str, Any],
    schedule: MaskSchedule,
    layers: Sequence[LayerStorage],
    masks: Mapping[str, Tensor],
    *,
    ablation: bool = False,
) -> None:
    """Saved masks keep the budget the way the engine keeps it: every layer active somewhere,
    dense runs dense, and the budget exact wherever the schedule holds it (sparse from the
    start, or once a dense start has been cut to the target); with neuron ablation, no layer
    above its count."""
    active = {
        layer.name: layer.count(m) if m.dtype == torch.bool else m.numel()
        for layer in layers
        for m in [masks[layer.name]]
    }
    if not schedule.masks:
        for layer in layers:
            if active[layer.name] != layer.numel:
                raise ValueError(
                    f"engine state: masks[{layer.name!r}] has {active[layer.name]} of "
                    f"{layer.numel} weights active; a {schedule.name} run keeps every weight"
                )
        return
    for layer in layers:
        if active[layer.name] == 0:
            raise ValueError(
                f"engine state: masks[{layer.name!r}] has no active weight; the engine never "
                "empties a layer"
            )
    cut = not schedule.starts_dense or (
        not state.get("pending_one_shot", False)
        and (not schedule.updates or bool(state.get("finished", False)))
    )
    budget = sum(layer.final_count for layer in layers)
    total = sum(active.values())
    if cut and ablation:
        # removed units give their weights to the others of their layer in whole rows' worth:
        # a layer may end up to one row's worth per remaining unit below its count
        over = [layer.name for layer in layers if active[layer.name] > layer.final_count]
        if over:
            raise ValueError(
                f"engine state: masks[{over[0]!r}] holds more active weights than this "
                "engine's budget gives it; it does not belong to this configuration"
            )
    elif cut:
        if total != budget:
            raise ValueError(
                f"engine state: the masks hold {total} active weights where this engine's "
                f"budget is {budget}; they do not belong to this configuration"
            )
        for layer in layers:
            if layer.fixed and active[layer.name] != layer.final_count:
                raise ValueError(
                    f"engine state: masks[{layer.name!r}] has {active[layer.name]} active "
                    f"weights; its layer_density gives it {layer.final_count}"
                )
    elif not budget <= total <= sum(layer.numel for layer in layers):
        raise ValueError(
            f"engine state: the masks hold {total} active weights, outside this engine's range "
            f"from the budget {budget} to every weight"
        )
