"""The resolved configuration of a sparse training run: a frozen dataclass that validates itself."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from ._registry import did_you_mean, unknown_name_message
from .budget import INIT
from .criteria import GROWTH, PRUNE, REDISTRIBUTION
from .schedules import MASK_SCHEDULE, PRUNE_RATE_SCHEDULE
from .structure import parse_structure

OPTIMIZER_STATE_POLICIES = ("keep", "reset_grown", "reset_pruned", "reset_both")

Selector = str | type[nn.Module]


def _check_unit(name: str, value: object, *, low_open: bool, high_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    lo_ok = v > 0 if low_open else v >= 0
    hi_ok = v < 1 if high_open else v <= 1
    if not (math.isfinite(v) and lo_ok and hi_ok):
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return v


def _check_selectors(name: str, value: object) -> tuple[Selector, ...]:
    if isinstance(value, (str, type)):
        value = (value,)
    if not isinstance(value, (list, tuple)):
        raise TypeError(
            f"{name} must be a list of parameter names, 're:' patterns or module types, "
            f"got {type(value).__name__}"
        )
    for item in value:
        if isinstance(item, type) and issubclass(item, nn.Module):
            continue
        if not isinstance(item, str) or not item or item == "re:":
            raise TypeError(
                f"{name} entries must be parameter names, 're:' patterns or nn.Module "
                f"subclasses, got {item!r}"
            )
    return tuple(value)


def _option(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class SparsityConfig:
    """Everything that defines how a model is trained sparse. Build it with
    :func:`sparselearn.sparsify` (which merges a method preset with your options) or directly.

    docs/guide.md, "Options", gives the meaning and default of every field.
    """

    method: str = _option("custom", "the preset these options came from")
    density: float = _option(1.0, "fraction of weights kept active, in (0, 1]")
    total_steps: int | None = _option(None, "optimizer steps in the whole run")
    schedule: str = _option("periodic", "mask schedule: dense, fixed, one_shot, periodic, gradual")
    init: str = _option("uniform", "initial distribution: uniform, er, erk")
    prune: str | None = _option("magnitude", "prune criterion")
    growth: str | None = _option("momentum", "growth criterion")
    redistribution: str = _option("none", "redistribution")
    update_every: int | Literal["epoch"] = _option(
        100, "optimizer steps between mask updates, or 'epoch'; 0: never"
    )
    steps_per_epoch: int | None = _option(
        None, "optimizer steps per epoch (for update_every='epoch')"
    )
    start_at: float = _option(0.0, "fraction of training before which masks stay fixed")
    stop_at: float = _option(1.0, "fraction of training after which masks freeze")
    prune_rate: float = _option(0.5, "fraction of active weights pruned at each update")
    prune_rate_schedule: str = _option("cosine", "cosine, linear or constant")
    prune_rate_min: float = _option(0.005, "where the prune-rate schedule ends")
    optimizer_state: str = _option("keep", "keep, reset_grown, reset_pruned, reset_both")
    ema_decay: float = _option(
        0.9, "decay of the engine's gradient average (optimizers without momentum)"
    )
    momentum_window: int | None = _option(
        None,
        "growth by momentum: accumulate dense gradients only in this many steps before each "
        "update (the variant that trains sparse in between)",
    )
    include: tuple[Selector, ...] = _option(
        (), "extra tensors to sparsify: names, 're:' patterns, 'type:Embedding'"
    )
    exclude: tuple[Selector, ...] = _option(
        (), "tensors to keep dense: names, 're:' patterns, 'type:...'"
    )
    layer_density: tuple[tuple[str, float], ...] = _option(
        (), "NAME=DENSITY pairs fixing the density of those layers"
    )
    dense_first: bool = _option(False, "keep the first sparsified layer dense")
    dense_last: bool = _option(False, "keep the last sparsified layer dense")
    seed: int | None = _option(
        None, "seed of the engine's generator (initial masks, random growth, tie-breaking)"
    )
    structure: str = _option(
        "unstructured",
        "mask structure: unstructured, fan_in (constant fan-in) or N:M such as 2:4",
    )
    neuron_ablation: float = _option(
        0.0,
        "with structure fan_in: remove a unit whose salient weights at an update are fewer "
        "than this share of its fan-in (SRigL's gamma_sal; 0: never)",
    )

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise through object.__setattr__
        set_(self, "density", _check_unit("density", self.density, low_open=True, high_open=False))
        if self.total_steps is not None and (
            isinstance(self.total_steps, bool)
            or not isinstance(self.total_steps, int)
            or self.total_steps < 1
        ):
            raise ValueError(f"total_steps must be a positive integer, got {self.total_steps!r}")
        MASK_SCHEDULE.get(self.schedule)  # an unknown name fails here, with the choices
        INIT.get(self.init)
        REDISTRIBUTION.get(self.redistribution)
        PRUNE_RATE_SCHEDULE.get(self.prune_rate_schedule)
        if self.prune is not None:
            PRUNE.get(self.prune)
        if self.growth is not None:
            GROWTH.get(self.growth)
        self._check_update_every()
        set_(
            self, "start_at", _check_unit("start_at", self.start_at, low_open=False, high_open=True)
        )
        set_(self, "stop_at", _check_unit("stop_at", self.stop_at, low_open=True, high_open=False))
        if self.start_at >= self.stop_at:
            raise ValueError(f"start_at ({self.start_at}) must be below stop_at ({self.stop_at})")
        set_(
            self,
            "prune_rate",
            _check_unit("prune_rate", self.prune_rate, low_open=False, high_open=True),
        )
        set_(
            self,
            "prune_rate_min",
            _check_unit("prune_rate_min", self.prune_rate_min, low_open=False, high_open=True),
        )
        if self.prune_rate_min > self.prune_rate and self.prune_rate_schedule != "constant":
            raise ValueError(
                f"prune_rate_min ({self.prune_rate_min}) must not exceed prune_rate "
                f"({self.prune_rate})"
            )
        if self.optimizer_state not in OPTIMIZER_STATE_POLICIES:
            raise ValueError(
                unknown_name_message(
                    "optimizer_state policy", self.optimizer_state, list(OPTIMIZER_STATE_POLICIES)
                )
            )
        set_(
            self,
            "ema_decay",
            _check_unit("ema_decay", self.ema_decay, low_open=False, high_open=True),
        )
        self._check_momentum_window()
        set_(self, "include", _check_selectors("include", self.include))
        set_(self, "exclude", _check_selectors("exclude", self.exclude))
        set_(self, "layer_density", self._check_layer_density(self.layer_density))
        for flag in ("dense_first", "dense_last"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise TypeError(f"seed must be an integer or None, got {self.seed!r}")
        set_(self, "structure", parse_structure(self.structure).name)
        self._check_schedule()
        self._check_structure()

    def _check_update_every(self) -> None:
        every = self.update_every
        if every == "epoch":
            if self.steps_per_epoch is None:
                raise ValueError(
                    "update_every='epoch' needs steps_per_epoch (optimizer steps per epoch, "
                    "e.g. len(train_loader) // accumulation_steps)"
                )
        elif isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(
                f"update_every must be an integer >= 0 (0: only when you call "
                f"engine.update_masks()) or 'epoch', got {every!r}"
            )
        spe = self.steps_per_epoch
        if spe is not None and (isinstance(spe, bool) or not isinstance(spe, int) or spe < 1):
            raise ValueError(f"steps_per_epoch must be a positive integer, got {spe!r}")

    def _check_momentum_window(self) -> None:
        w = self.momentum_window
        if w is None:
            return
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ValueError(f"momentum_window must be a positive integer or None, got {w!r}")
        if self.growth is None or "momentum" not in GROWTH.get(self.growth).needs:
            raise ValueError(
                f"momentum_window applies to growth by momentum; growth {self.growth!r} does "
                "not read momentum"
            )
        if self.interval == 0:
            raise ValueError("momentum_window needs scheduled updates (update_every > 0)")
        if w > self.interval:
            raise ValueError(
                f"momentum_window ({w}) must not exceed the update interval ({self.interval} steps)"
            )

    @staticmethod
    def _check_layer_density(value: object) -> tuple[tuple[str, float], ...]:
        items: list[tuple[object, object]]
        if isinstance(value, Mapping):
            items = list(value.items())
        elif isinstance(value, (list, tuple)):
            items = []
            for pair in value:
                if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                    raise TypeError(
                        f"layer_density entries must be (name, density) pairs, got {pair!r}"
                    )
                items.append((pair[0], pair[1]))
        else:
            raise TypeError(
                "layer_density must map parameter names or 're:' patterns to densities, "
                f"got {type(value).__name__}"
            )
        out = []
        for key, dens in items:
            if not isinstance(key, str) or not key or key == "re:":
                raise TypeError(
                    f"layer_density keys must be parameter names or 're:' patterns, got {key!r}"
                )
            out.append(
                (key, _check_unit(f"layer_density[{key!r}]", dens, low_open=True, high_open=False))
            )
        return tuple(out)

    def _check_schedule(self) -> None:
        schedule = MASK_SCHEDULE.get(self.schedule)
        s = self.schedule
        if schedule.prunes and self.prune is None:
            raise ValueError(f"schedule {s!r} needs a prune criterion (prune=...)")
        if not schedule.prunes and self.prune is not None:
            raise ValueError(f"schedule {s!r} never prunes; set prune=None")
        if schedule.grows and self.growth is None:
            raise ValueError(f"schedule {s!r} needs a growth criterion (growth=...)")
        if not schedule.grows and self.growth is not None:
            raise ValueError(f"schedule {s!r} never grows weights; set growth=None")
        schedule.check(self)
        growth_scope = GROWTH.get(self.growth).scope if self.growth is not None else None
        if growth_scope == "global" and self.redistribution != "none":
            raise ValueError(
                f"growth {self.growth!r} picks positions across all layers at once; "
                f"it needs redistribution='none', got {self.redistribution!r}"
            )
        if self.total_steps is None and self.needs_total_steps():
            raise ValueError(
                f"method {self.method!r} schedules its mask updates over training: pass "
                "total_steps (the number of optimizer steps, e.g. epochs * len(train_loader))"
            )

    def _check_structure(self) -> None:
        """N:M fixes every layer's density at N/M: the density, the initial distribution and
        the redistribution must agree with it. Neuron ablation is SRigL's, for constant fan-in."""
        structure = parse_structure(self.structure)
        set_ = object.__setattr__
        set_(
            self,
            "neuron_ablation",
            _check_unit("neuron_ablation", self.neuron_ablation, low_open=False, high_open=True),
        )
        if self.neuron_ablation > 0:
            if structure.kind != "fan_in":
                raise ValueError(
                    "neuron_ablation removes whole units of a constant fan-in layer: it needs "
                    f"structure='fan_in', got {structure.name!r}"
                )
            if self.redistribution != "none":
                raise ValueError(
                    "neuron_ablation keeps each layer's weights among its remaining units "
                    f"(SRigL): it needs redistribution='none', got {self.redistribution!r}"
                )
            if self.growth is None or not GROWTH.get(self.growth).elementwise:
                raise ValueError(
                    "neuron_ablation ranks the weights growth would choose before pruning: it "
                    f"needs an elementwise growth criterion, got {self.growth!r}"
                )
        if structure.density is None:
            return
        name, d = structure.name, structure.density
        if not math.isclose(self.density, d, rel_tol=0, abs_tol=1e-9):
            raise ValueError(
                f"structure {name!r} keeps {structure.n} of every {structure.m} weights: the "
                f"density must be {d:g}, got {self.density:g}"
            )
        if self.init != "uniform":
            raise ValueError(
                f"structure {name!r} gives every layer the density {d:g}: init must be "
                f"'uniform', got {self.init!r}"
            )
        if self.redistribution != "none":
            raise ValueError(
                f"structure {name!r} fixes every layer's count, so nothing can move between "
                f"layers: redistribution must be 'none', got {self.redistribution!r}"
            )
        for key, dens in self.layer_density:
            if not math.isclose(dens, d, rel_tol=0, abs_tol=1e-9):
                raise ValueError(
                    f"structure {name!r} gives every layer the density {d:g}: "
                    f"layer_density[{key!r}] = {dens:g} cannot hold; keep that layer dense "
                    "(exclude=) instead"
                )

    def needs_total_steps(self) -> bool:
        return MASK_SCHEDULE.get(self.schedule).needs_total_steps(self)

    # ------------------------------------------------------------------ calendar

    @property
    def interval(self) -> int:
        """Optimizer steps between scheduled mask updates (0: none scheduled)."""
        if self.update_every == "epoch":
            assert self.steps_per_epoch is not None
            return self.steps_per_epoch
        return int(self.update_every)

    def window(self) -> tuple[float, float]:
        """First and last optimizer step (as floats) of the period in which masks may change."""
        if self.total_steps is None:
            return 0.0, math.inf
        return self.start_at * self.total_steps, self.stop_at * self.total_steps

    def progress(self, step: int) -> float:
        """How far ``step`` is through the mask-changing period, clamped to [0, 1]."""
        start, stop = self.window()
        if math.isinf(stop):
            return 0.0
        return min(max((step - start) / (stop - start), 0.0), 1.0)

    def prune_rate_at(self, step: int) -> float:
        fn = PRUNE_RATE_SCHEDULE.get(self.prune_rate_schedule)
        return float(fn(self.prune_rate, self.prune_rate_min, self.progress(step)))

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values only (safe for ``torch.load(weights_only=True)`` and JSON)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("include", "exclude"):
                value = [
                    v if isinstance(v, str) else f"type:{v.__module__}.{v.__qualname__}"
                    for v in value
                ]
            elif f.name == "layer_density":
                value = [[k, d] for k, d in value]
            out[f.name] = value
        return out


CONFIG_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SparsityConfig))
OPTION_NAMES: tuple[str, ...] = tuple(
    n for n in CONFIG_FIELDS if n not in ("method", "density", "total_steps")
)


def unknown_option_message(name: str, valid: tuple[str, ...] = OPTION_NAMES) -> str:
    hint = did_you_mean(name, valid)
    return f"unknown option {name!r}{hint} (options: {', '.join(sorted(valid))})"
