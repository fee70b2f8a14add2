"""The 2019 library's ``sparselearning.core`` (its module name, so that
``sparselearning.core.add_sparse_args(parser)`` keeps working): ``Masking``, the prune-rate
decays and ``add_sparse_args``, on top of the sparselearn engine (see the package docstring)."""

from __future__ import annotations

import argparse
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .._registry import unknown_name_message
from ..config import SparsityConfig
from ..engine import SparseEngine, sparsify
from ..engine.engine import APEX_FP16_MESSAGE, is_apex_fp16
from ..targets import find_targets

logger = logging.getLogger("sparselearn")

PRUNE_MODES = {"magnitude": "magnitude", "SET": "set", "global_magnitude": "global_magnitude"}
GROWTH_MODES = {
    "momentum": "momentum",
    "random": "random",
    "momentum_neuron": "momentum_neuron",
    "global_momentum_growth": "global_momentum",
}
REDISTRIBUTION_MODES = {m: m for m in ("momentum", "magnitude", "nonzero", "none")}
SPARSE_INITS = {"constant": "uniform", "linear": "erk"}


def add_sparse_args(parser: argparse.ArgumentParser) -> None:
    """The 2019 library's command-line flags, with the same names, defaults and help."""
    parser.add_argument(
        "--growth",
        type=str,
        default="momentum",
        help="Growth mode. Choose from: momentum, random, and momentum_neuron.",
    )
    parser.add_argument(
        "--prune",
        type=str,
        default="magnitude",
        help="Prune mode / pruning mode. Choose from: magnitude, SET.",
    )
    parser.add_argument(
        "--redistribution",
        type=str,
        default="momentum",
        help="Redistribution mode. Choose from: momentum, magnitude, nonzeros, or none.",
    )
    parser.add_argument(
        "--prune-rate", type=float, default=0.50, help="The pruning rate / prune rate."
    )
    parser.add_argument(
        "--density", type=float, default=0.05, help="The density of the overall sparse network."
    )
    parser.add_argument("--dense", action="store_true", help="Enable dense mode. Default: False.")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="Prints verbose status of pruning/growth algorithms.",
    )


class PruneRateDecay(Protocol):
    def step(self) -> None: ...
    def get_dr(self, prune_rate: float) -> float: ...


def _check_rate(prune_rate: float, T_max: int) -> None:  # noqa: N803 - the 2019 name
    if not 0 <= prune_rate < 1:
        raise ValueError(f"prune_rate must be in [0, 1), got {prune_rate}")
    if isinstance(T_max, bool) or not isinstance(T_max, int) or T_max < 1:
        raise ValueError(f"T_max must be a positive integer (optimizer steps), got {T_max!r}")


class CosineDecay:
    """Cosine decay of the prune rate over ``T_max`` calls of :meth:`step` (one per optimizer
    step), to ``eta_min``; the same values as the 2019 class (``CosineAnnealingLR``)."""

    def __init__(
        self,
        prune_rate: float,
        T_max: int,  # noqa: N803 - the 2019 name
        eta_min: float = 0.005,
        last_epoch: int = -1,
    ) -> None:
        _check_rate(prune_rate, T_max)
        self.prune_rate, self.T_max, self.eta_min = prune_rate, T_max, eta_min
        self.steps = last_epoch + 1

    def step(self) -> None:
        self.steps += 1

    def get_dr(self, prune_rate: float | None = None) -> float:
        cos = math.cos(math.pi * self.steps / self.T_max)
        return self.eta_min + (self.prune_rate - self.eta_min) * 0.5 * (1.0 + cos)


class LinearDecay:
    """Linear decay of the prune rate to 0 over ``T_max`` calls of :meth:`step`."""

    def __init__(self, prune_rate: float, T_max: int) -> None:  # noqa: N803 - the 2019 name
        _check_rate(prune_rate, T_max)
        self.prune_rate, self.T_max = prune_rate, T_max
        self.steps = 0

    def step(self) -> None:
        self.steps += 1

    def get_dr(self, prune_rate: float | None = None) -> float:
        return max(self.prune_rate * (1.0 - self.steps / self.T_max), 0.0)


def _mode(kind: str, value: object, table: Mapping[str, str]) -> str:
    if callable(value):
        raise TypeError(
            f"custom {kind} functions in the 2019 style are not supported; register a criterion "
            "with sparselearn.register_prune / register_growth / register_redistribution and "
            "pass its name"
        )
    if value not in table:
        raise ValueError(unknown_name_message(kind, value, sorted(table)))
    return table[str(value)]


