"""The signals mask updates read: the optimizer's momentum of the dense gradient (or the
engine's own gradient average), the dense gradient of update steps, the momentum gathered in a
window before each update; and resets of optimizer state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..config import SparsityConfig
from .storage import LayerStorage, RowsGrad


def group_of(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> dict[str, Any]:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    raise KeyError("parameter not held by the optimizer")


def keeps_momentum(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> bool:
    """Whether the optimizer keeps a momentum-like state for ``param`` (else the engine keeps an
    exponential moving average of the gradient itself)."""
    group = group_of(optimizer, param)
    if "betas" in group:  # Adam, AdamW, NAdam, RAdam, Adamax
        return True
    momentum = group.get("momentum", 0)
    return isinstance(momentum, (int, float)) and momentum > 0  # SGD, RMSprop with momentum


def optimizer_momentum(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> Tensor | None:
    """The optimizer's momentum of the dense gradient for ``param``, or ``None`` if it has none.

    Adam family: ``exp_avg / (sqrt(exp_avg_sq) + eps)`` (Adamax: ``exp_avg / (exp_inf + eps)``);
    SGD and RMSprop: ``momentum_buffer``.
    """
    state: dict[str, Any] = optimizer.state.get(param, {})
    if "exp_avg" in state:
        eps = float(group_of(optimizer, param).get("eps", 1e-8))
        exp_avg: Tensor = state["exp_avg"]
        if "exp_avg_sq" in state:
            exp_avg_sq: Tensor = state["exp_avg_sq"]
            return exp_avg / (exp_avg_sq.sqrt() + eps)
        if "exp_inf" in state:
            exp_inf: Tensor = state["exp_inf"]
            return exp_avg / (exp_inf + eps)
    buf = state.get("momentum_buffer")
    if isinstance(buf, Tensor):
        return buf
    return None


@torch.no_grad()
def reset_state(optimizer: torch.optim.Optimizer, layer: LayerStorage, positions: Tensor) -> None:
    """Zero every per-weight optimizer state tensor of ``layer``'s parameter at the
    ``positions`` (bool, the part of the weight this process holds)."""
    param = layer.param
    for value in optimizer.state.get(param, {}).values():
        if isinstance(value, Tensor) and value.shape == param.shape:
            local = layer.local(value)
            local.masked_fill_(positions.to(local.device), 0)


def _finite(t: Tensor) -> bool:
    """Every entry finite: NaN and inf show up in the min or max (one cheap pass, no copy)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.detach())
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


class FactoredWindow:
    """The window momentum of a layer whose dense gradients came as blocks of rows
    (:class:`~.storage.RowsGrad`): the window's gradients themselves, each with the momentum
    coefficient of its step, and any block of rows of their moving average replayed from them,
    in the order and with the operations :meth:`Signals.update_window` uses on whole tensors.
    It holds each step's factors (a few rows of the batch's size per step) instead of a tensor
    of the weight's size."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape
        self.steps: list[tuple[float, RowsGrad]] = []

    def add(self, grad: RowsGrad, beta: float) -> None:
        self.steps.append((beta, grad))

    def _replayed(self, part: Callable[[RowsGrad], Tensor]) -> Tensor:
        """The moving average of ``part`` of each step's gradient, as update_window makes it."""
        buf: Tensor | None = None
        for beta, grad in self.steps:
            values = part(grad)
            if buf is None:
                buf = values.float() * (1.0 - beta)
            else:
                buf.mul_(beta).add_(values, alpha=1.0 - beta)
        assert buf is not None
        return buf

    def rows(self, start: int, stop: int) -> Tensor:
        return self._replayed(lambda grad: grad.rows(start, stop))

    def at(self, rows: Tensor, cols: Tensor) -> Tensor:
        """The window momentum at the entries (``rows``, ``cols``) only."""
        return self._replayed(lambda grad: grad.at(rows, cols))

    def dense(self) -> Tensor:
        return self.rows(0, self.shape[0])

    def finite(self) -> bool:
        return all(grad.finite() for _, grad in self.steps)


def rows_of(signal: Tensor | RowsGrad | FactoredWindow, start: int, stop: int) -> Tensor:
    """Rows ``start:stop`` of a per-weight signal, however it is held."""
    if isinstance(signal, Tensor):
        return signal[start:stop]
    return signal.rows(start, stop)


def dense_of(signal: Tensor | RowsGrad | FactoredWindow) -> Tensor:
    return signal if isinstance(signal, Tensor) else signal.dense()


