"""Which parameters are sparsified: defaults, include/exclude selectors, per-layer densities."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from .config import Selector, SparsityConfig

logger = logging.getLogger("sparselearn")

DEFAULT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


@dataclass(frozen=True, eq=False)
class Target:
    """One sparsified weight tensor."""

    name: str  # fully qualified, as in model.named_parameters()
    param: nn.Parameter
    module_type: str
    density: float | None  # a layer_density override (fixed count), else None


def _owners(model: nn.Module) -> dict[int, tuple[str, nn.Module, str]]:
    """id(param) -> (canonical name, owning module, local name); the first name wins (tying)."""
    owners: dict[int, tuple[str, nn.Module, str]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for local, p in module.named_parameters(recurse=False, remove_duplicate=False):
            if id(p) not in owners:
                full = f"{mod_name}.{local}" if mod_name else local
                owners[id(p)] = (full, module, local)
    return owners


def _eligible(module: nn.Module, local: str, param: nn.Parameter) -> bool:
    """Biases, 1-D tensors and normalisation layers are never sparsified."""
    return param.dim() >= 2 and not local.startswith("bias") and not isinstance(module, NORM_TYPES)


def _matches(selector: Selector, name: str, module: nn.Module, aliases: Sequence[str]) -> bool:
    if isinstance(selector, type):
        return isinstance(module, selector)
    if selector.startswith("re:"):
        pattern = re.compile(selector[3:])
        return any(pattern.fullmatch(a) for a in aliases)
    return selector in aliases


def find_targets(model: nn.Module, config: SparsityConfig) -> list[Target]:
    """The parameters ``config`` sparsifies, in module registration order. Frozen weights
    (``requires_grad=False``) are left dense.

    Raises ``ValueError`` for selectors that match nothing (typos) or name a parameter that can
    never be sparsified, and when nothing is left to sparsify.
    """
    owners = _owners(model)
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)

    params = {id(p): p for p in model.parameters()}
    rows = []  # (canonical name, param, module, aliases), registration order, tied weights once
    for pid, (name, module, local) in owners.items():
        rows.append((name, params[pid], module, local, aliases[pid]))

    for selector in config.include:
        if isinstance(selector, str) and not selector.startswith("re:"):
            hit = [r for r in rows if selector in r[4]]
            if not hit:
                raise ValueError(f"include: no parameter named {selector!r} in the model")
            _, p, module, local, _ = hit[0]
            if not _eligible(module, local, p):
                raise ValueError(
                    f"include: {selector!r} cannot be sparsified (biases, 1-D tensors and "
                    "normalisation layers never are)"
                )
            if not p.requires_grad:
                raise ValueError(
                    f"include: {selector!r} is frozen (requires_grad=False): a frozen weight "
                    "never changes, so its mask could not either; unfreeze it to sparsify it"
                )

    chosen: list[tuple[str, nn.Parameter, nn.Module]] = []
    used_includes: set[int] = set()
    frozen: list[str] = []
    for name, p, module, local, names in rows:
        if not _eligible(module, local, p):
            continue
        if not p.requires_grad:  # frozen weights stay dense: they never train
            frozen.append(name)
            continue
        selected = isinstance(module, DEFAULT_TYPES) and local == "weight"
        for i, selector in enumerate(config.include):
            if _matches(selector, name, module, names):
                used_includes.add(i)
                selected = True
        if selected:
            chosen.append((name, p, module))
    for i, selector in enumerate(config.include):
        if i not in used_includes:
            raise ValueError(
                f"include: {_show(selector)} matches no parameter that can be sparsified "
                "(weights of at least 2 dimensions outside normalisation layers, not frozen)"
            )

    for selector in config.exclude:
        kept = [c for c in chosen if not _matches(selector, c[0], c[2], aliases[id(c[1])])]
        if len(kept) == len(chosen):
            raise ValueError(
                f"exclude: {_show(selector)} matches none of the sparsified parameters "
                f"({', '.join(c[0] for c in chosen) or 'none'})"
            )
        chosen = kept

    if frozen:
        logger.info("frozen weights stay dense: %s", ", ".join(frozen))
    if not chosen:
        why = f" ({len(frozen)} frozen weights stay dense)" if frozen else ""
        raise ValueError(
            f"nothing to sparsify in {type(model).__name__}: it has no Linear or Conv weights "
            f"left after exclude{why}; select others with include=[...] (names, 're:' patterns "
            "or module types such as nn.Embedding, nn.LSTM)"
        )

    densities: dict[str, float] = {}
    sources: dict[str, str] = {}
    for key, dens in config.layer_density:
        hits = [c for c in chosen if _matches(key, c[0], c[2], aliases[id(c[1])])]
        if not hits:
            raise ValueError(
                f"layer_density: {key!r} matches none of the sparsified parameters "
                f"({', '.join(c[0] for c in chosen)})"
            )
        for name, _, _ in hits:
            if name in densities and densities[name] != dens:
                raise ValueError(
                    f"layer_density: {name} gets {densities[name]} from {sources[name]!r} and "
                    f"{dens} from {key!r}; make the entries agree"
                )
            densities[name], sources[name] = dens, key
    if config.dense_first:
        densities[chosen[0][0]] = 1.0
    if config.dense_last:
        densities[chosen[-1][0]] = 1.0

    for name, _, module in chosen:
        if isinstance(module, nn.Embedding) and module.sparse:
            raise ValueError(
                f"{name}: nn.Embedding(sparse=True) produces sparse gradients, which masks "
                "cannot be applied to; use sparse=False"
            )
    # a layer at density 1.0 is left dense: it is not masked at all
    targets = [
        Target(name, p, type(module).__name__, densities.get(name))
        for name, p, module in chosen
        if densities.get(name) != 1.0
    ]
    if not targets:
        raise ValueError("every selected layer is kept dense (density 1.0): nothing to sparsify")
    return targets


def _show(selector: Selector) -> str:
    return selector.__name__ if isinstance(selector, type) else repr(selector)
