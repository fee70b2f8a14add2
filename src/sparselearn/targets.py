"""Which parameters are sparsified: defaults, include/exclude selectors, per-layer densities.

By default: the weights of Linear, Conv and ConvTranspose layers, the projections of
``nn.MultiheadAttention`` (the packed ``in_proj_weight``, or ``q/k/v_proj_weight`` where key and
value have their own sizes; its ``out_proj`` is a Linear), the weights of Hugging Face's
``Conv1D`` (GPT-2's Linear layers, whose weight is stored as (in, out)) and the expert stacks of
mixtures of experts (3-D parameters holding one matrix per expert, as transformers keeps
Mixtral's and Qwen-MoE's experts). Embeddings, positional tables, norms, biases and the routers
of mixtures of experts stay dense, and so does a weight shared with one of them (an output head
tied to the token embedding). ``include`` / ``exclude`` override this. :func:`select` also says
why each weight left dense is dense (:class:`Selection`), for ``engine.summary()``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._registry import did_you_mean
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
    experts: int | None = None  # a stack of this many expert matrices (E, out, in)

    @property
    def matrix_shape(self) -> torch.Size:
        """The shape an initial distribution sizes: one expert's matrix for a stack, else the
        weight's."""
        shape = self.param.shape
        return shape[-2:] if self.experts is not None else shape


# why weights stay dense, in the order engine.summary() lists them
DENSE_REASONS = {
    "embedding": "embeddings and positional tables",
    "tied": "tied to an embedding",
    "norm": "norms",
    "bias": "biases",
    "router": "routers of mixtures of experts",
    "other": "other tensors of no layer type sparsified by default (include= adds them)",
    "vector": "other 1-D tensors (scales)",
    "frozen": "frozen (requires_grad=False)",
    "excluded": "exclude=",
    "full": "density 1.0 (layer_density, dense_first, dense_last)",
    "released": "released (engine.release)",
}


@dataclass(frozen=True)
class Selection:
    """What :func:`select` chose: the sparsified tensors, and each dense one with its reason
    (a key of :data:`DENSE_REASONS`) and size."""

    targets: list[Target]
    dense: dict[str, tuple[str, int]]  # name -> (reason, weights)


def dense_by_reason(dense: Mapping[str, tuple[str, int]]) -> list[tuple[str, int, int]]:
    """(reason, tensors, weights) for each reason that holds any of ``dense`` (name ->
    (reason, weights)), in :data:`DENSE_REASONS` order."""
    out = []
    for reason in DENSE_REASONS:
        sizes = [n for why, n in dense.values() if why == reason]
        if sizes:
            out.append((reason, len(sizes), sum(sizes)))
    return out


ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (a Linear layer whose weight is (in, out)), told by its class
    so that transformers need not be imported."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def expert_count(module: nn.Module, local: str, param: Tensor) -> int | None:
    """The number of experts if ``param`` is a stack of expert matrices, (experts, out, in) or
    (experts, in, out) (a 3-D parameter of a module that holds experts: its ``num_experts``,
    or its class named ``...Experts``, as transformers' are), else None."""
    if param.dim() != 3 or "bias" in local:
        return None
    experts = getattr(module, "num_experts", None)
    if isinstance(experts, int) and not isinstance(experts, bool):
        return experts if param.shape[0] == experts else None
    return int(param.shape[0]) if type(module).__name__.endswith("Experts") else None


def _by_default(module: nn.Module, local: str, param: Tensor) -> bool:
    if isinstance(module, nn.MultiheadAttention):
        return local in ATTENTION_WEIGHTS
    if expert_count(module, local, param) is not None:
        return True
    return local == "weight" and (isinstance(module, DEFAULT_TYPES) or is_conv1d(module))


def _routers(model: nn.Module) -> set[str]:
    """Names of the modules that route tokens to experts: a ``gate``, ``router`` or
    ``..._gate`` beside a module holding expert stacks."""
    holders = {
        name
        for name, module in model.named_modules()
        for local, p in module.named_parameters(recurse=False)
        if expert_count(module, local, p) is not None
    }
    parents = {name.rpartition(".")[0] for name in holders}
    routers = set()
    for name, _ in model.named_modules():
        parent, _, child = name.rpartition(".")
        if parent in parents and (child in ("gate", "router") or child.endswith("_gate")):
            routers.add(name)
    return routers


def _dense_reason(module: nn.Module, local: str, param: Tensor) -> str:
    """Why a tensor that no default and no include selects stays dense."""
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) or any(
        word in local.lower() for word in ("embed", "position", "pos_", "token")
    ):
        return "embedding"
    if isinstance(module, NORM_TYPES) or "Norm" in type(module).__name__:
        return "norm"
    if local.startswith("bias") or local.endswith("bias"):
        return "bias"
    return "other" if param.dim() >= 2 else "vector"


