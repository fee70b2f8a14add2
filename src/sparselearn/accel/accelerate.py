"""``sl.accelerate(model, engine)``: swap sparsified layers for layers that compute sparsely."""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..engine import LayerStorage, SparseEngine
from ..engine.sharding import refuse_sharded
from ..engine.storage import Planned
from ..kernels import REFERENCE, check_threads, kernels_for
from ..kernels.build import march
from ..targets import expert_count, is_conv1d
from .layers import (
    SparseConv1D,
    SparseConv2d,
    SparseLinear,
    SparseWeight,
    compute_dtype,
    supports_conv,
)
from .live import LiveCheck, Way
from .materialise import check_initialisable, draw_active, materialise_rest, replace_in_optimizer


@dataclass(frozen=True)
class LayerChoice:
    name: str  # the weight's name
    kind: str  # "linear" or "conv2d"
    density: float
    dense_ms: float | None  # median forward + backward time, dense masked layer
    sparse_ms: float | None  # the same for the sparse layer (on the faster thread count)
    chosen: str  # "sparse" or "dense"
    reason: str
    threads: int | None = None  # the sparse layer's thread cap (None: all threads)
    backend: str | None = None  # the kernels of a sparse layer: "cpp" (compiled) or "torch"
    # a sparse layer's forward where no gradient is recorded: its kernels ("sparse") or the
    # dense product ("dense", where that timed faster), with the median forward times
    inference: str | None = None
    dense_inference_ms: float | None = None
    sparse_inference_ms: float | None = None
    # how a sparse layer computes its training steps: its kernels ("sparse") or the dense
    # product of its weights ("dense"), as the check in the run decided (``live``: the median
    # ms of each way it timed there; None until it has decided, or where nothing was checked)
    steps: str | None = None
    live: str | None = None


