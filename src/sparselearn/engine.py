"""The sparse training engine: masks, optimizer step hooks, and exact-budget mask updates."""

from __future__ import annotations

import functools
import logging
import math
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from . import _distributed
from .budget import allocate, layer_counts
from .config import OPTION_NAMES, SparsityConfig, unknown_option_message, unused_options
from .criteria import GROWTH, PRUNE, REDISTRIBUTION, Criterion, LayerView
from .methods import METHODS
from .schedules import gradual_fraction
from .selection import bottom_k, top_k
from .signals import _group_of, keeps_momentum, optimizer_momentum, reset_state
from .targets import Target, find_targets

logger = logging.getLogger("sparselearn")

STATE_FORMAT = 1

# id(model) and id(param) -> the engine managing it (verified by identity on lookup)
_ACTIVE: dict[int, weakref.ref[SparseEngine]] = {}


@dataclass
class MaskUpdate:
    """What one mask update did (``engine.history`` holds them all, ``engine.last_update`` the
    latest)."""

    step: int
    kind: str  # "regrow", "prune" or "skipped"
    prune_rate: float | None
    pruned: dict[str, int] = field(default_factory=dict)
    grown: dict[str, int] = field(default_factory=dict)
    density: float = 0.0
    seconds: float = 0.0
    reason: str = ""

    @property
    def total_pruned(self) -> int:
        return sum(self.pruned.values())

    @property
    def total_grown(self) -> int:
        return sum(self.grown.values())


class _Layer:
    """Engine-side record of one sparsified weight tensor kept dense, with its mask."""

    compact = False

    __slots__ = ("_zero", "active", "final_count", "fixed", "mask", "name", "param")

    def __init__(self, target: Target, mask: Tensor, final_count: int) -> None:
        self.name = target.name
        self.param = target.param
        self.fixed = target.density is not None  # layer_density override: own count, no sharing
        self.final_count = final_count  # the layer's budget at the target density
        self.mask = mask  # bool, the truth
        self._zero = _zeroing_mask(mask, self.param.dtype)
        self.active = _count(mask)  # kept in step with the mask

    @property
    def inactive(self) -> Tensor:
        return ~self.mask

    def set_mask(self, new: Tensor, active: int | None = None) -> None:
        """``active``: the number of True entries of ``new``, where the caller knows it."""
        self.mask.copy_(new)
        if self._zero.dtype == torch.bool:
            torch.logical_not(new, out=self._zero)
        else:
            self._zero.copy_(new).neg_()
        self.active = _count(new) if active is None else active

    def zero_inactive_(self, tensor: Tensor) -> None:
        """Exact zeros at the inactive positions of ``tensor`` (the weight or its gradient), even
        over inf and NaN (a product with a 0/1 mask would keep NaN)."""
        z = self._zero
        if z.dtype == torch.bool:
            tensor.masked_fill_(z, 0)
        elif (
            tensor.dtype.itemsize == z.dtype.itemsize
            and tensor.shape == z.shape
            and tensor.device == z.device
        ):
            # elementwise by index: any memory format (e.g. channels_last) gives the same result
            tensor.view(z.dtype).bitwise_and_(z)
        else:  # e.g. a gradient in another dtype than the weight
            tensor.masked_fill_(~self.mask, 0)

    def sync_device(self) -> None:
        """Follow the parameter if the model was moved or cast after ``sparsify``."""
        if self.mask.device != self.param.device:
            self.mask = self.mask.to(self.param.device)
        if self._zero.device != self.param.device or (
            self._zero.dtype != torch.bool
            and self._zero.dtype.itemsize != self.param.dtype.itemsize
        ):
            self._zero = _zeroing_mask(self.mask, self.param.dtype)

    @property
    def numel(self) -> int:
        return self.mask.numel()

    @property
    def shape(self) -> torch.Size:
        return self.mask.shape

    @property
    def device(self) -> torch.device:
        return self.param.device

    def weight(self) -> Tensor:
        return self.param.detach()

    def release(self) -> None:
        """Drop what was materialised for a mask update (nothing for dense storage)."""


class _CompactLayer:
    """A sparsified weight stored as CSR in an accelerated module: the optimizer holds only the
    active values. Masks, dense weights and gradients are materialised for mask updates only."""

    compact = True

    def __init__(self, old: _Layer, storage: Any) -> None:
        self.name = old.name
        self.fixed = old.fixed
        self.final_count = old.final_count
        self.storage = storage  # a sparselearn.accel.layers.SparseWeight
        self._mask: Tensor | None = None
        self._mask_version = -1

    @property
    def param(self) -> nn.Parameter:
        return self.storage.values  # type: ignore[no-any-return]

    @property
    def mask(self) -> Tensor:
        if self._mask is None or self._mask_version != self.storage.version:
            self._mask = self.storage.mask()
            self._mask_version = self.storage.version
        return self._mask

    @property
    def inactive(self) -> Tensor:
        return ~self.mask

    @property
    def active(self) -> int:
        return int(self.storage.nnz)

    @property
    def numel(self) -> int:
        return math.prod(self.storage.shape)

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.storage.shape)

    @property
    def device(self) -> torch.device:
        return self.param.device

    def weight(self) -> Tensor:
        return self.storage.dense()  # type: ignore[no-any-return]

    def set_mask(self, new: Tensor) -> Tensor:
        """Restructure; returns, per new position, the index of its old value (-1: new)."""
        source: Tensor = self.storage.restructure(new)
        self._mask, self._mask_version = new.clone(), self.storage.version
        return source

    def zero_inactive_(self, tensor: Tensor) -> None:  # structurally sparse: nothing to zero
        pass

    def sync_device(self) -> None:
        pass

    def release(self) -> None:
        self._mask = None