def _owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """id(param) -> [(name, owning module, local name), ...] in registration order; the first
    is the canonical name (a tied weight has several)."""
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for local, p in module.named_parameters(recurse=False, remove_duplicate=False):
            full = f"{mod_name}.{local}" if mod_name else local
            owners.setdefault(id(p), []).append((full, module, local))
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
    """The parameters ``config`` sparsifies, in module registration order (:func:`select`)."""
    return select(model, config).targets


def select(model: nn.Module, config: SparsityConfig) -> Selection:
    """The parameters ``config`` sparsifies, in module registration order, and why each other
    one stays dense. Frozen weights (``requires_grad=False``) are left dense.

    Raises ``ValueError`` for selectors that match nothing (typos) or name a parameter that can
    never be sparsified, and when nothing is left to sparsify.
    """
    owners = _owners(model)
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)

    params = {id(p): p for p in model.parameters()}
    routers = _routers(model)
    module_names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    rows = []  # (canonical name, param, module, aliases), registration order, tied weights once
    # selected by default where every module sharing the weight would be (a head tied to an
    # embedding stays dense with it); a router stays dense
    default = {
        pid: all(
            _by_default(m, loc, params[pid]) and module_names[id(m)] not in routers
            for _, m, loc in found
        )
        for pid, found in owners.items()
    }
    dense: dict[str, tuple[str, int]] = {}
    for pid, found in owners.items():
        name, module, local = found[0]
        rows.append((name, params[pid], module, local, aliases[pid]))
        p = params[pid]
        if not default[pid]:
            if any(module_names[id(m)] in routers for _, m, _ in found):
                reason = "router"
            elif any(_by_default(m, loc, p) for _, m, loc in found):
                reason = "tied"
            else:
                reason = _dense_reason(module, local, p)
            dense[name] = (reason, p.numel())

    for selector in config.include:
        if isinstance(selector, str) and not selector.startswith("re:"):
            hit = [r for r in rows if selector in r[4]]
            if not hit:
                raise ValueError(_no_such_parameter(selector, rows))
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

    chosen: list[tuple[str, nn.Parameter, nn.Module, str]] = []
    used_includes: set[int] = set()
    frozen: list[str] = []
    for name, p, module, local, names in rows:
        if not _eligible(module, local, p):
            continue
        if not p.requires_grad:  # frozen weights stay dense: they never train
            frozen.append(name)
            dense[name] = ("frozen", p.numel())
            continue
        selected = default[id(p)]
        for i, selector in enumerate(config.include):
            if _matches(selector, name, module, names):
                used_includes.add(i)
                selected = True
        if selected:
            chosen.append((name, p, module, local))
            dense.pop(name, None)
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
        for c in chosen:
            if c not in kept:
                dense[c[0]] = ("excluded", c[1].numel())
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
        for name, _, _, _ in hits:
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

    for name, _, module, _ in chosen:
        if isinstance(module, nn.Embedding) and module.sparse:
            raise ValueError(
                f"{name}: nn.Embedding(sparse=True) produces sparse gradients, which masks "
                "cannot be applied to; use sparse=False"
            )
    # a layer at density 1.0 is left dense: it is not masked at all
    targets = []
    for name, p, module, local in chosen:
        if densities.get(name) == 1.0:
            dense[name] = ("full", p.numel())
            continue
        experts = expert_count(module, local, p)
        targets.append(Target(name, p, type(module).__name__, densities.get(name), experts))
    if not targets:
        raise ValueError("every selected layer is kept dense (density 1.0): nothing to sparsify")
    return Selection(targets, dense)


def _no_such_parameter(
    name: str, rows: list[tuple[str, nn.Parameter, nn.Module, str, list[str]]]
) -> str:
    """The error for ``include`` naming a parameter the model does not have: close matches,
    and the weights it could name (attention projections among them)."""
    hint = did_you_mean(name, [a for row in rows for a in row[4]], n=3)
    candidates = [row[0] for row in rows if _eligible(row[2], row[3], row[1])]
    shown = ", ".join(candidates[:12]) + (", ..." if len(candidates) > 12 else "")
    return (
        f"include: no parameter named {name!r} in the model{hint} (weights that can be "
        f"sparsified: {shown or 'none'})"
    )


def _show(selector: Selector) -> str:
    return selector.__name__ if isinstance(selector, type) else repr(selector)
