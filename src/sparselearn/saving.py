"""``sl.save`` and ``sl.load``: a model, its optimizer, its engine and your own values in one
file that says when it is damaged.

The file is a :mod:`sparselearn.checkpoint`: written atomically (a temporary file, fsync,
rename, fsync of the folder; the previous file survives a crash in the middle of a write), read
with ``torch.load(..., weights_only=True)`` (no code runs on load), and carrying a sha256 of its
content, so that a flipped byte is reported with the file's name instead of loading wrong
numbers. ``sparselearn train`` writes its checkpoints with the same code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import checkpoint
from .engine import SparseEngine
from .engine.sharding import refuse_sharded

__all__ = ["load", "save"]

FORMAT = "sparselearn.save/1"
_PLAIN = (str, int, float, bool, type(None), Tensor, torch.dtype, torch.device, torch.Size)


def save(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    engine: SparseEngine | None = None,
    **extra: Any,
) -> None:
    """Write ``model``'s weights, and ``optimizer``'s and ``engine``'s state where given, with
    ``extra`` (plain values: numbers, strings, tensors, and lists and dicts of them) to
    ``path``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for key, value in extra.items():
        bad = _not_plain(value)
        if bad is not None:
            raise TypeError(
                f"extra value {key!r} holds a {bad}, which a weights_only load refuses; "
                "save plain values (numbers, strings, tensors, lists and dicts of them)"
            )
    if engine is not None and engine.model is not model:
        raise ValueError("engine sparsifies another model than the one given")
    refuse_sharded(
        model,
        "sl.save",
        "save the model and optimizer with torch.distributed.checkpoint (dcp.save of "
        "torch.distributed.checkpoint.state_dict.get_state_dict(model, optimizer)) and each "
        "rank's engine state with torch.save(engine.state_dict(), f'engine-rank{rank}.pt'); "
        'see docs/guide.md, "Sharded models: FSDP2"',
    )
    checkpoint.save(
        path,
        {
            "format": FORMAT,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "engine": engine.state_dict() if engine is not None else None,
            "extra": extra,
        },
    )


def load(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    engine: SparseEngine | None = None,
    map_location: Any = None,
) -> dict[str, Any]:
    """Restore what :func:`save` wrote into ``model`` (and ``optimizer``, ``engine`` where
    given: the engine must sparsify ``model`` with the same configuration); returns the extra
    values. Everything is checked before anything is changed: a file of another model names the
    missing, unexpected and mis-shaped tensors."""
    content = checkpoint.load(path, map_location=map_location)
    if content.get("format") != FORMAT:
        raise checkpoint.DamagedFileError(
            f"{path} was not written by sparselearn.save (format {content.get('format')!r}); "
            "load a training run's checkpoint with sparselearn train --resume"
        )
    _check_matches(path, model.state_dict(), content["model"], _sized_by_active(model))
    for name, given in (("optimizer", optimizer), ("engine", engine)):
        if given is not None and content.get(name) is None:
            raise ValueError(
                f"{path} holds no {name} state (it was saved without {name}=); load without {name}="
            )
    if engine is not None and engine.model is not model:
        raise ValueError("engine sparsifies another model than the one given")
    model.load_state_dict(content["model"])
    if optimizer is not None:
        optimizer.load_state_dict(content["optimizer"])
    if engine is not None:
        engine.load_state_dict(content["engine"])
    return dict(content.get("extra") or {})


def _sized_by_active(model: nn.Module) -> set[str]:
    """The tensors whose size is the number of active weights (an accelerated layer's values
    and indices): a saved run may hold another number, which loading adopts."""
    from .accel import SparseWeight

    return {
        f"{name}.{key}" if name else key
        for name, module in model.named_modules()
        if isinstance(module, SparseWeight)
        for key in SparseWeight.SIZED_BY_ACTIVE
    }


def _check_matches(
    path: str | os.PathLike[str],
    want: Mapping[str, Tensor],
    got: Mapping[str, Any],
    sized_by_active: set[str],
) -> None:
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    shapes = [
        f"{k} {tuple(got[k].shape)} (the model's is {tuple(v.shape)})"
        for k, v in want.items()
        if k in got
        and isinstance(got[k], Tensor)
        and got[k].shape != v.shape
        and not (k in sized_by_active and got[k].dim() == v.dim() == 1)
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for what, names in (("lacks", missing), ("has tensors the model lacks:", unexpected)):
        if names:
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            parts.append(f"{what} {', '.join(names[:5])}{more}")
    if shapes:
        parts.append("has other shapes: " + "; ".join(shapes[:5]))
    raise ValueError(
        f"{path} holds another model's weights: it {'; it '.join(parts)}. Load it into the "
        "model it was saved from"
    )


def _not_plain(value: Any) -> str | None:
    if isinstance(value, Mapping):
        for v in value.values():
            bad = _not_plain(v)
            if bad is not None:
                return bad
        return None
    if isinstance(value, (list, tuple)):
        for v in value:
            bad = _not_plain(v)
            if bad is not None:
                return bad
        return None
    return None if isinstance(value, _PLAIN) else type(value).__name__
