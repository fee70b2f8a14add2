"""FLOP accounting for Linear and Conv layers and expert stacks, dense and sparse.

One multiply-add counts as 2 FLOPs. A sparse layer is charged only for its active weights:
``2 * active weights * output positions`` (Linear: one position per sample). The products of
attention (scores and weighted values, which multiply activations, not weights) are counted
apart, as ``attention``. Normalisation, activations, pooling and biases are not counted (they
are a small share and stay dense).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .targets import expert_count, is_conv1d

_COUNTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class LayerFlops:
    name: str  # the weight's name, e.g. "features.0.weight"
    dense: int  # FLOPs per sample with every weight active
    sparse: int  # FLOPs per sample counting active weights only
    density: float


@dataclass(frozen=True)
class FlopReport:
    """Inference FLOPs per sample: of the weight layers (``dense``, ``sparse``, per layer), and
    of attention's products between activations (``attention``, never sparse)."""

    layers: list[LayerFlops] = field(default_factory=list)
    attention: int = 0

    @property
    def dense(self) -> int:
        return sum(layer.dense for layer in self.layers)

    @property
    def sparse(self) -> int:
        return sum(layer.sparse for layer in self.layers)

    @property
    def ratio(self) -> float:
        """Sparse FLOPs as a fraction of dense FLOPs."""
        return self.sparse / self.dense if self.dense else 1.0

    @property
    def theoretical_speedup(self) -> float:
        return self.dense / self.sparse if self.sparse else float("inf")


