"""Method presets: named combinations of registered parts with the literature's defaults.

Every field of a preset is an option of :func:`sparselearn.sparsify` and can be overridden there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ._registry import Registry
from .config import OPTION_NAMES, SparsityConfig, unknown_option_message
from .schedules import MASK_SCHEDULE
from .structure import parse_structure

# What stands in for the run's length while it is not known yet (a trainer callback created
# before its trainer, a run's file checked before its data is read): long enough that no check
# against the run's length or an epoch fails for a run that can work; those checks are made
# again with the real lengths when the run starts.
_STAND_IN_STEPS = 1_000_000
_STAND_IN_EPOCH = 100_000


@dataclass(frozen=True)
class Method:
    """A named preset: defaults for :class:`SparsityConfig` fields, and where they come from."""

    name: str
    defaults: Mapping[str, Any]
    description: str = ""
    reference: str = ""

    def __post_init__(self) -> None:
        for key in self.defaults:
            if key not in OPTION_NAMES:
                raise ValueError(f"method {self.name!r}: {unknown_option_message(key)}")
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        # a preset must be valid on its own (given a density and total_steps)
        SparsityConfig(
            method=self.name, density=_probe_density(self), total_steps=1000, **self.defaults
        )


def _probe_density(method: Method) -> float:
    return 1.0 if method.defaults.get("schedule") == "dense" else 0.5


METHODS: Registry[Method] = Registry("method")


def register_method(
    name: str, *, description: str = "", reference: str = "", **defaults: Any
) -> Method:
    """Register a preset, e.g. ``register_method("my_set", schedule="periodic", prune="set",
    growth="random", init="er", prune_rate=0.2, prune_rate_schedule="constant")``."""
    return METHODS.register(name, Method(name, defaults, description, reference))


def methods() -> list[str]:
    """The names of the registered method presets."""
    return METHODS.names()


register_method(
    "dense",
    description="All weights trained; the reference every sparse method is measured against.",
    schedule="dense",
    prune=None,
    growth=None,
)
register_method(
    "static",
    description="Random sparse masks drawn at the start and never changed.",
    reference="Evci et al. 2020 (ERK static baseline)",
    schedule="fixed",
    init="erk",
    prune=None,
    growth=None,
)
register_method(
    "snip",
    description="Dense until the first step; that step's gradient picks the weights by |g*w|, "
    "compared across all layers; then static.",
    reference="Lee et al. 2019",
    schedule="one_shot",
    prune="saliency",
    growth=None,
)
register_method(
    "set",
    description="Prune the positive and negative weights closest to zero, regrow at random.",
    reference="Mocanu et al. 2018",
    schedule="periodic",
    init="er",
    prune="set",
    growth="random",
    redistribution="none",
    update_every=500,
    prune_rate=0.3,
    prune_rate_schedule="constant",
    optimizer_state="reset_grown",
)
register_method(
    "dsr",
    description="Global magnitude pruning, random regrowth shared in proportion to the weights "
    "each layer kept.",
    reference="Mostafa & Wang 2019",
    schedule="periodic",
    init="uniform",
    prune="global_magnitude",
    growth="random",
    redistribution="survivors",
    update_every=200,
    prune_rate=0.3,
    prune_rate_schedule="cosine",
    optimizer_state="reset_grown",
)
# RigL's settings, which its structured variants share
_RIGL: dict[str, Any] = {
    "schedule": "periodic",
    "init": "erk",
    "prune": "magnitude",
    "growth": "gradient",
    "redistribution": "none",
    "update_every": 100,
    "stop_at": 0.75,
    "prune_rate": 0.3,
    "prune_rate_schedule": "cosine",
    "prune_rate_min": 0.0,
    "optimizer_state": "reset_grown",
}
register_method(
    "rigl",
    description="Prune by magnitude, regrow by instantaneous dense-gradient magnitude, every 100 "
    "steps until 75% of training.",
    reference="Evci et al. 2020",
    **_RIGL,
)
register_method(
    "sparse_momentum",
    description="Prune by magnitude, redistribute by mean momentum magnitude per layer, regrow "
    "where the momentum of missing weights is largest.",
    reference="Dettmers & Zettlemoyer 2019",
    schedule="periodic",
    init="uniform",
    prune="magnitude",
    growth="momentum",
    redistribution="momentum",
    update_every=500,
    prune_rate=0.5,
    prune_rate_schedule="cosine",
    prune_rate_min=0.005,
    optimizer_state="keep",
)
register_method(
    "srigl",
    description="RigL with constant fan-in: every output unit keeps the same number of inputs "
    "(prune by magnitude across the layer, each unit regrows by gradient to the layer's "
    "fan-in); units with under 30% of their fan-in salient are removed (neuron ablation).",
    reference="Lasby et al. 2024 (SRigL)",
    **{**_RIGL, "structure": "fan_in", "neuron_ablation": 0.3},
)
register_method(
    "srigl_2_4",
    description="SRigL's schedule within 2:4 blocks (2 of every 4 inputs kept, the layout "
    "NVIDIA's sparse tensor cores and vLLM serve): density 0.5.",
    reference="Lasby et al. 2024 (N:M SRigL); Mishra et al. 2021 (2:4)",
    **{**_RIGL, "init": "uniform", "structure": "2:4"},
)
register_method(
    "gmp",
    description="Gradual magnitude pruning from dense to the target density on a cubic schedule.",
    reference="Zhu & Gupta 2017",
    schedule="gradual",
    init="uniform",
    prune="magnitude",
    growth=None,
    update_every=100,
    stop_at=0.75,
)


def make_config(
    method: str = "sparse_momentum",
    density: float | None = None,
    total_steps: int | None = None,
    *,
    run_length_known: bool = True,
    **options: Any,
) -> SparsityConfig:
    """The :class:`SparsityConfig` of a method preset with ``options`` over it: the one place
    the options are validated. Unknown methods and options, missing densities and options
    that have no effect under the method's schedule are refused here, before any model is
    touched. ``run_length_known=False`` checks everything else before the run's length (and
    its epoch's) is known, with stand-ins for them (:func:`sparselearn.sparsify` checks again
    with the real ones)."""
    preset = METHODS.get(method)
    for key in options:
        if key not in OPTION_NAMES:
            raise TypeError(unknown_option_message(key))
    params = {**preset.defaults, **options}
    schedule = MASK_SCHEDULE.get(params.get("schedule", "periodic"))
    structure = parse_structure(params.get("structure", "unstructured"))
    if structure.density is not None:
        # N:M fixes every layer's density: a preset's own initial distribution and
        # redistribution give way to it (passed explicitly, they are checked and refused)
        if "init" not in options:
            params["init"] = "uniform"
        if "redistribution" not in options and "redistribution" in params:
            params["redistribution"] = "none"
        if density is None:
            density = structure.density
    if density is None:
        if schedule.masks:
            raise ValueError(f"method {method!r} needs a density in (0, 1], e.g. density=0.05")
        density = 1.0
    unused = schedule.unused_options(set(options), params)
    if unused:
        raise ValueError(
            f"option(s) {', '.join(unused)} have no effect with method {method!r} "
            f"(schedule {schedule.name!r}); remove them"
        )
    if not run_length_known:
        total_steps = total_steps or _STAND_IN_STEPS
        if "steps_per_epoch" in schedule.options and params.get("steps_per_epoch") is None:
            params["steps_per_epoch"] = _STAND_IN_EPOCH
    return SparsityConfig(method=method, density=density, total_steps=total_steps, **params)
