"""Remove the channels and neurons that a sparse model does not use, for inference.

A mask can leave a whole output channel (or neuron) of a layer without weights: its output is
then the same constant everywhere (bias, then batch norm and activation). Or it can leave a whole
input channel of the next layer without weights: the producing channel is never read. Either way
the channel can go: :func:`compact` rebuilds such layers as smaller dense layers, folds the
constants of removed channels into the next layer's bias, and checks that the outputs did not
change.

The model is traced with ``torch.fx``; a layer is compacted when its output reaches the next
Linear/Conv2d only through channel-wise operations (batch norm, element-wise activations,
dropout, pooling without padding, flatten; sparselearn's BatchNorm2d, MaxPool2d and Dropout
among them). Anything else (a residual addition, a
concatenation, the model's output) keeps the layer whole.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..engine.sharding import refuse_sharded
from .dropout import Dropout
from .layers import SparseConv2d, SparseLinear
from .norm import BatchNorm2d
from .pooling import MaxPool2d

_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid,
                        nn.Tanh, nn.Dropout, Dropout, nn.Identity)  # fmt: skip
_ELEMENTWISE_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu,
                          torch.sigmoid, torch.tanh, F.dropout}  # fmt: skip
# sparselearn's own modules, traced as single operations as torch.fx traces torch.nn's (their
# forwards check their input's shape, which a traced tensor cannot answer)
_LEAF_MODULES = (BatchNorm2d, MaxPool2d, Dropout)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _LEAF_MODULES) or super().is_leaf_module(m, module_qualified_name)


@dataclass(frozen=True)
class CompactedLayer:
    name: str  # the module's name
    channels_before: int
    channels_after: int


@dataclass
class CompactResult:
    """What :func:`compact` did; ``model`` is the compacted copy (in eval mode)."""

    model: nn.Module
    layers: list[CompactedLayer] = field(default_factory=list)
    max_abs_difference: float = 0.0  # compacted against original, on the example input

    @property
    def removed(self) -> int:
        """Channels and neurons removed in total."""
        return sum(c.channels_before - c.channels_after for c in self.layers)

    def __str__(self) -> str:
        lines = [f"{c.name}: {c.channels_before} -> {c.channels_after}" for c in self.layers]
        lines.append(
            f"removed {self.removed} channels/neurons; max |difference| of the outputs "
            f"{self.max_abs_difference:.2e}"
        )
        return "\n".join(lines)


def densified(model: nn.Module) -> nn.Module:
    """A copy in eval mode in which accelerated layers are the dense layers they replaced
    again (a ``Conv1D`` with its (in, out) weight)."""
    model = copy.deepcopy(model).eval()
    for name, module in list(model.named_modules()):
        if isinstance(module, (SparseLinear, SparseConv2d)):
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], module.to_dense_module().eval())
    return model


def _is_channelwise(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        m = modules[str(node.target)]
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.Flatten, *_ELEMENTWISE_MODULES)):
            return True  # (sparselearn's BatchNorm2d is one, with or without its ReLU)
        if isinstance(m, MaxPool2d):
            return True  # (no padding)
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            return m.padding in (0, (0, 0))
        return isinstance(m, nn.AdaptiveAvgPool2d)
    if node.op == "call_function":
        if node.target in _ELEMENTWISE_FUNCTIONS:
            return True
        if node.target in (F.max_pool2d, F.avg_pool2d):
            return node.kwargs.get("padding", 0) in (0, (0, 0)) and len(node.args) <= 3
        return node.target is torch.flatten and _flattens_from_1(node)
    if node.op == "call_method":
        if node.target in ("relu", "sigmoid", "tanh"):
            return True
        return node.target == "flatten" and _flattens_from_1(node)
    return False


def _flattens_from_1(node: fx.Node) -> bool:
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    return bool(start == 1)


def _chain(
    producer: fx.Node, modules: dict[str, nn.Module]
) -> tuple[list[fx.Node], fx.Node] | None:
    """The channel-wise nodes after ``producer`` up to the next Linear/Conv2d, or None."""
    path: list[fx.Node] = []
    node = producer
    while True:
        users = list(node.users)
        if len(users) != 1:
            return None
        nxt = users[0]
        if nxt.op == "call_module" and type(modules[str(nxt.target)]) in (nn.Linear, nn.Conv2d):
            # it must be the layer's only input
            return (path, nxt) if nxt.args[:1] == (node,) and len(nxt.args) == 1 else None
        if not _is_channelwise(nxt, modules) or nxt.args[:1] != (node,):
            return None
        path.append(nxt)
        node = nxt


def _run_node(node: fx.Node, x: Tensor, modules: dict[str, nn.Module]) -> Tensor:
    """Apply one chain node to ``x`` (its first argument), with its other arguments."""
    args = (x, *node.args[1:])
    if node.op == "call_module":
        out: Tensor = modules[str(node.target)](x)
        return out
    if node.op == "call_function":
        fn: Any = node.target
        return fn(*args, **node.kwargs)  # type: ignore[no-any-return]
    return getattr(x, str(node.target))(*args[1:], **node.kwargs)  # type: ignore[no-any-return]


@torch.no_grad()
def compact(
    model: nn.Module, engine: Any = None, example_input: Tensor | None = None, atol: float = 1e-4
) -> CompactResult:
    """Rebuild layers with empty output channels/neurons as smaller dense layers, for inference.

    Args:
        model: a trained sparse model (masked, or accelerated with :func:`accelerate`); it is
            not changed: the result holds a compacted copy in eval mode.
        engine: its engine; its masks decide which weights are active (default: non-zeros).
        example_input: one batch; needed to trace shapes and to check the outputs.
        atol: the largest absolute difference of the outputs accepted (float32 sums of the
            same products in another order, and folded constants).

    Returns:
        a :class:`CompactResult` with the model, the layers changed and the channels removed.
    """
    refuse_sharded(
        model,
        "sl.compact",
        "compact an unsharded copy loaded from the full state dict "
        "(torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
        "options=StateDictOptions(full_state_dict=True)))",
    )
    if example_input is None:
        raise ValueError("compact needs example_input: one batch of real input")
    original = densified(model)
    work = copy.deepcopy(original)
    masks: dict[str, Tensor] = {}  # module name -> active weights, shrunk with the layers
    if engine is not None:
        masks = {
            k.removesuffix(".weight"): v.detach().clone()
            for k, v in engine.masks.items()
            if k.endswith(".weight")
        }
    try:
        gm = fx.GraphModule(work, _Tracer().trace(work))
    except Exception as err:  # data-dependent control flow, untraceable modules
        raise ValueError(f"compact could not trace the model with torch.fx: {err}") from err
    modules = dict(gm.named_modules())

    # shapes of every node's output on the example input
    shapes: dict[str, torch.Size] = {}
    interp = fx.Interpreter(gm)
    orig_run = interp.run_node

    def run_node(n: fx.Node) -> Any:
        out = orig_run(n)
        if isinstance(out, Tensor):
            shapes[n.name] = out.shape
        return out

    interp.run_node = run_node  # type: ignore[method-assign]
    interp.run(example_input)

    def active(name: str, weight: Tensor) -> Tensor:
        mask = masks.get(name)
        return (mask.to(weight.device) if mask is not None else weight != 0).reshape(
            weight.shape[0], weight.shape[1], -1
        )

    result = CompactResult(model=gm)
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(modules[str(node.target)]) not in (
            nn.Linear,
            nn.Conv2d,
        ):
            continue
        found = _chain(node, modules)
        if found is None:
            continue
        path, consumer_node = found
        name, cname = str(node.target), str(consumer_node.target)
        prod: Any = modules[name]
        cons: Any = modules[cname]
        if (isinstance(prod, nn.Conv2d) and prod.groups != 1) or getattr(cons, "groups", 1) != 1:
            continue
        channels = prod.weight.shape[0]
        per_channel = cons.weight.shape[1] // channels  # consumer inputs per producer channel
        if per_channel * channels != cons.weight.shape[1]:
            continue
        empty_out = ~active(name, prod.weight).reshape(channels, -1).any(1)
        cons_active = active(cname, cons.weight).reshape(cons.weight.shape[0], channels, -1)
        unread = ~cons_active.any(2).any(0)
        # the constant that an empty output channel becomes after the chain
        z = prod.weight.new_zeros(1, *shapes[node.name][1:])
        if prod.bias is not None:
            z += prod.bias.view(1, -1, *([1] * (z.dim() - 2)))
        for n in path:
            z = _run_node(n, z, modules)
        z = z.reshape(1, channels, -1)
        constant = (z.amax(2) == z.amin(2)).squeeze(0)
        value = z[0, :, 0]
        padded_conv = isinstance(cons, nn.Conv2d) and any(p != 0 for p in cons.padding)
        foldable = constant & ((value == 0) | (not padded_conv))
        remove = unread | (empty_out & foldable)
        if not remove.any() or remove.all():
            continue
        keep = (~remove).nonzero().squeeze(1)
        # fold the constants of removed, read channels into the consumer's bias
        folded = remove & ~unread & (value != 0)
        w_c = cons.weight.reshape(cons.weight.shape[0], channels, -1)
        if folded.any():
            shift = (w_c[:, folded] * value[folded].view(1, -1, 1)).sum((1, 2))
            if cons.bias is None:
                cons.bias = nn.Parameter(torch.zeros_like(shift))
            cons.bias += shift
        _shrink_output(prod, keep)
        if name in masks:
            masks[name] = masks[name][keep.to(masks[name].device)]
        for n in path:
            if n.op == "call_module" and isinstance(
                modules[str(n.target)], nn.modules.batchnorm._BatchNorm
            ):
                _shrink_norm(modules[str(n.target)], keep)
        _shrink_input(cons, keep, per_channel)
        if cname in masks:
            m = masks[cname]
            kept = m.reshape(m.shape[0], channels, -1)[:, keep.to(m.device)]
            masks[cname] = kept.reshape(m.shape[0], len(keep) * per_channel, *m.shape[2:])
        result.layers.append(CompactedLayer(name, channels, len(keep)))
    gm.recompile()
    out_a, out_b = original(example_input), gm(example_input)
    result.max_abs_difference = float((out_a - out_b).abs().max()) if out_a.numel() else 0.0
    if result.max_abs_difference > atol:
        raise RuntimeError(
            f"the compacted model differs from the original by {result.max_abs_difference:.3g} "
            f"(> atol {atol}); please report this model"
        )
    return result


def _shrink_output(m: nn.Linear | nn.Conv2d, keep: Tensor) -> None:
    m.weight = nn.Parameter(m.weight[keep].clone())
    if m.bias is not None:
        m.bias = nn.Parameter(m.bias[keep].clone())
    if isinstance(m, nn.Linear):
        m.out_features = len(keep)
    else:
        m.out_channels = len(keep)


def _shrink_norm(bn: nn.modules.batchnorm._BatchNorm, keep: Tensor) -> None:
    bn.num_features = len(keep)
    if bn.weight is not None:
        bn.weight = nn.Parameter(bn.weight[keep].clone())
        assert bn.bias is not None
        bn.bias = nn.Parameter(bn.bias[keep].clone())
    if bn.running_mean is not None:
        assert bn.running_var is not None
        bn.running_mean = bn.running_mean[keep].clone()
        bn.running_var = bn.running_var[keep].clone()


def _shrink_input(m: nn.Linear | nn.Conv2d, keep: Tensor, per_channel: int) -> None:
    if isinstance(m, nn.Linear):
        cols = (
            keep.view(-1, 1) * per_channel + torch.arange(per_channel, device=keep.device)
        ).reshape(-1)
        m.weight = nn.Parameter(m.weight[:, cols].clone())
        m.in_features = len(cols)
    else:
        m.weight = nn.Parameter(m.weight[:, keep].clone())
        m.in_channels = len(keep)