class Masking:
    """The 2019 ``Masking`` class: same arguments, same mode names, same meaning."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        prune_rate_decay: PruneRateDecay,
        prune_rate: float = 0.5,
        prune_mode: str = "magnitude",
        growth_mode: str = "momentum",
        redistribution_mode: str = "momentum",
        prune_every_k_steps: int | None = 0,
        verbose: bool = False,
        fp16: bool = False,
    ) -> None:
        if is_apex_fp16(optimizer):
            raise TypeError(APEX_FP16_MESSAGE)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {optimizer!r}")
        if not (hasattr(prune_rate_decay, "step") and hasattr(prune_rate_decay, "get_dr")):
            raise TypeError("prune_rate_decay must have step() and get_dr(rate), e.g. CosineDecay")
        if not 0 <= prune_rate < 1:
            raise ValueError(f"prune_rate must be in [0, 1), got {prune_rate}")
        k = prune_every_k_steps or 0
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"prune_every_k_steps must be an integer >= 0, got {k!r}")
        self.optimizer = optimizer
        self.prune_rate_decay = prune_rate_decay
        self.prune_rate = prune_rate
        self.prune_mode = _mode("prune mode", prune_mode, PRUNE_MODES)
        self.growth_mode = _mode("growth mode", growth_mode, GROWTH_MODES)
        self.redistribution_mode = _mode(
            "redistribution mode", redistribution_mode, REDISTRIBUTION_MODES
        )
        self.prune_every_k_steps = k
        self.verbose = verbose
        # fp16: nothing special is needed; masks follow each parameter's own dtype
        self.fp16 = fp16
        self.steps = 0
        self._sparse: SparseEngine | None = None
        self._module: nn.Module | None = None
        self._removals: list[tuple[str, Any]] = []  # asked for before add_module
        if verbose and not logger.handlers:
            logger.addHandler(logging.StreamHandler())
            logger.setLevel(logging.INFO)

    def add_module(
        self,
        module: nn.Module,
        density: float,
        sparse_init: str = "constant",
        remove_param_names: Sequence[str] = (),
    ) -> None:
        """Sparsify ``module`` at ``density``. ``remove_param_names``: parameters whose name
        contains one of these strings stay dense."""
        if self._sparse is not None:
            raise RuntimeError("add_module was already called; use one Masking per model")
        if sparse_init == "resume":
            raise ValueError(
                "sparse_init='resume' rebuilt masks from zero weights; save "
                "mask.state_dict() with your checkpoint and call mask.load_state_dict() instead"
            )
        init = _mode("sparse_init", sparse_init, SPARSE_INITS)
        redistribution = self.redistribution_mode
        if self.growth_mode == "global_momentum" and redistribution != "none":
            # the 2019 global growth ignored the redistribution mode
            redistribution = "none"
        exclude: list[Any] = [f"re:.*{re.escape(name)}.*" for name in remove_param_names]
        if self._removals:
            # removed before add_module: those weights are never masked (as in 2019, where
            # add_module removes, then draws the masks)
            every = SparsityConfig(schedule="fixed", prune=None, growth=None, include=("re:.*",))
            candidates = [t.name for t in find_targets(module, every)]
            exclude += self._names_removed(module, candidates, self._removals)
        self._sparse = sparsify(
            module,
            self.optimizer,
            method="sparse_momentum",
            density=density,
            init=init,
            prune=self.prune_mode,
            growth=self.growth_mode,
            redistribution=redistribution,
            update_every=0,  # updates come from at_end_of_epoch / prune_every_k_steps
            prune_rate=self.prune_rate,
            prune_rate_schedule="constant",
            include=["re:.*"],
            exclude=exclude,
        )
        self._module = module
        self.optimizer.register_step_post_hook(self._after_step)
        if self.verbose:
            logger.info("%s", self._sparse.summary())

    # ------------------------------------------------------------------ removing weights

    def remove_weight(self, name: str) -> None:
        """Leave parameter ``name`` (or ``name + '.weight'``) dense. Before ``add_module`` it is
        never masked; after, it keeps its current values and trains dense from then on."""
        self._remove(("name", name))

    def remove_weight_partial_name(self, partial_name: str, verbose: bool = False) -> None:
        """Leave every parameter whose name contains ``partial_name`` dense."""
        self._remove(("partial", partial_name))

    def remove_type(self, nn_type: type[nn.Module], verbose: bool = False) -> None:
        """Leave the weights of every module of type ``nn_type`` dense."""
        if not (isinstance(nn_type, type) and issubclass(nn_type, nn.Module)):
            raise TypeError(f"remove_type expects an nn.Module subclass, got {nn_type!r}")
        self._remove(("type", nn_type))

    def _remove(self, removal: tuple[str, Any]) -> None:
        if self._sparse is None:
            self._removals.append(removal)
            return
        assert self._module is not None
        names = self._names_removed(self._module, list(self._sparse.masks), [removal])
        for name in names:
            self._sparse.release(name)

    @staticmethod
    def _names_removed(
        module: nn.Module, candidates: list[str], removals: list[tuple[str, Any]]
    ) -> list[str]:
        """The names among ``candidates`` that ``removals`` take out, in their order. A removal
        that names a parameter which is dense anyway (a bias, a norm layer's weight) takes
        nothing out; one that names nothing in the model is an error."""
        params = [n for n, _ in module.named_parameters()]
        out: list[str] = []
        for kind, value in removals:
            if kind == "name":
                hit = [n for n in (value, f"{value}.weight") if n in candidates][:1]
                known = value in params or f"{value}.weight" in params
            elif kind == "partial":
                hit = [n for n in candidates if value in n]
                known = any(value in n for n in params)
            else:
                owners = [m for m, mod in module.named_modules() if isinstance(mod, value)]
                hit = [n for n in candidates if n.rpartition(".")[0] in owners]
                known = bool(owners)
            if not known:
                what = value.__name__ if kind == "type" else repr(value)
                raise ValueError(
                    f"remove: {what} names no {'module' if kind == 'type' else 'parameter'} of "
                    f"the model; the sparsified weights are {candidates}"
                )
            out += [n for n in hit if n not in out]
        return out

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        # runs after the engine's own hook, which already applied the masks
        self.prune_rate_decay.step()
        self.prune_rate = self.prune_rate_decay.get_dr(self.prune_rate)
        self.steps += 1
        if self.prune_every_k_steps and self.steps % self.prune_every_k_steps == 0:
            self.truncate_weights()

    @property
    def engine(self) -> SparseEngine:
        """The :class:`sparselearn.SparseEngine` doing the work (after ``add_module``)."""
        if self._sparse is None:
            raise RuntimeError("call add_module(model, density) first")
        return self._sparse

    def step(self) -> None:
        """``optimizer.step()``; masks are applied by the engine's hook."""
        self.optimizer.step()

    def truncate_weights(self) -> None:
        """One prune / redistribute / regrow cycle at the current prune rate."""
        self.engine.update_masks(prune_rate=self.prune_rate)
        if self.verbose:
            self.print_nonzero_counts()

    def at_end_of_epoch(self) -> None:
        self.truncate_weights()

    def apply_mask(self) -> None:
        self.engine.apply_masks()

    @property
    def masks(self) -> Mapping[str, Tensor]:
        """Name -> bool mask. Changing one in place makes the next step raise, naming it (the
        2019 code let such edits break its budget); masks change through the updates or
        :meth:`load_state_dict`."""
        return self.engine.masks

    # ------------------------------------------------------------------ 2019 statistics

    @property
    def modules(self) -> list[nn.Module]:
        return [] if self._module is None else [self._module]

    @property
    def names(self) -> list[str]:
        return list(self.engine.masks)

    @property
    def half(self) -> bool:
        return self.fp16

    @property
    def baseline_nonzero(self) -> int:
        """The budget: active weights kept at every update (exact here)."""
        return sum(int(m.count_nonzero()) for m in self.engine.masks.values())

    @property
    def global_prune(self) -> bool:
        return self.prune_mode == "global_magnitude"

    @property
    def global_growth(self) -> bool:
        return self.growth_mode == "global_momentum"

    @property
    def name2nonzeros(self) -> dict[str, int]:
        return {n: int(m.count_nonzero()) for n, m in self.engine.masks.items()}

    @property
    def name2zeros(self) -> dict[str, int]:
        return {n: m.numel() - int(m.count_nonzero()) for n, m in self.engine.masks.items()}

    @property
    def name2removed(self) -> dict[str, int]:
        """Weights pruned per layer at the last update."""
        last = self.engine.last_update
        return dict(last.pruned) if last is not None else {}

    @property
    def total_nonzero(self) -> int:
        return sum(self.name2nonzeros.values())

    @property
    def total_zero(self) -> int:
        return sum(self.name2zeros.values())

    @property
    def total_removed(self) -> int:
        return sum(self.name2removed.values())

    def gather_statistics(self) -> None:
        """Kept for 2019 code that calls it: the statistics above are computed when read."""

    def print_nonzero_counts(self) -> None:
        """Logs the per-layer table at INFO level (the library does not print)."""
        logger.info("%s\nPrune rate: %s", self.engine.summary(), self.prune_rate)

    def state_dict(self) -> dict[str, Any]:
        return {
            "engine": self.engine.state_dict(),
            "prune_rate": self.prune_rate,
            "steps": self.steps,
            "decay_steps": getattr(self.prune_rate_decay, "steps", None),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.engine.load_state_dict(state["engine"])
        self.prune_rate = float(state["prune_rate"])
        self.steps = int(state["steps"])
        if state.get("decay_steps") is not None and hasattr(self.prune_rate_decay, "steps"):
            setattr(self.prune_rate_decay, "steps", int(state["decay_steps"]))  # noqa: B010