class SparseEngine:
    """Keeps a model's weights sparse while the user's own loop calls ``optimizer.step()``.

    Create it with :func:`sparselearn.sparsify`. It hooks into the optimizer: after every step
    the inactive weights are set to exactly zero and, when the schedule says so, the masks are
    updated (prune, redistribute, regrow) with the number of active weights kept exact.
    """

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, config: SparsityConfig
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        self.config = config
        self.model = model
        self.optimizer = optimizer
        targets = find_targets(model, config)
        _check_optimizer_holds(optimizer, targets)
        _check_not_sparsified(model, targets)

        self._seed = _distributed.same_on_all_ranks(
            config.seed if config.seed is not None else torch.initial_seed() % 2**63
        )
        self._generators: dict[str, torch.Generator] = {}
        self._step = 0
        self._prune = PRUNE.get(config.prune) if config.prune else None
        self._growth = GROWTH.get(config.growth) if config.growth else None
        self._redistribution = REDISTRIBUTION.get(config.redistribution)
        needs: set[str] = set()
        for part in (self._prune, self._growth):
            if part is not None:
                needs |= part.needs
        if config.schedule == "periodic":
            needs |= self._redistribution.needs
        self._needs = frozenset(needs)
        # growth by momentum needs the momentum of missing weights: leave gradients dense, unless
        # that momentum is gathered from dense gradients in a window before each update
        self._mask_grads = config.schedule != "dense" and not (
            self._growth is not None
            and "momentum" in self._growth.needs
            and config.momentum_window is None
        )
        self._pending_one_shot = config.schedule == "one_shot"
        self._finished = config.schedule != "periodic" and config.schedule != "gradual"
        self._dense_grads: dict[str, Tensor] = {}
        self._window: dict[str, Tensor] = {}  # momentum of the dense gradient within the window
        self._closure_step = False
        self.history: list[MaskUpdate] = []

        self._layers: list[_Layer | _CompactLayer] = list(self._build_layers(targets))
        self._ema: dict[str, Tensor] = {}
        if "momentum" in self._needs:
            for layer in self._layers:
                if not keeps_momentum(optimizer, layer.param):
                    self._ema[layer.name] = torch.zeros_like(layer.param, dtype=torch.float32)
        self._apply_masks()

        self._handles: list[RemovableHandle] = []
        self._handles.append(optimizer.register_step_post_hook(self._post_step))
        if config.schedule != "dense":
            self._handles.append(optimizer.register_step_pre_hook(self._pre_step))
            if self._mask_grads:
                for layer in self._layers:
                    self._handles.append(
                        layer.param.register_post_accumulate_grad_hook(  # type: ignore[no-untyped-call]
                            self._grad_hook(layer)
                        )
                    )
        ref = weakref.ref(self)
        _ACTIVE[id(model)] = ref
        for layer in self._layers:
            _ACTIVE[id(layer.param)] = ref
        self._attached = True
        logger.info("sparsify: %s", self._headline())

    # ------------------------------------------------------------------ construction

    def _build_layers(self, targets: list[Target]) -> list[_Layer]:
        cfg = self.config
        final = [0] * len(targets)
        if cfg.schedule != "dense":
            free = [i for i, t in enumerate(targets) if t.density is None]
            if free:
                counts = layer_counts(
                    cfg.init,
                    [targets[i].param.shape for i in free],
                    cfg.density,
                    [targets[i].name for i in free],
                )
                for i, c in zip(free, counts, strict=True):
                    final[i] = c
            for i, t in enumerate(targets):
                if t.density is not None:
                    final[i] = round(t.density * t.param.numel())
                    if final[i] == 0:
                        raise ValueError(
                            f"layer_density {t.density} leaves no active weight in {t.name} "
                            f"({t.param.numel()} weights); raise it"
                        )
        starts_dense = cfg.schedule in ("dense", "one_shot", "gradual")
        layers = []
        for t, count in zip(targets, final, strict=True):
            p = t.param
            if starts_dense:
                mask = torch.ones_like(p, dtype=torch.bool)
            else:
                gen = self._generator(p.device)
                noise = torch.rand(p.shape, generator=gen, device=p.device)
                everywhere = torch.ones_like(p, dtype=torch.bool)
                mask = top_k(noise, everywhere, count, gen, count=p.numel())
            layers.append(_Layer(t, mask, p.numel() if cfg.schedule == "dense" else count))
        return layers

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self._seed)
            self._generators[key] = gen
        return gen

    # ------------------------------------------------------------------ public surface

    @property
    def masks(self) -> Mapping[str, Tensor]:
        """Parameter name -> bool mask (the weight's shape and device). Read-only: change masks
        through :meth:`update_masks` or :meth:`load_state_dict`."""
        return MappingProxyType({layer.name: layer.mask for layer in self._layers})

    @property
    def step(self) -> int:
        """Optimizer steps taken since ``sparsify`` (skipped AMP steps do not count)."""
        return self._step

    @property
    def last_update(self) -> MaskUpdate | None:
        return self.history[-1] if self.history else None

    def density(self) -> float:
        """Global fraction of active weights over the sparsified parameters."""
        active = sum(layer.active for layer in self._layers)
        total = sum(layer.numel for layer in self._layers)
        return active / total

    def layer_densities(self) -> dict[str, float]:
        return {layer.name: layer.active / layer.numel for layer in self._layers}

    def summary(self) -> str:
        """A per-layer table: name, shape, density, active count."""
        rows = [("layer", "shape", "density", "active", "total")]
        for layer in self._layers:
            active, total = layer.active, layer.numel
            rows.append(
                (
                    layer.name,
                    "x".join(map(str, layer.shape)),
                    f"{100 * active / total:.2f}%",
                    f"{active:,}",
                    f"{total:,}",
                )
            )
        active = sum(layer.active for layer in self._layers)
        total = sum(layer.numel for layer in self._layers)
        rows.append(("total", "", f"{100 * active / total:.2f}%", f"{active:,}", f"{total:,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [self._headline()]
        for j, r in enumerate(rows):
            cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
            cells += [r[i].rjust(widths[i]) for i in (2, 3, 4)]
            lines.append("  ".join(cells).rstrip())
            if j == 0 or j == len(rows) - 2:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def _headline(self) -> str:
        cfg = self.config
        return (
            f"{cfg.method}: {len(self._layers)} sparsified tensors, target density "
            f"{cfg.density:.4g}, step {self._step}"
        )

    def __repr__(self) -> str:
        return f"SparseEngine({self._headline()})"

    def update_masks(self, prune_rate: float | None = None) -> MaskUpdate:
        """Update the masks now, outside the schedule (e.g. at the end of an epoch).

        ``prune_rate`` overrides the scheduled rate for this update (periodic methods only).
        """
        self._check_attached()
        cfg = self.config
        if cfg.schedule == "periodic":
            rate = cfg.prune_rate_at(self._step) if prune_rate is None else prune_rate
            if not 0 <= rate < 1:
                raise ValueError(f"prune_rate must be in [0, 1), got {rate}")
            self._capture_grads_for_manual_update()
            try:
                return self._regrow(rate)
            finally:
                self._dense_grads.clear()
        if cfg.schedule == "gradual":
            if prune_rate is not None:
                raise ValueError("gradual pruning follows its cubic schedule; prune_rate is unused")
            self._capture_grads_for_manual_update()
            try:
                return self._prune_to(gradual_fraction(cfg.progress(self._step)))
            finally:
                self._dense_grads.clear()
        raise RuntimeError(f"method {cfg.method!r} (schedule {cfg.schedule!r}) never updates masks")

    def remove(self) -> None:
        """Detach from the optimizer and the model. The weights stay sparse; the masks are kept
        in ``engine.masks`` for inspection; ``sparsify`` may be called on the model again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for key in [id(self.model), *(id(layer.param) for layer in self._layers)]:
            ref = _ACTIVE.get(key)
            if ref is not None and ref() is self:
                del _ACTIVE[key]
        self._attached = False
        self._arm_sinks()  # accelerated layers stop producing dense gradients

    def _check_attached(self) -> None:
        if not self._attached:
            raise RuntimeError("this engine was removed; call sparselearn.sparsify again")

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: masks, step, RNG states, engine buffers.

        Plain tensors and Python values only: loads with ``torch.load(..., weights_only=True)``.
        """
        return {
            "format": STATE_FORMAT,
            "config": self.config.to_dict(),
            "step": self._step,
            "pending_one_shot": self._pending_one_shot,
            "finished": self._finished,
            "masks": {layer.name: layer.mask.clone() for layer in self._layers},
            "generators": {k: g.get_state() for k, g in self._generators.items()},
            "ema": {k: v.clone() for k, v in self._ema.items()},
            "window": {k: v.clone() for k, v in self._window.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved. The engine must have been created with the same
        configuration on the same model; differences are reported, nothing is half-applied."""
        self._check_attached()
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"not a sparselearn engine state (format {STATE_FORMAT} expected, got "
                f"{state.get('format') if isinstance(state, Mapping) else type(state).__name__})"
            )
        saved_cfg, ours = dict(state["config"]), self.config.to_dict()
        diff = [k for k in sorted(set(saved_cfg) | set(ours)) if saved_cfg.get(k) != ours.get(k)]
        if diff:
            detail = ", ".join(
                f"{k}: saved {saved_cfg.get(k)!r}, here {ours.get(k)!r}" for k in diff
            )
            raise ValueError(f"engine state was saved with a different configuration ({detail})")
        masks = state["masks"]
        names = [layer.name for layer in self._layers]
        if sorted(masks) != sorted(names):
            raise ValueError(
                f"engine state masks {sorted(masks)} do not match this engine's {sorted(names)}"
            )
        for layer in self._layers:
            m = masks[layer.name]
            if not isinstance(m, Tensor) or m.dtype != torch.bool or m.shape != layer.mask.shape:
                raise ValueError(
                    f"saved mask for {layer.name} is not a bool tensor of shape "
                    f"{tuple(layer.mask.shape)}"
                )
        ema = state.get("ema", {})
        if sorted(ema) != sorted(self._ema) or any(
            v.shape != self._ema[k].shape for k, v in ema.items()
        ):
            raise ValueError("engine state EMA buffers do not match this engine")
        for layer in self._layers:
            if layer.compact and not torch.equal(masks[layer.name].to(layer.device), layer.mask):
                raise ValueError(
                    f"{layer.name} is accelerated and its structure differs from the saved mask: "
                    "load the model's state_dict (which holds the sparse weights) first"
                )
        # validated: now apply
        for layer in self._layers:
            if not layer.compact:
                layer.sync_device()
                layer.set_mask(masks[layer.name].to(layer.mask.device))
            layer.release()
        for k, v in ema.items():
            self._ema[k].copy_(v)
        self._window = {k: v.clone() for k, v in state.get("window", {}).items()}
        self._generators.clear()
        for key, gen_state in state["generators"].items():
            gen = torch.Generator(device=key)
            gen.set_state(gen_state)
            self._generators[key] = gen
        self._step = int(state["step"])
        self._pending_one_shot = bool(state["pending_one_shot"])
        self._finished = bool(state["finished"])
        self._apply_masks()
        self._arm_sinks()

    # ------------------------------------------------------------------ hooks

    def _grad_hook(self, layer: _Layer | _CompactLayer) -> Callable[[Tensor], None]:
        def hook(param: Tensor) -> None:
            # mask as gradients accumulate, so that clipping sees the sparse gradient; on steps
            # that need the dense gradient, masking waits for the optimizer pre-step hook
            if param.grad is not None and not self._wants_dense_grad(self._step + 1):
                layer.sync_device()
                layer.zero_inactive_(param.grad)

        return hook

    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        # hooks receive the step call's own arguments: (optimizer, closure?) and kwargs
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        self._closure_step = closure is not None
        if self._closure_step:
            return  # the gradient is computed inside step(): handled in the post-step hook
        if self._wants_dense_grad(self._step + 1):
            self._snapshot_grads()
        if self._pending_one_shot:
            self._one_shot()
        if self._mask_grads:
            with torch.no_grad():
                for layer in self._layers:
                    if not layer.compact and layer.param.grad is not None:
                        layer.sync_device()
                        layer.zero_inactive_(layer.param.grad)

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.config.schedule == "dense":
            self._step += 1  # nothing to mask: only count
            return
        if self._closure_step:
            if self._wants_dense_grad(self._step + 1):
                self._snapshot_grads()
            if self._pending_one_shot:
                self._one_shot()
        self._apply_masks()
        self._update_ema()
        self._step += 1
        self._update_window()
        try:
            if self._update_due(self._step):
                if self.config.schedule == "periodic":
                    self._regrow(self.config.prune_rate_at(self._step))
                else:
                    self._prune_to(gradual_fraction(self.config.progress(self._step)))
        finally:
            self._dense_grads.clear()
            self._arm_sinks()

    def _one_shot(self) -> None:
        self._pending_one_shot = False
        try:
            self._prune_to(1.0)
        finally:
            self._dense_grads.clear()

    @torch.no_grad()
    def _apply_masks(self) -> None:
        for layer in self._layers:
            layer.sync_device()
            layer.zero_inactive_(layer.param)

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.config.ema_decay
        for layer in self._layers:
            ema = self._ema.get(layer.name)
            if ema is None:
                continue
            if ema.device != layer.param.device:
                ema = self._ema[layer.name] = ema.to(layer.param.device)
            ema.mul_(decay)
            if layer.param.grad is not None:
                ema.add_(layer.param.grad, alpha=1.0 - decay)

    # ------------------------------------------------------------------ calendar

    def _update_due(self, step: int) -> bool:
        cfg = self.config
        every = cfg.interval
        if self._finished or every == 0:
            return False
        start, stop = cfg.window()
        if cfg.schedule == "periodic":
            return step % every == 0 and start <= step < stop
        # gradual: every interval inside the window, and once more at its end to land exactly
        return step >= start and (step % every == 0 or step >= stop)

    def _wants_dense_grad(self, upcoming: int) -> bool:
        if self._in_window(upcoming):
            return True
        if "grad" not in self._needs:
            return False
        return self._pending_one_shot or self._update_due(upcoming)

    def _in_window(self, step: int) -> bool:
        """Whether optimizer step ``step`` is one of the last ``momentum_window`` before an
        update (whose dense gradients feed the momentum of the missing weights)."""
        w = self.config.momentum_window
        if w is None:
            return False
        every = self.config.interval
        nxt = -(-step // every) * every  # the next scheduled update at or after `step`
        return nxt - step < w and self._update_due(nxt)

    def _snapshot_grads(self) -> None:
        for layer in self._layers:
            if layer.compact:  # their dense gradient arrives through the module's sink
                if layer.name not in self._dense_grads:
                    self._dense_grads[layer.name] = torch.zeros(layer.shape, device=layer.device)
                continue
            g = layer.param.grad
            self._dense_grads[layer.name] = (
                torch.zeros_like(layer.param) if g is None else g.detach().clone()
            )

    def _arm_sinks(self) -> None:
        """Tell accelerated layers whether the coming step must produce the dense gradient."""
        wanted = self._attached and self._wants_dense_grad(self._step + 1)
        for layer in self._layers:
            if isinstance(layer, _CompactLayer):
                layer.storage.dense_grad_sink = (
                    functools.partial(self._receive_dense_grad, layer.name) if wanted else None
                )

    def _receive_dense_grad(self, name: str, grad: Tensor) -> None:
        g = grad.detach()
        prior = self._dense_grads.get(name)
        self._dense_grads[name] = g.clone() if prior is None else prior + g  # accumulation

    def _momentum_coefficient(self, layer: _Layer | _CompactLayer) -> float:
        group = _group_of(self.optimizer, layer.param)
        if "betas" in group:
            return float(group["betas"][0])
        momentum = group.get("momentum", 0)
        return float(momentum) if momentum else self.config.ema_decay

    @torch.no_grad()
    def _update_window(self) -> None:
        """Fold this step's dense gradient into the window momentum (window steps only)."""
        if self.config.momentum_window is None or not self._in_window(self._step):
            return
        for layer in self._layers:
            # the dense gradient captured before masking (pre-step hook, or the layer's sink)
            g = self._dense_grads.get(layer.name)
            if g is None:
                continue
            beta = self._momentum_coefficient(layer)
            buf = self._window.get(layer.name)
            if buf is None:
                self._window[layer.name] = g.float() * (1.0 - beta)
            else:
                buf.mul_(beta).add_(g, alpha=1.0 - beta)

    def _capture_grads_for_manual_update(self) -> None:
        if "grad" not in self._needs or self._dense_grads:
            return
        if self._mask_grads:
            raise RuntimeError(
                f"{self.config.prune}/{self.config.growth} need the dense gradient, which the "
                "engine captures only at scheduled update steps (gradients are masked "
                "otherwise); set update_every instead of calling update_masks() yourself"
            )
        self._snapshot_grads()

    # ------------------------------------------------------------------ signals and views

    def _momentum(self, layer: _Layer | _CompactLayer) -> Tensor:
        m = optimizer_momentum(self.optimizer, layer.param)
        if m is None:
            m = self._ema.get(layer.name)
        if m is None:
            m = torch.zeros_like(layer.param)
        m = m.detach()
        if layer.compact:  # values order -> the weight's shape
            dense = torch.zeros(layer.shape, dtype=m.dtype, device=m.device)
            dense[layer.mask] = m
            m = dense
        window = self._window.get(layer.name)
        if window is not None:  # missing weights: the momentum gathered in the window
            m = torch.where(layer.mask, m, window.to(m.dtype))
        return m

    def _grad(self, layer: _Layer | _CompactLayer) -> Tensor:
        g = self._dense_grads.get(layer.name)
        if g is None:
            raise RuntimeError(f"no dense gradient captured for {layer.name} at this update")
        return g

    def _views(self) -> list[LayerView]:
        views = []
        for layer in self._layers:
            layer.sync_device()
            signals: dict[str, Callable[[], Tensor]] = {}
            if "momentum" in self._needs:
                signals["momentum"] = functools.partial(self._momentum, layer)
            if "grad" in self._needs:
                signals["grad"] = functools.partial(self._grad, layer)
            views.append(
                LayerView(
                    layer.name,
                    layer.weight(),
                    layer.mask,
                    signals=signals,
                    generator=self._generator(layer.device),
                )
            )
        return views

    def _non_finite_inputs(self, views: list[LayerView]) -> str | None:
        """Name the first non-finite weight, gradient or momentum, or None if all are finite."""
        for view in views:
            for key in ("weight", *sorted(self._needs)):
                value = view.weight if key == "weight" else getattr(view, key)
                if not _finite(value):
                    return f"{key} of {view.name}"
        return None

    def _skip(self, reason: str, rate: float | None) -> MaskUpdate:
        logger.warning("step %d: mask update skipped: %s; masks unchanged", self._step, reason)
        for name, ema in self._ema.items():
            if not _finite(ema):
                ema.zero_()  # restart the gradient average so that later updates can run
                logger.warning("reset the gradient moving average of %s (non-finite)", name)
        self._window.clear()  # the next window starts afresh
        update = MaskUpdate(self._step, "skipped", rate, density=self.density(), reason=reason)
        self.history.append(update)
        return update

    # ------------------------------------------------------------------ mask updates

    def _scores(self, criterion: Criterion, views: list[LayerView]) -> list[Tensor] | str:
        out = []
        for view in views:
            s = criterion.fn(view)
            if not isinstance(s, Tensor) or s.shape != view.weight.shape:
                raise TypeError(
                    f"criterion {criterion.name!r} must return a tensor of shape "
                    f"{tuple(view.weight.shape)} for {view.name}, got "
                    f"{tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__}"
                )
            if not _finite(s):
                return f"criterion {criterion.name!r} gave non-finite scores for {view.name}"
            out.append(s)
        return out

    def _prune_scores(self, views: list[LayerView]) -> list[Tensor | _ActiveScores] | str:
        """Prune scores per layer. An elementwise layer-scope criterion (magnitude) is evaluated
        on the active weights only where they are fewer than half: the scores of those
        positions, with the positions, instead of a pass over the whole layer."""
        crit = self._prune
        assert crit is not None
        if not (crit.elementwise and crit.scope == "layer"):
            whole = self._scores(crit, views)
            return whole if isinstance(whole, str) else list[Tensor | _ActiveScores](whole)
        out: list[Tensor | _ActiveScores] = []
        for view, layer in zip(views, self._layers, strict=True):
            if 2 * layer.active >= layer.numel:
                full = self._scores(crit, [view])
                if isinstance(full, str):
                    return full
                out.append(full[0])
                continue
            idx = view.mask.reshape(-1).nonzero().squeeze(1)
            s = crit.fn(view.at(idx))
            if not isinstance(s, Tensor) or s.shape != idx.shape:
                raise TypeError(
                    f"elementwise criterion {crit.name!r} must return scores of the shape of "
                    f"its (1-D) inputs, {tuple(idx.shape)} for {view.name}, got "
                    f"{tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__}"
                )
            if not _finite(s):
                return f"criterion {crit.name!r} gave non-finite scores for {view.name}"
            out.append(_ActiveScores(idx, s))
        return out

    def _select_across(
        self, scores: list[Tensor], candidates: list[Tensor], k: int, *, largest: bool = True
    ) -> list[Tensor]:
        """Exact top-k (or bottom-k) over several layers at once; one bool tensor per layer."""
        device = scores[0].device
        flat = torch.cat([s.float().reshape(-1).to(device) for s in scores])
        cand = torch.cat([c.reshape(-1).to(device) for c in candidates])
        chosen = top_k(flat, cand, k, self._generator(device), largest=largest)
        out, offset = [], 0
        for c in candidates:
            out.append(chosen[offset : offset + c.numel()].view_as(c).to(c.device))
            offset += c.numel()
        return out

    def _prune_sets(
        self,
        views: list[LayerView],
        scores: list[Tensor | _ActiveScores],
        remove: list[int],
        total_free: int,
    ) -> list[Tensor]:
        """Bool tensors of the positions to prune. Fixed layers and layer-scope criteria remove
        ``remove[i]`` per layer; a global criterion removes ``total_free`` across the free layers,
        never the best active weight of a layer (no layer is emptied)."""
        assert self._prune is not None
        out: list[Tensor | None] = [None] * len(views)
        free = [i for i, layer in enumerate(self._layers) if not layer.fixed]
        glob = self._prune.scope == "global" and len(free) > 0
        for i, (view, s) in enumerate(zip(views, scores, strict=True)):
            if glob and i in free:
                continue
            if isinstance(s, _ActiveScores):  # scores of the active positions only
                m = s.idx.numel()
                every = torch.ones(m, dtype=torch.bool, device=s.idx.device)
                chosen = bottom_k(
                    s.scores, every, remove[i], self._generator(s.idx.device), count=m
                )
                pruned = torch.zeros(view.mask.numel(), dtype=torch.bool, device=s.idx.device)
                pruned[s.idx[chosen]] = True
                out[i] = pruned.view_as(view.mask)
                continue
            out[i] = bottom_k(
                s, view.mask, remove[i], self._generator(s.device), count=self._layers[i].active
            )
        if glob:
            full = [s for s in scores if isinstance(s, Tensor)]
            assert len(full) == len(scores)  # global criteria are scored over whole layers
            cands = []
            for i in free:
                mask = views[i].mask
                best = torch.where(mask, full[i].float(), -math.inf).argmax()
                cand = mask.clone()
                cand.view(-1)[best] = False  # protected: every layer keeps at least one weight
                cands.append(cand)
            across = self._select_across([full[i] for i in free], cands, total_free, largest=False)
            for i, c in zip(free, across, strict=True):
                out[i] = c
        return [o for o in out if o is not None]

    @torch.no_grad()
    def _regrow(self, rate: float) -> MaskUpdate:
        """Prune ``rate`` of the active weights, share the regrowth, regrow: budget unchanged."""
        t0 = time.perf_counter()
        assert self._prune is not None
        assert self._growth is not None
        views = self._views()
        bad = self._non_finite_inputs(views)
        if bad:
            return self._skip(f"non-finite {bad}", rate)
        layers = self._layers
        active = [layer.active for layer in layers]
        numel = [layer.numel for layer in layers]
        room = [n - a for n, a in zip(numel, active, strict=True)]  # inactive before the update
        free = [i for i, layer in enumerate(layers) if not layer.fixed]

        prune_scores = self._prune_scores(views)
        if isinstance(prune_scores, str):
            return self._skip(prune_scores, rate)
        # never empty a layer, and never remove more than can be regrown: a layer that regrows
        # its own loss (fixed layers, redistribution "none") is bounded by its own free room,
        # layers that share their regrowth only by the free room of all of them together
        shares_regrowth = self._redistribution.fn is not None or self._growth.scope == "global"
        remove = [
            min(round(rate * a), a - 1, r if layer.fixed or not shares_regrowth else a)
            for a, r, layer in zip(active, room, layers, strict=True)
        ]
        room_free = sum(room[i] for i in free)
        if shares_regrowth and sum(remove[i] for i in free) > room_free:
            for i, k in zip(
                free,
                allocate(room_free, [float(remove[i]) for i in free], [remove[i] for i in free]),
                strict=True,
            ):
                remove[i] = k
        total_free = 0
        if self._prune.scope == "global" and free:
            a_free = sum(active[i] for i in free)
            total_free = min(round(rate * a_free), a_free - len(free), room_free)
        pruned = self._prune_sets(views, prune_scores, remove, total_free)
        kept = [v.mask & p.logical_not() for v, p in zip(views, pruned, strict=True)]
        # exact counts: top_k selects exactly what it is asked for; only a global criterion
        # leaves the per-layer split to be counted
        global_prune = self._prune.scope == "global"
        lost = [
            _count(p) if global_prune and i in free else remove[i] for i, p in enumerate(pruned)
        ]

        # how many each layer regrows: fixed layers their own loss, free layers share theirs
        grow = list(lost)
        r_free = sum(lost[i] for i in free)
        growth_views = [v.with_growth(k, None) for v, k in zip(views, kept, strict=True)]
        global_growth = self._growth.scope == "global"
        if free and not global_growth:
            if self._redistribution.fn is None:
                weights = [float(lost[i]) for i in free]
            else:
                weights = [self._redistribution.fn(growth_views[i]) for i in free]
                if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
                    logger.warning(
                        "step %d: redistribution %r gave %s; each layer regrows what it lost",
                        self._step,
                        self._redistribution.name,
                        weights,
                    )
                    weights = [float(lost[i]) for i in free]
            shares = allocate(r_free, weights, [room[i] for i in free])
            for i, g in zip(free, shares, strict=True):
                grow[i] = g

        # growth: the highest scores among positions that were inactive before this update
        grown: list[Tensor | None] = [None] * len(layers)
        per_layer = [i for i in range(len(layers)) if not (global_growth and i in free)]
        for i in per_layer:
            growth_views[i] = growth_views[i].with_growth(kept[i], grow[i])
        growth_scores = self._scores(self._growth, growth_views)
        if isinstance(growth_scores, str):
            return self._skip(growth_scores, rate)
        for i in per_layer:
            grown[i] = top_k(
                growth_scores[i],
                layers[i].inactive,
                grow[i],
                self._generator(layers[i].mask.device),
                count=room[i],
            )
        if global_growth and free:
            chosen = self._select_across(
                [growth_scores[i] for i in free], [layers[i].inactive for i in free], r_free
            )
            for i, c in zip(free, chosen, strict=True):
                grown[i] = c

        update = MaskUpdate(self._step, "regrow", rate)
        for i, layer in enumerate(layers):
            new_positions = grown[i]
            assert new_positions is not None
            n_grown = _count(new_positions) if global_growth and i in free else grow[i]
            self._commit(
                layer,
                kept[i] | new_positions,
                pruned[i],
                new_positions,
                active=active[i] - lost[i] + n_grown,
            )
            update.pruned[layer.name] = lost[i]
            update.grown[layer.name] = n_grown
        return self._finish(update, t0)

    @torch.no_grad()
    def _prune_to(self, fraction: float) -> MaskUpdate:
        """Prune each layer towards its final count: ``fraction`` 0 is dense, 1 is the target."""
        t0 = time.perf_counter()
        assert self._prune is not None
        views = self._views()
        bad = self._non_finite_inputs(views)
        if bad:
            return self._skip(f"non-finite {bad}", None)
        layers = self._layers
        active = [layer.active for layer in layers]
        target = [
            round(layer.numel - (layer.numel - layer.final_count) * fraction) for layer in layers
        ]
        remove = [max(a - t, 0) for a, t in zip(active, target, strict=True)]
        free = [i for i, layer in enumerate(layers) if not layer.fixed]
        total_free = max(sum(active[i] for i in free) - sum(target[i] for i in free), 0)
        scores = self._prune_scores(views)
        if isinstance(scores, str):
            return self._skip(scores, None)
        pruned = self._prune_sets(views, scores, remove, total_free)
        update = MaskUpdate(self._step, "prune", None)
        for layer, view, p in zip(layers, views, pruned, strict=True):
            self._commit(layer, view.mask & ~p, p, None)
            update.pruned[layer.name] = _count(p)
            update.grown[layer.name] = 0
        if fraction >= 1.0:
            self._finished = True
        return self._finish(update, t0)

    def _commit(
        self,
        layer: _Layer | _CompactLayer,
        new: Tensor,
        pruned: Tensor,
        grown: Tensor | None,
        *,
        active: int | None = None,
    ) -> None:
        """Install the mask ``new`` (``active``: its count, where known)."""
        policy = self.config.optimizer_state
        window = self._window.get(layer.name)
        if isinstance(layer, _CompactLayer):
            old_param, old_nnz = layer.param, layer.active
            source = layer.set_mask(new)  # new values: kept ones carried over, grown ones zero
            kept = source >= 0
            # the optimizer holds the new values Parameter, with its state moved along
            for group in self.optimizer.param_groups:
                group["params"] = [layer.param if p is old_param else p for p in group["params"]]
            old_state = self.optimizer.state.pop(old_param, None)
            if old_state is not None:
                state = {}
                for key, value in old_state.items():
                    if isinstance(value, Tensor) and value.shape == (old_nnz,):
                        moved = torch.zeros(source.numel(), dtype=value.dtype, device=value.device)
                        moved[kept] = value[source[kept]]
                        value = moved
                    state[key] = value
                self.optimizer.state[layer.param] = state
            _ACTIVE.pop(id(old_param), None)
            _ACTIVE[id(layer.param)] = weakref.ref(self)
            ema = self._ema.get(layer.name)
            if ema is not None:
                moved = torch.zeros(source.numel(), dtype=ema.dtype, device=ema.device)
                moved[kept] = ema[source[kept]]
                self._ema[layer.name] = moved
        else:
            layer.set_mask(new, active)
            layer.zero_inactive_(layer.param)  # pruned weights are zero now; grown ones were zero
            if policy in ("reset_pruned", "reset_both"):
                reset_state(self.optimizer, layer.param, pruned)
            if grown is not None and (
                policy in ("reset_grown", "reset_both") or window is not None
            ):
                reset_state(self.optimizer, layer.param, grown)
        if grown is not None and window is not None and policy == "keep":
            self._carry_window_momentum(layer, grown, window)

    def _carry_window_momentum(
        self, layer: _Layer | _CompactLayer, grown: Tensor, window: Tensor
    ) -> None:
        """SGD: a regrown weight starts with the momentum its position gathered in the window
        (the window keeps an average; SGD's buffer is a sum: scale by 1 / (1 - momentum))."""
        state = self.optimizer.state.get(layer.param, {})
        buf = state.get("momentum_buffer")
        if not isinstance(buf, Tensor):
            return
        carried = window / (1.0 - self._momentum_coefficient(layer))
        if isinstance(layer, _CompactLayer):
            # grown positions, in the new values order
            at = layer.mask.reshape(-1).nonzero().squeeze(1)
            is_grown = grown.reshape(-1)[at]
            buf[is_grown] = carried.reshape(-1)[at[is_grown]].to(buf.dtype)
        else:
            buf[grown] = carried[grown].to(buf.dtype)

    def _use_compact(self, name: str, storage: Any) -> None:
        """Hand layer ``name`` over to accelerated storage (see :func:`sparselearn.accelerate`)."""
        index = next(i for i, layer in enumerate(self._layers) if layer.name == name)
        old = self._layers[index]
        if old.compact:
            raise ValueError(f"{name} is already accelerated")
        assert isinstance(old, _Layer)
        compact = _CompactLayer(old, storage)
        ema = self._ema.get(name)
        if ema is not None:
            self._ema[name] = ema[old.mask].clone()
        self._layers[index] = compact
        _ACTIVE.pop(id(old.param), None)
        _ACTIVE[id(compact.param)] = weakref.ref(self)
        self._arm_sinks()

    def _finish(self, update: MaskUpdate, t0: float) -> MaskUpdate:
        if _distributed.is_parallel():
            # every rank computed the same update from the same (all-reduced) signals; copying
            # rank 0's masks guarantees identity even where floating point disagreed
            for layer in self._layers:
                mask = layer.mask.clone()
                _distributed.broadcast_(mask)
                if not torch.equal(mask, layer.mask):
                    layer.set_mask(mask)
                    layer.zero_inactive_(layer.param)
        if update.kind == "regrow":
            self._window.clear()  # a new window starts before the next update
        for layer in self._layers:
            layer.release()
        update.density = self.density()
        update.seconds = time.perf_counter() - t0
        self.history.append(update)
        logger.info(
            "step %d: %s: pruned %d, grown %d, density %.4f (%.3f s)",
            update.step,
            update.kind,
            update.total_pruned,
            update.total_grown,
            update.density,
            update.seconds,
        )
        return update


class _ActiveScores(NamedTuple):
    """Prune scores of the active positions only (flat indices ``idx``, ascending)."""

    idx: Tensor
    scores: Tensor


_BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def _zeroing_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """What :meth:`_Layer.zero_inactive_` applies. On CPU: an integer word per weight of the
    weight's width, all one bits where active, zero where not; AND-ing the weight's bits with it
    zeroes the inactive entries exactly and vectorises (float32 4096x4096 at 50% density: 4.4 ms,
    against 40 ms for ``masked_fill_`` with a bool mask, whose per-element branch mispredicts).
    It costs the weight's width in memory instead of one byte: elsewhere (GPUs, where
    ``masked_fill_`` runs at memory speed) the bool complement is kept instead."""
    if mask.device.type != "cpu" or dtype.itemsize not in _BITS:
        return ~mask
    return mask.to(_BITS[dtype.itemsize]).neg_()


def _count(mask: Tensor) -> int:
    return int(torch.count_nonzero(mask))  # far faster than a bool sum()


def _finite(t: Tensor) -> bool:
    """Every entry finite: NaN and inf show up in the min or max (one cheap pass, no copy)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.detach())
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _check_optimizer_holds(optimizer: torch.optim.Optimizer, targets: list[Target]) -> None:
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [t.name for t in targets if id(t.param) not in held]
    if missing:
        raise ValueError(
            f"the optimizer does not hold {len(missing)} of the parameters to sparsify "
            f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); create it from "
            "this model's parameters (e.g. torch.optim.SGD(model.parameters(), ...))"
        )


def _check_not_sparsified(model: nn.Module, targets: list[Target]) -> None:
    for key, what in [(id(model), "this model"), *((id(t.param), t.name) for t in targets)]:
        ref = _ACTIVE.get(key)
        engine = ref() if ref is not None else None
        if engine is None:
            continue
        if engine.model is model or any(
            layer.param is t.param for layer in engine._layers for t in targets
        ):
            raise RuntimeError(
                f"{what} is already sparsified by {engine!r}; call engine.remove() first"
            )


def sparsify(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    method: str = "sparse_momentum",
    density: float | None = None,
    total_steps: int | None = None,
    **options: Any,
) -> SparseEngine:
    """Train ``model`` sparse with ``method`` from the next ``optimizer.step()`` on.

    Args:
        model: the model; its Linear and Conv weights are sparsified by default.
        optimizer: the optimizer over the model's parameters; keep calling its ``step()``.
        method: a preset name from :func:`sparselearn.methods`.
        density: fraction of weights kept active (0.05 = 95% sparsity); not for ``dense``.
        total_steps: optimizer steps in the whole run; needed by methods with a schedule.
        **options: any preset field to override (see the README), e.g. ``update_every=100``.

    Returns:
        The :class:`SparseEngine`, with ``masks``, ``density()``, ``summary()``,
        ``state_dict()``/``load_state_dict()`` and ``remove()``.

    Example::

        engine = sl.sparsify(model, optimizer, method="sparse_momentum", density=0.05,
                             total_steps=epochs * len(train_loader))
    """
    preset = METHODS.get(method)
    for key in options:
        if key not in OPTION_NAMES:
            raise TypeError(unknown_option_message(key))
    schedule = options.get("schedule", preset.defaults.get("schedule", "periodic"))
    if density is None:
        if schedule != "dense":
            raise ValueError(f"method {method!r} needs a density in (0, 1], e.g. density=0.05")
        density = 1.0
    unused = unused_options(str(schedule), set(options))
    prune = options.get("prune", preset.defaults.get("prune"))
    if (
        schedule == "one_shot"
        and "init" in options
        and prune
        and PRUNE.get(prune).scope == "global"
    ):
        unused.append("init")
    if unused:
        raise ValueError(
            f"option(s) {', '.join(unused)} have no effect with method {method!r} "
            f"(schedule {schedule!r}); remove them"
        )
    params = {**preset.defaults, **options}
    config = SparsityConfig(method=method, density=density, total_steps=total_steps, **params)
    return SparseEngine(model, optimizer, config)