@torch.no_grad()
def count_flops(
    model: nn.Module,
    input_shape: tuple[int, ...],
    masks: Mapping[str, Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> FlopReport:
    """Inference FLOPs per sample of ``model`` for one input of ``input_shape`` (no batch dim;
    ``dtype``: the input's, e.g. ``torch.long`` for token ids; default float32).

    ``masks`` (e.g. ``engine.masks``) gives the active weights; without it the model's own
    non-zero weights count as active. Linear, Conv and Hugging Face ``Conv1D`` layers are
    counted at each output position; ``nn.MultiheadAttention`` by its projections (queries at
    the query positions, keys and values at the key positions, the output projection). The
    attention products themselves (scores, weighted values) multiply activations, not weights:
    those computed by ``F.scaled_dot_product_attention`` (tiny-gpt, Hugging Face models' "sdpa"
    attention) are the report's ``attention``, every query against every key (a causal mask
    halves the useful work but not what the kernels compute); attention written as plain matrix
    products is not counted. A stack of expert matrices (a mixture of experts) counts each expert's
    matrix for the tokens routed to it (the integer tensor of expert indices its module is
    called with; without one, every token for every expert).
    """
    names = {id(m): n for n, m in model.named_modules()}
    uses: list[tuple[str, Tensor, int, slice | None]] = []  # (weight name, weight, positions, rows)

    def active(name: str, weight: Tensor, rows: slice | None) -> int:
        m = masks[name] if masks is not None and name in masks else weight
        return int(torch.count_nonzero(m if rows is None else m[rows]))

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        prefix = names[id(module)]
        prefix = f"{prefix}." if prefix else ""
        if isinstance(module, nn.MultiheadAttention):
            uses.extend(_attention_uses(module, prefix, inputs))
            return
        out = output[0] if isinstance(output, tuple) else output
        assert isinstance(out, Tensor)
        per_position = out[0].numel() // _out_features(module) if out.dim() > 1 else 1
        if hasattr(module, "weight_sparse"):  # an accelerated layer: its stored structure
            storage: Any = module.weight_sparse
            uses.append((f"{prefix}weight", storage.mask(), per_position, None))
        else:
            uses.append((f"{prefix}weight", _weight(module), per_position, None))

    def experts_hook(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        prefix = names[id(module)]
        prefix = f"{prefix}." if prefix else ""
        inputs = [*args, *kwargs.values()]
        # the routing: the tensor of expert indices the experts are called with
        routing = next(
            (t for t in inputs if isinstance(t, Tensor) and _is_index(t)), None
        )  # (tokens, top_k)
        for local, weight, experts in _expert_stacks(module):
            if routing is not None:
                counts = torch.bincount(routing.flatten().long(), minlength=experts)
                tokens = counts[:experts].tolist()  # (an index past the experts: no expert)
            else:  # no routing among the inputs: every token counts once for every expert
                x = next(t for t in inputs if isinstance(t, Tensor))
                tokens = [x.numel() // x.shape[-1]] * experts
            for e, n in enumerate(tokens):
                uses.append((f"{prefix}{local}", weight, n, slice(e, e + 1)))

    handles = [m.register_forward_hook(hook) for m in model.modules() if _counted(m)]
    handles += [
        m.register_forward_hook(experts_hook, with_kwargs=True)
        for m in model.modules()
        if _expert_stacks(m)
    ]
    was_training = model.training
    model.eval()
    attention = _AttentionCounter()
    try:
        device = next(model.parameters()).device
        with attention:
            model(torch.zeros(1, *input_shape, device=device, dtype=dtype or torch.float32))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()

    totals: dict[str, list[int]] = {}  # name -> [dense, sparse, numel, active]
    for name, weight, n, rows in uses:
        part = weight if rows is None else weight[rows]
        t = totals.setdefault(name, [0, 0, weight.numel(), active(name, weight, None)])
        t[0] += 2 * part.numel() * n  # every weight is used at every position
        t[1] += 2 * active(name, weight, rows) * n
    order = {n: i for i, (n, _) in enumerate(model.named_parameters(remove_duplicate=False))}
    return FlopReport(
        [
            LayerFlops(name, d, sp, act / numel)
            for name, (d, sp, numel, act) in sorted(
                totals.items(), key=lambda kv: order.get(kv[0], len(order))
            )
        ],
        attention.flops,
    )


class _AttentionCounter(TorchFunctionMode):
    """Counts the products of ``F.scaled_dot_product_attention`` calls: ``2 * L * S * E`` for
    the scores and ``2 * L * S * Ev`` for the weighted values, per batch and head (queries
    ``(..., L, E)``, keys ``(..., S, E)``, values ``(..., S, Ev)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k, v = (
                args[i] if len(args) > i else kwargs[name]
                for i, name in enumerate(("query", "key", "value"))
            )
            batch = q.numel() // (q.shape[-2] * q.shape[-1])
            self.flops += 2 * batch * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        return func(*args, **kwargs)


def _attention_uses(
    module: nn.MultiheadAttention, prefix: str, inputs: tuple[Any, ...]
) -> list[tuple[str, Tensor, int, slice | None]]:
    """Queries at the query positions, keys and values at the key positions, the output
    projection at the query positions."""
    query, key = inputs[0], inputs[1] if len(inputs) > 1 else inputs[0]
    seq = 1 if module.batch_first and query.dim() == 3 else 0
    n_q, n_k = int(query.shape[seq]), int(key.shape[seq])
    e = module.embed_dim
    uses: list[tuple[str, Tensor, int, slice | None]] = []
    packed: Tensor | None = getattr(module, "in_proj_weight", None)  # None: own k/v sizes
    if packed is not None:
        for part, n in ((slice(0, e), n_q), (slice(e, 2 * e), n_k), (slice(2 * e, 3 * e), n_k)):
            uses.append((f"{prefix}in_proj_weight", packed, n, part))
    else:
        for name, n in (("q", n_q), ("k", n_k), ("v", n_k)):
            weight = getattr(module, f"{name}_proj_weight")
            uses.append((f"{prefix}{name}_proj_weight", weight, n, None))
    uses.append((f"{prefix}out_proj.weight", module.out_proj.weight, n_q, None))
    return uses


def _is_index(t: Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _expert_stacks(module: nn.Module) -> list[tuple[str, Tensor, int]]:
    """(local name, weight, experts) of each stack of expert matrices ``module`` holds."""
    stacks: list[tuple[str, Tensor, int]] = []
    for local, p in module.named_parameters(recurse=False):
        experts = expert_count(module, local, p)
        if experts is not None:
            stacks.append((local, p, experts))
    return stacks


def _counted(module: nn.Module) -> bool:
    return (
        isinstance(module, (*_COUNTED, nn.MultiheadAttention))
        or is_conv1d(module)
        or hasattr(module, "weight_sparse")
    )


def _weight(module: nn.Module) -> Tensor:
    w = module.weight
    assert isinstance(w, Tensor)
    return w


def _out_features(module: nn.Module) -> int:
    """Output units of a layer (rows of its weight; columns of a Conv1D's (in, out) weight)."""
    if hasattr(module, "weight_sparse"):  # SparseLinear / SparseConv2d, stored (out, in, ...)
        storage: Any = module.weight_sparse
        return int(storage.shape[0])
    w = _weight(module)
    return int(w.shape[1]) if is_conv1d(module) else int(w.shape[0])


@dataclass(frozen=True)
class TrainingLayerFlops:
    """FLOPs per sample of one layer: inference, and a training step (forward, input gradient,
    weight gradient)."""

    name: str
    density: float
    inference_dense: int
    inference_sparse: int
    train_dense: int
    train_sparse: int  # as this engine computes it, dense-gradient steps amortised
    train_paper: int  # every product at the active weights only (the 2019 paper's accounting)


@dataclass(frozen=True)
class TrainingFlopReport:
    """:func:`flops`: per layer and in total; ``dense_gradient_share`` is the fraction of
    training steps on which the engine needs the dense weight gradient; ``attention`` the
    inference FLOPs per sample of attention's products between activations (not in the
    layers' rows: a training step costs three times that, forward and two gradients)."""

    layers: list[TrainingLayerFlops]
    dense_gradient_share: float
    attention: int = 0

    def total(self, field_name: str) -> int:
        return sum(getattr(layer, field_name) for layer in self.layers)

    @property
    def train_dense_total(self) -> int:
        """A dense training step's FLOPs per sample, attention included."""
        return self.total("train_dense") + 3 * self.attention

    @property
    def train_sparse_total(self) -> int:
        """A training step's FLOPs per sample as this engine computes it (dense-gradient steps
        amortised), attention included: what comparisons at equal training cost use."""
        return self.total("train_sparse") + 3 * self.attention

    @property
    def inference_speedup(self) -> float:
        return self.total("inference_dense") / max(1, self.total("inference_sparse"))

    @property
    def train_speedup(self) -> float:
        """Theoretical training-step speedup as the engine computes (dense gradients included)."""
        return self.total("train_dense") / max(1, self.total("train_sparse"))

    @property
    def paper_speedup(self) -> float:
        """The speedup the paper's FLOP accounting would claim (all products sparse)."""
        return self.total("train_dense") / max(1, self.total("train_paper"))

    def table(self) -> str:
        """Per-layer text table, in MFLOPs per sample."""
        head = (
            f"{'layer':<28} {'density':>8} {'infer dense':>12} {'infer sparse':>13} "
            f"{'train dense':>12} {'train sparse':>13} {'train paper':>12}"
        )
        rows = [head, "-" * len(head)]

        def mf(x: int) -> str:
            return f"{x / 1e6:.2f}"

        for r in self.layers:
            rows.append(
                f"{r.name:<28} {r.density:>8.4f} {mf(r.inference_dense):>12} "
                f"{mf(r.inference_sparse):>13} {mf(r.train_dense):>12} "
                f"{mf(r.train_sparse):>13} {mf(r.train_paper):>12}"
            )
        rows.append(
            f"{'total':<28} {'':>8} {mf(self.total('inference_dense')):>12} "
            f"{mf(self.total('inference_sparse')):>13} {mf(self.total('train_dense')):>12} "
            f"{mf(self.total('train_sparse')):>13} {mf(self.total('train_paper')):>12}"
        )
        if self.attention:
            a = self.attention
            rows.append(
                f"{'attention products':<28} {'':>8} {mf(a):>12} {mf(a):>13} {mf(3 * a):>12} "
                f"{mf(3 * a):>13} {mf(3 * a):>12}"
            )
        rows.append(
            f"theoretical speedup: inference {self.inference_speedup:.2f}x, training step "
            f"{self.train_speedup:.2f}x as computed (dense weight gradient on "
            f"{100 * self.dense_gradient_share:.1f}% of steps), {self.paper_speedup:.2f}x by the "
            "paper's accounting"
        )
        return "\n".join(rows)


def dense_gradient_share(engine: Any) -> float:
    """Fraction of training steps on which ``engine`` needs the dense weight gradient: every
    step for sparse momentum without a momentum window, update steps (and window steps) for the
    others, none for fixed masks (:meth:`sparselearn.engine.Calendar.dense_gradient_share`)."""
    share: float = engine.calendar.dense_gradient_share()
    return share


def flops(
    model: nn.Module,
    engine: Any,
    input_shape: tuple[int, ...],
    dtype: torch.dtype | None = None,
) -> TrainingFlopReport:
    """FLOPs per sample of ``model`` under ``engine``'s masks for one input of ``input_shape``
    (no batch dimension; ``dtype`` the input's, ``torch.long`` for token ids): inference and a
    training step, dense and sparse, per layer, and attention's products apart.

    A training step is counted as three products per layer (forward, input gradient, weight
    gradient), each ``2 * weights * positions`` dense. Sparse: the forward and input gradient
    at the active weights; the weight gradient at the active weights, or dense on the steps
    where the engine needs the dense gradient (``dense_gradient_share``). The paper's
    accounting charges every product at the active weights only.
    """
    inference = count_flops(model, input_shape, engine.masks, dtype=dtype)
    share = dense_gradient_share(engine)
    layers = []
    for r in inference.layers:
        sparsified = r.name in engine.masks
        grad_w = (share * r.dense + (1 - share) * r.sparse) if sparsified else r.dense
        layers.append(
            TrainingLayerFlops(
                name=r.name,
                density=r.density,
                inference_dense=r.dense,
                inference_sparse=r.sparse,
                train_dense=3 * r.dense,
                train_sparse=int(2 * r.sparse + grad_w),
                train_paper=3 * r.sparse,
            )
        )
    return TrainingFlopReport(layers, share, inference.attention)