@dataclass
class AccelerationReport:
    backend: str  # as asked for; each accelerated layer's ``backend`` says what it uses
    layers: list[LayerChoice] = field(default_factory=list)
    # the instruction set the compiled kernels were built for ($SPARSELEARN_MARCH; None where
    # no layer runs them)
    march: str | None = None

    @property
    def accelerated(self) -> list[str]:
        return [c.name for c in self.layers if c.chosen == "sparse"]

    @property
    def inference_dense(self) -> list[str]:
        """The accelerated layers that infer densely (pass them back as ``inference_dense=``
        with ``layers=accelerated`` to re-apply these choices)."""
        return [c.name for c in self.layers if c.chosen == "sparse" and c.inference == "dense"]

    @property
    def dense_steps(self) -> list[str]:
        """The accelerated layers that compute their training steps densely, as the check in
        the run decided (pass them back as ``dense_steps=`` with ``layers=accelerated`` to
        re-apply these choices)."""
        return [c.name for c in self.layers if c.chosen == "sparse" and c.steps == "dense"]

    @property
    def thread_caps(self) -> dict[str, int]:
        """The accelerated layers that run on fewer than all threads, with their caps (pass
        them back as ``threads=`` with ``layers=accelerated`` to re-apply these choices)."""
        return {
            c.name: c.threads for c in self.layers if c.chosen == "sparse" and c.threads is not None
        }

    def __str__(self) -> str:
        rows = [
            ("layer", "kind", "density", "dense ms", "sparse ms", "chosen", "backend", "why",
             "inference dense/sparse ms", "inference", "steps", "in the run (median ms)")
        ]  # fmt: skip

        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}"

        for c in self.layers:
            rows.append(
                (
                    c.name,
                    c.kind,
                    f"{c.density:.4f}",
                    ms(c.dense_ms),
                    ms(c.sparse_ms),
                    c.chosen if c.threads is None else f"{c.chosen} ({c.threads} thread)",
                    c.backend or "-",
                    c.reason,
                    "-"
                    if c.dense_inference_ms is None
                    else f"{ms(c.dense_inference_ms)} / {ms(c.sparse_inference_ms)}",
                    c.inference or "-",
                    c.steps or "-",
                    c.live or "-",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
        if self.march is not None:
            lines.append(f"compiled kernels built with -march={self.march}")
        return "\n".join(lines)


def _parent(model: nn.Module, qualified: str) -> tuple[nn.Module, str]:
    *path, child = qualified.split(".")
    parent = model
    for part in path:
        parent = getattr(parent, part)
    return parent, child


def _time_turns(fns: list[Any], repeats: int) -> list[float]:
    """Median ms of each callable over ``repeats`` timed runs, taken in two turns (so that a
    change in the machine's load weighs on all alike); each turn starts with two untimed
    runs, which bring back the caches and free memory that the others used."""
    per_turn = -(-repeats // 2)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(2):
        for fn, out in zip(fns, times, strict=True):
            fn()
            fn()
            for _ in range(per_turn):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
    return [1e3 * statistics.median(t) for t in times]


def _wait_for(device: torch.device) -> None:
    """Block until ``device`` has finished its queued work (CUDA runs asynchronously: a timer
    around the launches alone would measure the launches, not the work)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _kernels(t: Tensor, backend: str) -> str:
    """The kernels a sparse layer runs for tensors like ``t`` (half precision computes in
    float32): "cpp" or "torch"."""
    like = torch.empty(0, dtype=compute_dtype(t.dtype), device=t.device)
    return "torch" if kernels_for(like, backend) == REFERENCE else "cpp"


def _fwd_bwd(module: nn.Module, x: Tensor, threads: int | None = None) -> Any:
    """A step of ``module`` alone: forward, then backward from a given output gradient (made
    once: filling it is no part of the layer's step), with ``threads`` for a sparse layer."""
    x = x.detach().requires_grad_()
    grad: list[Tensor] = []

    def run() -> None:
        if isinstance(module, (SparseLinear, SparseConv2d)):
            module.threads = threads
        module.zero_grad(set_to_none=True)
        x.grad = None
        out = module(x)
        if not grad:
            grad.append(torch.ones_like(out))
        out.backward(grad[0])
        _wait_for(x.device)

    return run


def _forward(module: nn.Module, x: Tensor, threads: int | None = None) -> Any:
    """Inference with ``module`` alone: a forward that records no gradient (a sparse layer on
    its kernels, with ``threads``)."""

    def run() -> None:
        if isinstance(module, (SparseLinear, SparseConv2d)):
            module.threads = threads
        with torch.no_grad():
            module(x)
        _wait_for(x.device)

    return run


def _swap_in_optimizer(
    optimizer: torch.optim.Optimizer,
    old: nn.Parameter,
    new: nn.Parameter,
    mask: Tensor,
    transposed: bool = False,
) -> None:
    """The optimizer holds ``new`` where it held ``old``; per-weight state follows the mask (in
    the stored matrix's order: the transpose's, for a ``transposed`` weight)."""
    state = optimizer.state.get(old)
    replace_in_optimizer(optimizer, old, new)
    if state:

        def active(v: Tensor) -> Tensor:
            if transposed:
                return v.t()[mask.t()].clone()
            return v.reshape(-1)[mask.reshape(-1)].clone()

        optimizer.state[new] = {
            k: active(v) if isinstance(v, Tensor) and v.shape == old.shape else v
            for k, v in state.items()
        }


def accelerate(
    model: nn.Module,
    engine: SparseEngine,
    example_input: Tensor | tuple[Any, ...] | None = None,
    *,
    mode: str = "auto",
    backend: str = "auto",
    repeats: int = 5,
    layers: Collection[str] | None = None,
    threads: Mapping[str, int] | None = None,
    inference_dense: Collection[str] | None = None,
    dense_steps: Collection[str] | None = None,
    live_rounds: int = 6,
) -> AccelerationReport:
    """Replace the engine's sparsified Linear and Conv2d layers with layers that compute with
    the sparse weights, wherever that is faster.

    Args:
        model: the sparsified model (in place).
        engine: its engine (from :func:`sparselearn.sparsify`).
        example_input: one real batch; each layer is timed once, dense against sparse, on the
            input shape it receives, and the faster is kept (``mode="auto"``).
        mode: ``"auto"`` (timed), ``"sparse"`` (every supported layer) or ``"dense"`` (none:
            only report).
        backend: ``"auto"``, ``"cpp"`` (compiled kernels) or ``"torch"`` (PyTorch CSR ops).
        repeats: timing repeats per layer (median).
        layers: if given, only these sparsified weights (names as in ``engine.masks``) may be
            accelerated; the others stay dense. With ``mode="sparse"`` this re-applies the
            choices of an earlier call (``report.accelerated``), e.g. when resuming a run.
        threads: with ``mode="sparse"``, thread caps per layer (``report.thread_caps`` of an
            earlier call; the others use every thread). ``mode="auto"`` times each sparse
            layer on one thread and on all, and keeps the faster (under
            ``OMP_WAIT_POLICY=PASSIVE`` a small layer can lose more to waking the threads
            than it gains from them); results are the same bit for bit either way.
        inference_dense: with ``mode="sparse"``, the layers that infer densely
            (``report.inference_dense`` of an earlier call). ``mode="auto"`` also times each
            accelerated layer's forward without gradients against the dense layer's, and
            where the dense one is faster the layer computes densely there (its
            ``inference``: a layer can train faster sparse and infer faster dense, as a dense
            backward is slower than a dense forward by more than a sparse one is).
        dense_steps: with ``mode="sparse"``, the layers that compute their training steps
            densely (``report.dense_steps`` of an earlier call).
        live_rounds: with ``mode="auto"``, each accelerated layer checks the choice in the
            run itself: over its first training steps it computes, in turns, on its kernels
            with every thread, with one, and densely (:attr:`SparseLinear.steps`), times each
            step's forward and backward, and keeps the fastest by the median of
            ``live_rounds`` rounds (after two untimed ones). A timing before the run can be
            wrong on a busy machine; this one is taken under the run's own conditions. The
            report's ``steps``, ``threads`` and ``live`` fill in as each layer decides.
            0: no check (the choices stay as timed here).

    The weights and their optimizer state of accelerated layers then take memory proportional
    to their active weights, and masks change as before: where every layer is an accelerated
    Linear and the criteria allow it (docs/architecture.md, "Mask updates in index form"), an
    update never builds a tensor of a weight's size, and a run's memory follows the active
    weights (docs/performance.md, "Memory", measures a whole run's peak); otherwise an update
    materialises each layer's dense weight, mask and scores for that moment. Methods whose
    growth needs the momentum of missing weights at every step (sparse momentum) must set
    ``momentum_window`` to be accelerated.

    A model built on the meta device (``with torch.device("meta"):``) and sparsified is
    materialised here: each sparsified layer becomes a sparse layer holding its active weights
    only, drawn by the layer's own ``reset_parameters`` a block of rows at a time, and the
    model's other modules are initialised by theirs, on the CPU (docs/guide.md, "Models larger
    than memory").
    """
    refuse_sharded(
        model,
        "sl.accelerate",
        "its layers compute with whole CSR weights. Train sharded with masks, then accelerate "
        "an unsharded copy in one process (load the full state dict into it: "
        "torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
        "options=StateDictOptions(full_state_dict=True)))",
    )
    layers = _check_arguments(
        engine, example_input, mode, layers, threads, inference_dense, dense_steps
    )
    if live_rounds < 0:
        raise ValueError(f"live_rounds must be >= 0 (0: no check in the run), got {live_rounds}")
    report = AccelerationReport(backend=backend)
    if any(layer.kind == "planned" for layer in engine.layers):
        _materialise(model, engine, mode, backend, report)
    owners = _owners(model)
    with _model_state_kept(model):  # timing runs the model: its buffers, grads and RNG return
        shapes = {} if example_input is None else _input_shapes(model, example_input)
        chosen = []
        materialised = {c.name for c in report.layers}
        for layer in engine.layers:
            if layer.name in materialised:
                continue
            choice, found, sparse = _choose(
                layer,
                owners.get(id(layer.param), []),
                shapes,
                mode,
                backend,
                repeats,
                layers,
                threads,
                set(inference_dense or ()),
            )
            report.layers.append(choice)
            chosen.append((layer, choice, found, sparse))
    for layer, choice, found, sparse in chosen:
        if choice.chosen == "sparse" and sparse is not None and found is not None:
            index = report.layers.index(choice)
            choice = dataclasses.replace(choice, backend=_kernels(layer.param, backend))
            if mode == "sparse":
                steps = "dense" if layer.name in (dense_steps or ()) else "sparse"
                choice = dataclasses.replace(choice, steps=steps)
            report.layers[index] = choice
            _install(model, engine, layer, found, sparse, choice)
            if mode == "auto" and live_rounds > 0:
                _check_live(report, index, sparse, live_rounds)
    if any(c.backend == "cpp" for c in report.layers):
        report.march = march()
    return report


def _owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """For each parameter (by id), the modules holding it: (module name, module, its name)."""
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for local, p in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), []).append((mod_name, module, local))
    return owners


def _materialise(
    model: nn.Module, engine: SparseEngine, mode: str, backend: str, report: AccelerationReport
) -> None:
    """A model built on the meta device: each sparsified layer becomes a sparse layer holding
    its active weights only (drawn by the layer's own initialisation, at the positions the
    engine drew), the rest of the model is initialised by its modules, on the CPU."""
    if mode == "dense":
        raise ValueError(
            "the model is on the meta device: its sparsified layers can only be materialised "
            "sparse (mode='sparse' or 'auto'), never as dense weights"
        )
    check_initialisable(model)
    owners = _owners(model)
    cpu = torch.device("cpu")
    for layer in engine.layers:
        if not isinstance(layer, Planned):
            continue
        found = owners.get(id(layer.param), [])
        module = found[0][1] if len(found) == 1 else None
        linear = isinstance(module, nn.Linear) and type(module) is nn.Linear
        conv = isinstance(module, nn.Conv2d) and type(module) is nn.Conv2d and supports_conv(module)
        if module is None or found[0][2] != "weight" or not (linear or conv):
            what = _no_kernel(module, found[0][2], layer.param) if module is not None else "tied"
            raise ValueError(
                f"{layer.name} is on the meta device, and only a layer with a sparse kernel can "
                f"be materialised sparse ({what}): exclude it (exclude=[...]) and build it on a "
                "real device"
            )
        old_bias = getattr(module, "bias", None)
        weight, bias = draw_active(module, layer.positions, cpu, layer.param.dtype)
        if isinstance(old_bias, nn.Parameter) and bias is not None:
            new_bias = nn.Parameter(bias, requires_grad=old_bias.requires_grad)
            module.bias = new_bias  # the sparse layer takes it from the module
            replace_in_optimizer(engine.optimizer, old_bias, new_bias)
        sparse: nn.Module = (
            SparseLinear(module, weight, backend)  # type: ignore[arg-type]
            if linear
            else SparseConv2d(module, weight, backend)  # type: ignore[arg-type]
        )
        sparse.train(module.training)
        parent, child = _parent(model, found[0][0])
        setattr(parent, child, sparse)
        replace_in_optimizer(engine.optimizer, layer.param, weight.values)
        engine.store_as_csr(layer.name, weight)
        report.layers.append(
            LayerChoice(
                layer.name,
                "linear" if linear else "conv2d",
                layer.active / layer.numel,
                None,
                None,
                "sparse",
                "materialised from the meta device",
                backend=_kernels(weight.values, backend),
                inference="sparse",
                steps="sparse",
            )
        )
    materialise_rest(model, cpu, engine.optimizer)


@contextlib.contextmanager
def _model_state_kept(model: nn.Module) -> Iterator[None]:
    """Leave ``model`` as it was: its buffers (BatchNorm's running statistics, which a training
    mode forward updates), its parameters' gradients (the dense layers' timing runs backward)
    and the random number generators (dropout, timing inputs)."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    grads = [(p, p.grad) for p in model.parameters()]
    devices = sorted({str(p.device) for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for buf, saved in buffers:
                    buf.copy_(saved)
            for p, g in grads:
                p.grad = g


def _check_arguments(
    engine: SparseEngine,
    example_input: object,
    mode: str,
    layers: Collection[str] | None,
    threads: Mapping[str, int] | None,
    inference_dense: Collection[str] | None = None,
    dense_steps: Collection[str] | None = None,
) -> set[str] | None:
    """Refuse what accelerate cannot do, naming it; returns ``layers`` as a set."""
    if mode not in ("auto", "sparse", "dense"):
        raise ValueError(f"mode must be 'auto', 'sparse' or 'dense', got {mode!r}")
    if mode == "auto" and example_input is None:
        raise ValueError("mode='auto' times each layer on a real batch: pass example_input")
    if layers is not None:
        layers = set(layers)
        unknown = sorted(layers - _names(engine))
        if unknown:
            raise ValueError(
                f"layers {unknown} are not sparsified weights of this engine; "
                f"choose from {sorted(_names(engine))}"
            )
    if threads is not None:
        _check_reapplied("threads", threads, "the thread caps", mode, engine)
        for value in threads.values():
            check_threads(value)
    if inference_dense is not None:
        _check_reapplied("inference_dense", inference_dense, "the inference choices", mode, engine)
    if dense_steps is not None:
        _check_reapplied("dense_steps", dense_steps, "the steps' choices", mode, engine)
    engine.check_attached()
    cfg = engine.config
    growth = engine.growth
    if growth is not None and "momentum" in growth.needs and cfg.momentum_window is None:
        raise ValueError(
            f"{cfg.method} grows by the momentum of missing weights, which needs the dense "
            "gradient at every step; sparsify with momentum_window=N (dense gradients only in "
            "the N steps before each update) to accelerate it"
        )
    return layers


def _names(engine: SparseEngine) -> set[str]:
    """The names of the engine's sparsified weights (without building their masks)."""
    return {layer.name for layer in engine.layers}


def _check_reapplied(
    argument: str, names: Collection[str], what: str, mode: str, engine: SparseEngine
) -> None:
    """An argument that re-applies ``what`` an earlier call chose, per weight: only with
    mode="sparse", and only for the engine's sparsified weights."""
    if mode != "sparse":
        raise ValueError(
            f"{argument}= re-applies {what} of an earlier call with mode='sparse'; "
            "mode='auto' times them itself"
        )
    unknown = sorted(set(names) - _names(engine))
    if unknown:
        raise ValueError(
            f"{argument} names {unknown}, which are not sparsified weights of this engine; "
            f"choose from {sorted(_names(engine))}"
        )


def _input_shapes(model: nn.Module, example_input: Tensor | tuple[Any, ...]) -> dict[str, Any]:
    """The input shape each Linear and Conv2d module receives from ``example_input``."""
    shapes: dict[str, torch.Size] = {}

    def record(name: str) -> Any:
        def hook(_m: nn.Module, inputs: tuple[Tensor, ...], _out: Tensor) -> None:
            shapes.setdefault(name, inputs[0].shape)  # returns None: the output is unchanged

        return hook

    hooks = [
        m.register_forward_hook(record(n))
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) or is_conv1d(m)
    ]
    try:
        with torch.no_grad():
            args = example_input if isinstance(example_input, tuple) else (example_input,)
            model(*args)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _no_kernel(module: nn.Module, local: str, param: Tensor) -> str:
    """Why the tensor ``local`` of ``module`` has no sparse kernel, for the report."""
    kind = type(module).__name__
    experts = expert_count(module, local, param)
    if experts is not None:
        return f"stack of {experts} expert matrices ({kind}.{local}): no sparse kernel"
    if isinstance(module, nn.MultiheadAttention):
        return f"MultiheadAttention's {local} (read by its attention): no sparse kernel"
    if isinstance(module, nn.Linear) and kind == "NonDynamicallyQuantizableLinear":
        return "MultiheadAttention's out_proj (read by its attention): no sparse kernel"
    if isinstance(module, nn.Linear):
        return f"{kind}, a subclass of Linear (its forward may differ): no sparse kernel"
    if isinstance(module, nn.Conv2d) and type(module) is nn.Conv2d:
        unsupported = [
            f"{what}={value}"
            for what, value, fine in (
                ("groups", module.groups, module.groups == 1),
                ("dilation", module.dilation, module.dilation == (1, 1)),
                ("stride", module.stride, module.stride[0] == module.stride[1]),
                ("padding", module.padding, not isinstance(module.padding, str)),
                ("padding_mode", module.padding_mode, module.padding_mode == "zeros"),
            )
            if not fine
        ]
        return f"Conv2d with {', '.join(unsupported)}: no sparse kernel"
    return f"{kind}.{local}: no sparse kernel (Linear, Conv2d and Conv1D have one)"


def _choose(
    layer: LayerStorage,
    found: list[tuple[str, nn.Module, str]],
    shapes: Mapping[str, torch.Size],
    mode: str,
    backend: str,
    repeats: int,
    layers: set[str] | None,
    threads: Mapping[str, int] | None,
    inference_dense: set[str],
) -> tuple[LayerChoice, tuple[str, nn.Module] | None, nn.Module | None]:
    """What to do with one sparsified tensor: the choice, its module and the sparse layer."""
    density = layer.active / layer.numel

    def dense(reason: str, kind: str = "-") -> tuple[LayerChoice, None, None]:
        return LayerChoice(layer.name, kind, density, None, None, "dense", reason), None, None

    if layer.kind == "csr":
        choice = LayerChoice(layer.name, "-", density, None, None, "sparse", "already")
        return choice, None, None
    if layers is not None and layer.name not in layers:
        return dense("not in layers")
    if len(found) != 1:
        return dense("tied to several modules" if found else "not among the model's parameters")
    mod_name, module, local = found[0]
    sparse: nn.Module
    # these exact types (a subclass may compute otherwise); isinstance narrows for mypy
    if local != "weight":
        return dense(_no_kernel(module, local, layer.param))
    if isinstance(module, nn.Linear) and type(module) is nn.Linear:
        kind, sparse = "linear", SparseLinear(module, layer.mask, backend)
    elif isinstance(module, nn.Conv2d) and type(module) is nn.Conv2d and supports_conv(module):
        kind, sparse = "conv2d", SparseConv2d(module, layer.mask, backend)
    elif is_conv1d(module):
        kind, sparse = "conv1d", SparseConv1D(module, layer.mask, backend)
    else:
        return dense(_no_kernel(module, local, layer.param))
    if mode != "auto":
        cap = threads.get(layer.name) if mode == "sparse" and threads is not None else None
        how = "dense" if layer.name in inference_dense else "sparse"
        choice = LayerChoice(
            layer.name, kind, density, None, None, mode, "forced", cap, inference=how
        )
        return choice, (mod_name, module), sparse
    if mod_name not in shapes:
        return dense("not reached by the example input", kind)
    x = torch.randn(shapes[mod_name], device=layer.device, dtype=layer.param.dtype)
    runs = [_fwd_bwd(module, x), _fwd_bwd(sparse, x)]
    # a small layer can be faster on one thread than waking the others for each of its
    # parallel regions (with OMP_WAIT_POLICY=PASSIVE every region wakes the sleeping threads)
    if torch.get_num_threads() > 1 and _kernels(x, backend) == "cpp":
        runs.append(_fwd_bwd(sparse, x, threads=1))
    dense_ms, *sparse_times = _time_turns(runs, repeats)
    best = min(range(len(sparse_times)), key=sparse_times.__getitem__)
    sparse_ms, cap = sparse_times[best], (None, 1)[best]
    if sparse_ms >= dense_ms:
        choice = LayerChoice(
            layer.name, kind, density, dense_ms, sparse_ms, "dense", "dense is faster"
        )
        return choice, None, None
    reason = "faster" if cap is None else "faster on one thread"
    dense_inference_ms, sparse_inference_ms = _time_turns(
        [_forward(module, x), _forward(sparse, x, threads=cap)], repeats
    )
    choice = LayerChoice(
        layer.name,
        kind,
        density,
        dense_ms,
        sparse_ms,
        "sparse",
        reason,
        cap,
        inference="dense" if dense_inference_ms < sparse_inference_ms else "sparse",
        dense_inference_ms=dense_inference_ms,
        sparse_inference_ms=sparse_inference_ms,
    )
    return choice, (mod_name, module), sparse


def _install(
    model: nn.Module,
    engine: SparseEngine,
    layer: LayerStorage,
    found: tuple[str, nn.Module],
    sparse: nn.Module,
    choice: LayerChoice,
) -> None:
    """Put the sparse layer in its module's place; the optimizer and the engine follow."""
    mod_name, module = found
    assert isinstance(sparse, (SparseLinear, SparseConv2d))
    sparse.threads = choice.threads
    sparse.inference = choice.inference or "sparse"
    sparse.steps = choice.steps or "sparse"
    sparse.train(module.training)
    parent, child = _parent(model, mod_name)
    setattr(parent, child, sparse)
    storage = sparse.weight_sparse
    assert isinstance(storage, SparseWeight)
    transposed = isinstance(sparse, SparseConv1D)  # stores the (in, out) weight's transpose
    _swap_in_optimizer(engine.optimizer, layer.param, storage.values, layer.mask, transposed)
    engine.store_as_csr(layer.name, storage, transposed=transposed)


def _check_live(report: AccelerationReport, index: int, layer: nn.Module, rounds: int) -> None:
    """Give ``layer`` (report.layers[index]) the check of its choice in the run: the ways it
    can compute its steps, the chosen one first; its verdict goes into the report."""
    assert isinstance(layer, (SparseLinear, SparseConv2d))
    choice = report.layers[index]
    ways = [Way("sparse", choice.threads)]
    if choice.backend == "cpp" and torch.get_num_threads() > 1:
        ways.append(Way("sparse", 1 if choice.threads is None else None))
    ways.append(Way("dense"))

    def verdict(best: Way, medians: dict[Way, float]) -> None:
        timed = ", ".join(f"{way} {ms:.2f}" for way, ms in medians.items())
        report.layers[index] = dataclasses.replace(
            report.layers[index], steps=best.steps, threads=best.threads, live=timed
        )

    layer.live = LiveCheck(ways, verdict, rounds=rounds)