class Signals:
    """What the engine gathers between mask updates for the criteria to read.

    ``ema``: an exponential moving average of the gradient, for weights whose optimizer keeps no
    momentum (in the parameter's layout); ``window``: the momentum of the dense gradient within
    the window before an update (the weight's shape, or a :class:`FactoredWindow`);
    ``dense_grads``: this step's dense gradient, captured on the steps that need it (the
    weight's shape, or blocks of its rows: :class:`~.storage.RowsGrad`).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        config: SparsityConfig,
        needs: frozenset[str],
        layers: list[LayerStorage],
    ) -> None:
        self.optimizer, self.config = optimizer, config
        self.ema: dict[str, Tensor] = {}
        self.window: dict[str, Tensor | FactoredWindow] = {}
        self.dense_grads: dict[str, Tensor | RowsGrad] = {}
        if "momentum" in needs:
            for layer in layers:
                if not keeps_momentum(optimizer, layer.param):
                    self.ema[layer.name] = torch.zeros_like(
                        layer.local(layer.param), dtype=torch.float32
                    )

    def momentum(self, layer: LayerStorage) -> Tensor:
        """The momentum of ``layer``'s dense gradient, in the weight's shape."""
        m = layer.to_weight_shape(self.active_momentum(layer))
        window = self.window.get(layer.name)
        if window is not None:  # missing weights: the momentum gathered in the window
            m = torch.where(layer.mask, m, dense_of(window).to(m.dtype))
        return m

    def active_momentum(self, layer: LayerStorage) -> Tensor:
        """The momentum in the parameter's layout (for a weight held as CSR values, at the
        active weights only): the optimizer's, else the engine's average, else zeros."""
        m = optimizer_momentum(self.optimizer, layer.param)
        if m is None:
            m = self.ema.get(layer.name)
        if m is None:
            m = torch.zeros_like(layer.local(layer.param))
        return m.detach()

    def grad(self, layer: LayerStorage) -> Tensor:
        g = self.grad_held(layer)
        if not isinstance(g, Tensor):
            g = self.dense_grads[layer.name] = g.dense()
        return g

    def grad_held(self, layer: LayerStorage) -> Tensor | RowsGrad:
        """This update's dense gradient as captured (whole, or as blocks of rows)."""
        g = self.dense_grads.get(layer.name)
        if g is None:
            raise RuntimeError(f"no dense gradient captured for {layer.name} at this update")
        return g

    def snapshot_grads(self, layers: list[LayerStorage]) -> None:
        for layer in layers:
            self.dense_grads[layer.name] = layer.snapshot_grad()

    @torch.no_grad()
    def update_ema(self, layers: list[LayerStorage]) -> None:
        decay = self.config.ema_decay
        for layer in layers:
            ema = self.ema.get(layer.name)
            if ema is None:
                continue
            if ema.device != layer.param.device:
                ema = self.ema[layer.name] = ema.to(layer.param.device)
            ema.mul_(decay)
            if layer.param.grad is not None:
                ema.add_(layer.local(layer.param.grad), alpha=1.0 - decay)

    def momentum_coefficient(self, layer: LayerStorage) -> float:
        group = group_of(self.optimizer, layer.param)
        if "betas" in group:
            return float(group["betas"][0])
        momentum = group.get("momentum", 0)
        return float(momentum) if momentum else self.config.ema_decay

    @torch.no_grad()
    def update_window(self, layers: list[LayerStorage]) -> None:
        """Fold this step's dense gradient into the window momentum (window steps only)."""
        for layer in layers:
            # the dense gradient captured before masking (the pre-step hook)
            g = self.dense_grads.get(layer.name)
            if g is None:
                continue
            beta = self.momentum_coefficient(layer)
            buf = self.window.get(layer.name)
            if not isinstance(g, Tensor) and (buf is None or isinstance(buf, FactoredWindow)):
                if buf is None:
                    buf = self.window[layer.name] = FactoredWindow(g.shape)
                buf.add(g, beta)
                continue
            g = dense_of(g)
            if buf is None:
                self.window[layer.name] = g.float() * (1.0 - beta)
            else:
                buf = self.window[layer.name] = dense_of(buf)
                buf.mul_(beta).add_(g, alpha=1.0 - beta)

    def restart(self) -> list[str]:
        """After a skipped update: averages that went non-finite restart at zero, and the next
        window starts afresh. Returns the names of the averages reset."""
        reset = []
        for name, ema in self.ema.items():
            if not _finite(ema):
                ema.zero_()
                reset.append(name)
        self.window.clear()
        return reset
