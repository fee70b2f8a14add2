"""The sparse training engine: masks kept by optimizer step hooks, updated on the schedule.

:class:`SparseEngine` holds the pieces together: the layers' storage (``storage.py``), the
calendar (``calendar.py``), the signals it gathers between updates (``signals.py``), the
mask-update mechanics (``update.py``) and its state (``state.py``). Its public surface is what
a training loop needs; the attributes documented under "Extension surface" are what other parts
of sparselearn (``accelerate``, ``flops``, ``compat``) and extensions build on.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..budget import layer_counts
from ..config import SparsityConfig
from ..criteria import GROWTH, PRUNE, REDISTRIBUTION, Criterion
from ..methods import make_config
from ..schedules import MASK_SCHEDULE, MaskSchedule, MaskUpdate
from ..selection import sample_without_replacement, top_k
from ..structure import Groups, Structure, parse_structure
from ..targets import DENSE_REASONS, Target, dense_by_reason, select
from . import distributed, structured
from .calendar import Calendar
from .placement import WHOLE, Placement, check_records, placements
from .signals import FactoredWindow, Signals
from .state import STATE_FORMAT, check_state
from .storage import CSRStorage, CSRWeight, LayerStorage, MaskedDense, Planned, as_mask
from .update import Criteria, MaskUpdater

logger = logging.getLogger("sparselearn")


APEX_FP16_MESSAGE = (
    "apex's FP16_Optimizer wraps the real optimizer and keeps float32 master weights that the "
    "masks would not reach; train in mixed precision with torch.amp instead (torch.autocast "
    "for the forward, torch.amp.GradScaler for the loss) and pass the plain optimizer"
)


def is_apex_fp16(optimizer: object) -> bool:
    return type(optimizer).__name__ == "FP16_Optimizer" or hasattr(
        optimizer, "fp32_from_fp16_groups"
    )


class SparsityWarning(UserWarning):
    """A sparse run configured so that it will not do what its method says."""


# id(model) and id(param) -> the engine managing it (verified by identity on lookup)
_ACTIVE: dict[int, weakref.ref[SparseEngine]] = {}


class SparseEngine:
    """Keeps a model's weights sparse while the user's own loop calls ``optimizer.step()``.

    Create it with :func:`sparselearn.sparsify`. It hooks into the optimizer: after every step
    the inactive weights are set to exactly zero and, when the schedule says so, the masks are
    updated (prune, redistribute, regrow) with the number of active weights kept exact.

    Extension surface (stable, for code that builds on the engine):

    - ``schedule``: the :class:`~sparselearn.MaskSchedule` in use; ``calendar``: when updates
      happen and which steps need the dense gradient (``update_due(step)``,
      ``in_window(step)``, ``wants_dense_grad(step)``, ``dense_gradient_share()``);
    - ``needs``: the signals its criteria read (``"grad"``, ``"momentum"``); ``prune``,
      ``growth``: the criteria (or None);
    - ``layers``: each sparsified tensor's storage (:class:`~.storage.LayerStorage`: ``name``,
      ``kind``, ``mask``, ``param``, ``active``, ...), in module registration order;
    - ``store_as_csr(name, weight)``: hand a layer to CSR storage (``sl.accelerate`` does);
    - ``apply_masks()``: zero the inactive weights now; ``attached``, ``check_attached()``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: SparsityConfig,
        state: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if is_apex_fp16(optimizer):
            raise TypeError(APEX_FP16_MESSAGE)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        self.config = config
        self.model = model
        self.optimizer = optimizer
        self.schedule: MaskSchedule = MASK_SCHEDULE.get(config.schedule)
        selection = select(model, config)
        targets = selection.targets
        # the model's other weights, each with the reason it stays dense (name -> (reason, n))
        self._dense: dict[str, tuple[str, int]] = dict(selection.dense)
        _check_meta(targets, self.schedule, state)
        where = placements([t.name for t in targets], [t.param for t in targets])
        _check_optimizer_holds(optimizer, targets)
        _check_not_sparsified(model, targets)

        self._seed = distributed.same_on_all_ranks(
            config.seed if config.seed is not None else torch.initial_seed() % 2**63
        )
        self._generators: dict[str, torch.Generator] = {}
        self._step = 0
        self.prune: Criterion | None = PRUNE.get(config.prune) if config.prune else None
        self.growth: Criterion | None = GROWTH.get(config.growth) if config.growth else None
        redistribution = REDISTRIBUTION.get(config.redistribution)
        needs: set[str] = set()
        for part in (self.prune, self.growth):
            if part is not None:
                needs |= part.needs
        if "redistribution" in self.schedule.options:
            needs |= redistribution.needs
        self.needs = frozenset(needs)
        # growth by momentum needs the momentum of missing weights: leave gradients dense, unless
        # that momentum is gathered from dense gradients in a window before each update
        self._mask_grads = self.schedule.masks and not (
            self.growth is not None
            and "momentum" in self.growth.needs
            and config.momentum_window is None
        )
        self.calendar = Calendar(config, self.schedule, self.needs)
        self._closure_step = False
        self.history: list[MaskUpdate] = []
        # an OrderedDict: RemovableHandle holds it by weak reference, which a dict refuses
        self._update_hooks: OrderedDict[int, Callable[[SparseEngine, MaskUpdate], None]] = (
            OrderedDict()
        )
        self._notified = 0  # updates handed to the hooks

        structure = parse_structure(config.structure)
        self._groups = (
            _structured_groups(targets, where, self.schedule, structure)
            if structure.structured
            else None
        )
        self._layers: list[LayerStorage] = list(self._initial_layers(targets, where))
        self.signals = Signals(optimizer, config, self.needs, self._layers)
        self._updater = MaskUpdater(
            config,
            optimizer,
            self._layers,
            Criteria(self.prune, self.growth, redistribution),
            self.needs,
            self.signals,
            self.calendar,
            clock=lambda: self._step,
            generator=self._generator,
            history=self.history,
            replaced=self._track,
            on_disagreement=self._warn_disagreement,
            groups=self._groups,
        )
        if state is None:
            self.apply_masks()

        self._handles: list[RemovableHandle] = []
        self._grad_hooks: dict[str, RemovableHandle] = {}
        self._handles.append(optimizer.register_step_post_hook(self._post_step))
        if self.schedule.masks:
            self._handles.append(optimizer.register_step_pre_hook(self._pre_step))
            if self._mask_grads:
                for layer in self._layers:
                    self._grad_hooks[layer.name] = layer.param.register_post_accumulate_grad_hook(  # type: ignore[no-untyped-call]
                        self._grad_hook(layer)
                    )
        ref = weakref.ref(self)
        _ACTIVE[id(model)] = ref
        for layer in self._layers:
            _ACTIVE[id(layer.param)] = ref
        self._attached = True
        if state is not None:
            # weights restored before the engine exists (a trainer's resume) keep their values:
            # the saved masks are adopted without first applying the freshly drawn ones
            try:
                self.load_state_dict(state)
            except BaseException:
                self.remove()
                raise
        logger.info("sparsify: %s; %s", self._headline(), self._dense_line())
        self._warn_if_masks_never_change()

    def _warn_if_masks_never_change(self) -> None:
        """A run shorter than its update interval never updates a mask: say so, and what to
        pass instead (the method would silently train as static sparse)."""
        cfg, total = self.config, self.config.total_steps
        if not (self.schedule.updates and "update_every" in self.schedule.options):
            return
        every = cfg.interval
        if total is None or every == 0:
            return
        candidates = [*range(every, total + 1, every), total]
        if any(self.calendar.update_due(s) for s in candidates):
            return
        warnings.warn(
            f"{cfg.method}: no mask update falls within this run (update_every={every}, "
            f"total_steps={total}, start_at={cfg.start_at:g}, stop_at={cfg.stop_at:g}): the "
            f"masks never change and {cfg.method} trains as static sparse. Pass a shorter "
            f"update_every (below {total}: e.g. the steps of one epoch, or update_every='epoch' "
            "with steps_per_epoch)",
            SparsityWarning,
            stacklevel=4,
        )

    # ------------------------------------------------------------------ construction

    def _initial_layers(self, targets: list[Target], where: list[Placement]) -> list[LayerStorage]:
        """Each target with its initial mask: every weight active for schedules that start
        dense, else the init's share of the budget drawn at random (the seeded generator).
        A process that holds part of a weight keeps its part of the mask drawn for the whole
        weight (the draw of one process; the whole mask exists for that moment only, one layer
        at a time)."""
        cfg = self.config
        final = [0] * len(targets)
        if self.schedule.masks:
            free = [i for i, t in enumerate(targets) if t.density is None]
            if free:
                counts = layer_counts(
                    cfg.init,
                    [targets[i].matrix_shape for i in free],
                    cfg.density,
                    [targets[i].name for i in free],
                    [targets[i].param.numel() for i in free],
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
        per_group: list[int | None] = [None] * len(targets)
        if self._groups is not None and self.schedule.masks:
            free = [i for i, t in enumerate(targets) if t.density is None]
            counts = structured.initial_counts(self._groups, final, free)
            final = [k * g.count for k, g in zip(counts, self._groups, strict=True)]
            per_group = list(counts)
        layers: list[LayerStorage] = []
        for i, (t, count, placement, k) in enumerate(
            zip(targets, final, where, per_group, strict=True)
        ):
            p = t.param
            if p.is_meta:
                # a model built on the meta device: positions drawn as a list, uniformly, the
                # values materialised at them only (sl.accelerate)
                gen = self._generator(torch.device("cpu"))
                picked = sample_without_replacement(p.numel(), count, gen)
                layers.append(Planned(t, torch.sort(picked).values, count))
                continue
            if self.schedule.starts_dense:
                mask = torch.ones(placement.local(p).shape, dtype=torch.bool, device=p.device)
            elif k is not None and self._groups is not None:
                gen = self._generator(p.device)
                mask = structured.initial_mask(self._groups[i], k, gen, p.device)
            else:
                gen = self._generator(p.device)
                noise = torch.rand(p.shape, generator=gen, device=p.device)
                everywhere = torch.ones(p.shape, dtype=torch.bool, device=p.device)
                mask = placement.part(top_k(noise, everywhere, count, gen, count=p.numel()))
            final_count = count if self.schedule.masks else p.numel()
            layers.append(MaskedDense(t, mask, final_count, placement))
        return layers

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self._seed)
            self._generators[key] = gen
        return gen

    def _track(self, old: nn.Parameter, new: nn.Parameter) -> None:
        """A layer's parameter was replaced: find this engine from the new one."""
        _ACTIVE.pop(id(old), None)
        _ACTIVE[id(new)] = weakref.ref(self)

    # ------------------------------------------------------------------ public surface

    @property
    def masks(self) -> Mapping[str, Tensor]:
        """Parameter name -> bool mask (the weight's shape and device; for a model sharded by
        FSDP2, a DTensor sharded like the parameter: ``full_tensor()`` gives the whole mask).
        Read-only: masks change through :meth:`update_masks` or :meth:`load_state_dict`; a
        mask changed in place makes the engine's next use raise, naming it."""
        return MappingProxyType({layer.name: layer.public_mask() for layer in self._layers})

    @property
    def step(self) -> int:
        """Optimizer steps taken since ``sparsify`` (skipped AMP steps do not count)."""
        return self._step

    @property
    def last_update(self) -> MaskUpdate | None:
        return self.history[-1] if self.history else None

    @property
    def layers(self) -> Sequence[LayerStorage]:
        """The storage of each sparsified tensor, in module registration order."""
        return tuple(self._layers)

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
        groups = dense_by_reason(self._dense)
        if groups:
            dense, everything = self._dense_share()
            lines.append(
                f"dense: {dense:,} of the model's {everything:,} weights "
                f"({100 * dense / everything:.2f}%) are not sparsified:"
            )
            width = max(len(DENSE_REASONS[reason]) for reason, _, _ in groups)
            for reason, tensors, n in groups:
                lines.append(
                    f"  {DENSE_REASONS[reason].ljust(width)}  {n:>{len(f'{everything:,}')},} "
                    f"in {tensors} tensor{'s' if tensors > 1 else ''}"
                )
        return "\n".join(lines)

    def _dense_share(self) -> tuple[int, int]:
        """(weights of the model left dense, weights of the model)."""
        dense = sum(n for _, n in self._dense.values())
        return dense, dense + sum(layer.numel for layer in self._layers)

    def _headline(self) -> str:
        cfg = self.config
        return (
            f"{cfg.method}: {len(self._layers)} sparsified tensors, target density "
            f"{cfg.density:.4g}, step {self._step}"
        )

    def _dense_line(self) -> str:
        """Which share of the model stays dense, and why (for the log line of sparsify)."""
        dense, everything = self._dense_share()
        if not dense:
            return "every weight of the model is sparsified"
        parts = ", ".join(
            f"{DENSE_REASONS[reason]} {100 * n / everything:.1f}%"
            for reason, _, n in dense_by_reason(self._dense)
        )
        return f"{100 * dense / everything:.1f}% of the model's weights stay dense ({parts})"

    def __repr__(self) -> str:
        return f"SparseEngine({self._headline()})"

    def update_masks(self, prune_rate: float | None = None) -> MaskUpdate:
        """Update the masks now, outside the schedule (e.g. at the end of an epoch).

        ``prune_rate`` overrides the scheduled rate for this update (periodic methods only).
        """
        self.check_attached()
        try:
            update = self.schedule.update(
                _OnDemand(self._updater, self._capture_grads_for_manual_update),
                self.config,
                self._step,
                prune_rate,
            )
        finally:
            self.signals.dense_grads.clear()
        self._notify()
        return update

    def verify_masks(self) -> list[str]:
        """Under data parallelism, check that every rank holds the same masks (a checksum per
        layer, all-gathered: cheap) and give the layers that differ rank 0's masks. Returns the
        names of those layers, the same on every rank (empty: all agree, or one process). Every
        mask update ends with this check; a disagreement there also warns. Under FSDP2, where
        each rank holds its own block of each mask, it checks that the blocks add up to each
        layer's count and returns the layers that do not (nothing to copy from rank 0)."""
        self.check_attached()
        return self._updater.agree()

    def _warn_disagreement(self, names: list[str]) -> None:
        warnings.warn(
            f"masks differed across ranks after the update at step {self._step} in "
            f"{', '.join(names)}; rank 0's masks were copied to every rank. Ranks diverge when "
            "they compute the update from different values: check that every rank runs the "
            "same model, data-parallel wrapper and engine options",
            SparsityWarning,
            stacklevel=2,
        )

    def register_update_hook(
        self, hook: Callable[[SparseEngine, MaskUpdate], None]
    ) -> RemovableHandle:
        """Call ``hook(engine, update)`` after every mask update (scheduled or asked for), with
        the new masks in place; ``handle.remove()`` stops it. Loggers use it to see every
        update, not only the latest when they next look."""
        handle = RemovableHandle(self._update_hooks)
        self._update_hooks[handle.id] = hook
        return handle

    def _notify(self) -> None:
        """Hand the updates not yet seen to the update hooks."""
        fresh, self._notified = self.history[self._notified :], len(self.history)
        for update in fresh:
            for hook in list(self._update_hooks.values()):
                hook(self, update)

    def remove(self) -> None:
        """Detach from the optimizer and the model. The weights stay sparse; the masks are kept
        in ``engine.masks`` for inspection; ``sparsify`` may be called on the model again."""
        for handle in [*self._handles, *self._grad_hooks.values()]:
            handle.remove()
        self._handles.clear()
        self._grad_hooks.clear()
        for key in [id(self.model), *(id(layer.param) for layer in self._layers)]:
            ref = _ACTIVE.get(key)
            if ref is not None and ref() is self:
                del _ACTIVE[key]
        self._attached = False
        self._arm_sinks()  # accelerated layers stop producing dense gradients

    @property
    def attached(self) -> bool:
        """False after :meth:`remove`."""
        return self._attached

    def check_attached(self) -> None:
        if not self._attached:
            raise RuntimeError("this engine was removed; call sparselearn.sparsify again")

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Set the inactive weights to exactly zero (the step hook does it after every step)."""
        for layer in self._layers:
            layer.sync_device()
            layer.zero_inactive_(layer.param)

    def release(self, name: str) -> None:
        """Stop sparsifying ``name``: its weight keeps its current values and trains dense
        from the next step; the other layers keep their masks and budgets (the 2019 API's
        ``remove_weight``)."""
        self.check_attached()
        index = next((i for i, layer in enumerate(self._layers) if layer.name == name), None)
        if index is None:
            raise ValueError(
                f"{name!r} is not sparsified by this engine; choose from "
                f"{[layer.name for layer in self._layers]}"
            )
        layer = self._layers[index]
        if layer.kind == "csr":
            raise ValueError(f"{name} is accelerated (stored sparse); it cannot become dense")
        if len(self._layers) == 1:
            raise ValueError(f"{name} is the only sparsified tensor; call engine.remove() instead")
        del self._layers[index]
        self._dense[name] = ("released", layer.numel)
        handle = self._grad_hooks.pop(name, None)
        if handle is not None:
            handle.remove()
        self.signals.ema.pop(name, None)
        self.signals.window.pop(name, None)
        if _ACTIVE.get(id(layer.param)) is not None:
            del _ACTIVE[id(layer.param)]

    def store_as_csr(self, name: str, weight: CSRWeight, *, transposed: bool = False) -> None:
        """Hand layer ``name`` over to CSR storage in an accelerated module (see
        :func:`sparselearn.accelerate`): the optimizer must hold ``weight.values`` already.
        ``transposed``: ``weight`` stores the transpose of the parameter (a ``Conv1D``)."""
        index = next(i for i, layer in enumerate(self._layers) if layer.name == name)
        old = self._layers[index]
        if old.kind == "csr":
            raise ValueError(f"{name} is already accelerated")
        new = CSRStorage(old, weight, transposed=transposed)
        # the masking hook of the dense weight holds its storage (weight and masks): removed,
        # so that the dense weight is freed as soon as the model lets it go (a CSR layer has
        # nothing to mask)
        handle = self._grad_hooks.pop(name, None)
        if handle is not None:
            handle.remove()
        ema = self.signals.ema.get(name)
        if ema is not None:
            self.signals.ema[name] = (
                torch.zeros_like(new.param, dtype=torch.float32)
                if ema.is_meta
                else new.from_weight_shape(ema).clone()
            )
        self._layers[index] = new
        self._track(old.param, new.param)
        self._arm_sinks()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: masks, step, RNG states, engine buffers.

        Plain tensors and Python values only: loads with ``torch.load(..., weights_only=True)``.
        For a model sharded by FSDP2 the masks (and gradient averages) are this rank's blocks,
        and ``"shards"`` records which rows of each weight they are: each rank saves its own
        state and loads it into an engine sharded the same way.
        """
        records = _placement_records(self._layers)
        return {
            **({"shards": records} if records else {}),
            "format": STATE_FORMAT,
            "config": self.config.to_dict(),
            "step": self._step,
            "pending_one_shot": self.calendar.pending_first_step,
            "finished": self.calendar.finished,
            "masks": {layer.name: layer.saved_structure() for layer in self._layers},
            "generators": {k: g.get_state() for k, g in self._generators.items()},
            "ema": {k: v.clone() for k, v in self.signals.ema.items()},
            "window": {
                k: v.clone() for k, v in self.signals.window.items() if isinstance(v, Tensor)
            },
            # a window held as the factors of its steps' gradients: the factors (as few bytes)
            **({"window_factors": factors} if (factors := self._window_factors()) else {}),
            "history": [dataclasses.asdict(u) for u in self.history],
        }

    def _window_factors(self) -> dict[str, dict[str, Any]]:
        return {
            name: {
                "betas": [beta for beta, _ in window.steps],
                "steps": [[[gp, xp] for gp, xp in grad.parts] for _, grad in window.steps],
            }
            for name, window in self.signals.window.items()
            if isinstance(window, FactoredWindow)
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved. The engine must have been created with the same
        configuration on the same model; differences are reported, nothing is half-applied."""
        self.check_attached()
        check_records(state.get("shards", {}), _placement_records(self._layers))
        check_state(state, self.config, self.schedule, self._layers, self.signals.ema)
        masks = state["masks"]
        if self._groups is not None:
            wrong = structured.broken(
                [as_mask(masks[layer.name], layer.shape) for layer in self._layers],
                self._groups,
                pruning=self.schedule.starts_dense,
                ablation=self.config.neuron_ablation > 0,
            )
            if wrong:
                raise ValueError(
                    f"engine state masks break structure {self.config.structure!r}: "
                    f"{'; '.join(wrong[:3])}"
                )
        for layer in self._layers:
            layer.load_mask(masks[layer.name])
            layer.release()
        for k, v in state.get("ema", {}).items():
            self.signals.ema[k].copy_(v)
        window: dict[str, Tensor | FactoredWindow] = {
            k: v.clone() for k, v in state.get("window", {}).items()
        }
        by_name = {layer.name: layer for layer in self._layers}
        for name, saved in state.get("window_factors", {}).items():
            layer = by_name[name]
            assert isinstance(layer, CSRStorage)
            restored = window[name] = FactoredWindow(tuple(layer.storage.shape))
            for beta, parts in zip(saved["betas"], saved["steps"], strict=True):
                grad = layer.storage.grad_from_factors(
                    [(gp.clone(), xp.clone()) for gp, xp in parts]
                )
                restored.add(grad, float(beta))
        self.signals.window = window
        self._generators.clear()
        for key, gen_state in state["generators"].items():
            gen = torch.Generator(device=key)
            gen.set_state(gen_state)
            self._generators[key] = gen
        self._step = int(state["step"])
        self.history[:] = [MaskUpdate(**u) for u in state.get("history", [])]
        self._notified = len(self.history)
        self.calendar.pending_first_step = bool(state["pending_one_shot"])
        self.calendar.finished = bool(state["finished"])
        self.apply_masks()
        self._arm_sinks()

    # ------------------------------------------------------------------ hooks

    def _grad_hook(self, layer: LayerStorage) -> Callable[[Tensor], None]:
        def hook(param: Tensor) -> None:
            # mask as gradients accumulate, so that clipping sees the sparse gradient; on steps
            # that need the dense gradient, masking waits for the optimizer pre-step hook
            if param.grad is not None and not self.calendar.wants_dense_grad(self._step + 1):
                layer.sync_device()
                layer.zero_inactive_(param.grad)

        return hook

    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        planned = [layer.name for layer in self._layers if layer.kind == "planned"]
        if planned:
            raise RuntimeError(
                f"{', '.join(planned[:3])}{', ...' if len(planned) > 3 else ''} "
                "still on the meta device: call sl.accelerate(model, engine) before training, "
                "which materialises the active weights"
            )
        # hooks receive the step call's own arguments: (optimizer, closure?) and kwargs
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        self._closure_step = closure is not None
        if self._closure_step:
            return  # the gradient is computed inside step(): handled in the post-step hook
        if self.calendar.wants_dense_grad(self._step + 1):
            self.signals.snapshot_grads(self._layers)
        if self.calendar.pending_first_step:
            self._first_step()
        if self._mask_grads:
            with torch.no_grad():
                for layer in self._layers:
                    if layer.param.grad is not None:
                        layer.sync_device()
                        layer.zero_inactive_(layer.param.grad)

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self.schedule.masks:
            self._step += 1  # nothing to mask: only count
            return
        self._mask_and_update()
        self._notify()

    def _mask_and_update(self) -> None:
        if self._closure_step:
            if self.calendar.wants_dense_grad(self._step + 1):
                self.signals.snapshot_grads(self._layers)
            if self.calendar.pending_first_step:
                self._first_step()
        self.apply_masks()
        self.signals.update_ema(self._layers)
        self._step += 1
        if self.config.momentum_window is not None and self.calendar.in_window(self._step):
            self.signals.update_window(self._layers)
        try:
            if self.calendar.update_due(self._step):
                self._updater.after_step = True
                if "grad" not in self.needs:
                    # the window has taken what it needs of this step's dense gradients: they
                    # are freed before the update materialises its own tensors
                    self.signals.dense_grads.clear()
                    for layer in self._layers:
                        layer.want_dense_grad(False)
                self.schedule.update(self._updater, self.config, self._step)
        finally:
            self._updater.after_step = False
            self.signals.dense_grads.clear()
            self._arm_sinks()

    def _first_step(self) -> None:
        self.calendar.pending_first_step = False
        try:
            self.schedule.first_step(self._updater, self.config)
        finally:
            self.signals.dense_grads.clear()

    def _arm_sinks(self) -> None:
        """Tell accelerated layers whether the coming step must produce the dense gradient."""
        wanted = self._attached and self.calendar.wants_dense_grad(self._step + 1)
        for layer in self._layers:
            layer.want_dense_grad(wanted)

    def _capture_grads_for_manual_update(self) -> None:
        if "grad" not in self.needs or self.signals.dense_grads:
            return
        if self._mask_grads:
            raise RuntimeError(
                f"{self.config.prune}/{self.config.growth} need the dense gradient, which the "
                "engine captures only at scheduled update steps (gradients are masked "
                "otherwise); set update_every instead of calling update_masks() yourself"
            )
        self.signals.snapshot_grads(self._layers)


class _OnDemand:
    """The updater for an update the user asked for: the gradients are captured first."""

    def __init__(self, updater: MaskUpdater, capture: Callable[[], None]) -> None:
        self._updater, self._capture = updater, capture

    def regrow(self, rate: float) -> MaskUpdate:
        self._capture()
        return self._updater.regrow(rate)

    def prune_to(self, fraction: float) -> MaskUpdate:
        self._capture()
        return self._updater.prune_to(fraction)


def _placement_records(layers: Sequence[LayerStorage]) -> dict[str, list[int]]:
    """What a saved state records of where each layer lives (e.g. which rows of each weight a
    rank of a sharded model holds)."""
    return {
        layer.name: record for layer in layers if (record := layer.placement.record()) is not None
    }


def _structured_groups(
    targets: list[Target], where: list[Placement], schedule: MaskSchedule, structure: Structure
) -> list[Groups]:
    """Each target's groups under a structure; what the structure cannot handle is refused."""
    if not schedule.masks:
        raise ValueError(f"structure {structure.name!r} needs a sparse method, not dense")
    if any(t.param.is_meta for t in targets):
        raise ValueError(
            f"structure {structure.name!r} with a model on the meta device is not supported: "
            "build the model on a real device, or use structure='unstructured'"
        )
    if any(p is not WHOLE for p in where):
        raise ValueError(
            f"structure {structure.name!r} is not supported with weights sharded by "
            "fully_shard yet; use DDP, one process, or structure='unstructured'"
        )
    return structured.groups_of(targets, structure)


def _check_meta(targets: list[Target], schedule: MaskSchedule, state: object) -> None:
    """A model built on the meta device is sparsified with its positions drawn as lists: all
    of its sparsified weights, from a sparse start, with no saved state to adopt."""
    meta = [t.name for t in targets if t.param.is_meta]
    if not meta:
        return
    names = f"{', '.join(meta[:5])}{', ...' if len(meta) > 5 else ''}"
    if len(meta) != len(targets):
        raise ValueError(
            f"{names} {'is' if len(meta) == 1 else 'are'} on the meta device and the other "
            "sparsified weights are not: build the whole model under torch.device('meta'), or "
            "materialise it first (model.to_empty(device=...) and initialise it)"
        )
    if not schedule.masks or schedule.starts_dense:
        raise ValueError(
            f"{names} {'is' if len(meta) == 1 else 'are'} on the meta device, and this method "
            "starts from the dense weights: build the model on a real device, or choose a "
            "method that starts sparse (static, set, dsr, rigl, sparse_momentum)"
        )
    if state is not None:
        raise ValueError(
            "a saved state cannot be adopted by a model on the meta device: load the "
            "checkpoint into the materialised model (sl.load)"
        )


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
            layer.param is t.param for layer in engine.layers for t in targets
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
    *,
    state: Mapping[str, Any] | None = None,
    **options: Any,
) -> SparseEngine:
    """Train ``model`` sparse with ``method`` from the next ``optimizer.step()`` on.

    Args:
        model: the model; its Linear and Conv weights are sparsified by default.
        optimizer: the optimizer over the model's parameters; keep calling its ``step()``.
        method: a preset name from :func:`sparselearn.methods`.
        density: fraction of weights kept active (0.05 = 95% sparsity); not for ``dense``.
        total_steps: optimizer steps in the whole run; needed by methods with a schedule.
        state: an engine's ``state_dict()`` to continue from. Its masks are adopted as they
            are, without applying the freshly drawn initial masks first, so weights restored
            before this call (a trainer resuming a checkpoint) keep their values.
        **options: any preset field to override (docs/guide.md, "Options"), e.g.
            ``update_every=100``.

    Returns:
        The :class:`SparseEngine`, with ``masks``, ``density()``, ``summary()``,
        ``state_dict()``/``load_state_dict()`` and ``remove()``.

    Example::

        engine = sl.sparsify(model, optimizer, method="sparse_momentum", density=0.05,
                             total_steps=epochs * len(train_loader))
    """
    config = make_config(method, density, total_steps, **options)
    return SparseEngine(model, optimizer, config, state=state)
