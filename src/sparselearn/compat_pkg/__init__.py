"""The 2019 sparse momentum library's API, on top of the sparselearn engine.

Code written for ``sparselearn`` (Dettmers & Zettlemoyer, 2019) runs with one import change::

    from sparselearn.compat import Masking, CosineDecay

    decay = CosineDecay(0.5, len(train_loader) * epochs)
    mask = Masking(optimizer, prune_rate_decay=decay)
    mask.add_module(model, density=0.05)
    for epoch in range(epochs):
        for x, y in train_loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            mask.step()                  # or optimizer.step(): both work here
        mask.at_end_of_epoch()

Same argument names, mode names and meaning, without the old defects: the budget is exact (the
old regrowth could pick active positions and drift below the target), ``SET`` prunes the weights
closest to zero on both sides (the old code removed the most negative ones), no hard-coded CUDA
device, the masks are part of ``state_dict()``, unknown mode names raise instead of printing,
and ``optimizer.step()`` keeps working (AMP grad scalers, clipping, closures).

Differences worth knowing: weights of every module except biases, 1-D tensors and normalisation
layers are sparsified (the old code also masked 1-D non-bias parameters such as PReLU weights);
``LinearDecay`` stops at 0 instead of going negative; ``sparse_init='resume'`` is replaced by
``state_dict()``/``load_state_dict()``; custom criteria are registered with
:func:`sparselearn.register_growth` and friends and selected by name, not passed as functions.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ._registry import unknown_name_message
from .engine import SparseEngine, sparsify

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
            exclude=[f"re:.*{re.escape(name)}.*" for name in remove_param_names],
        )
        self.optimizer.register_step_post_hook(self._after_step)
        if self.verbose:
            logger.info("%s", self._sparse.summary())

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
        return self.engine.masks

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
