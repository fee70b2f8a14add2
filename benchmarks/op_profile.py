"""Where the time goes in the rows of docs/performance.md that miss their targets.

Usage: ``make bench`` (or ``python benchmarks/op_profile.py --out docs/performance.md``).

- Linear layers: each kernel of a sparse training step timed alone (packing the activations
  into panels, the forward product, the one-pass backward, and the transposed product and the
  sampled weight gradient each alone) with their GFLOP/s, next to the dense matmul's; and the
  step of a layer with no non-zeros (the fixed costs); writing outputs and packing inputs at
  widths whose rows are 4 KiB apart and at others; a convolution on small outputs computed on
  planes and as a product over patches;
- the MLP's inference, op by op (torch profiler), dense and sparse;
- the per-layer choices of ``sl.accelerate`` on VGG-D and WRN-16-8;
- a training step of VGG-D, WRN-16-8 and ResNet-18 at 5%, dense and accelerated, split into
  the layers (sparse kernels, layers left dense), BatchNorm, activations, additions, the
  optimizer and the rest;
- the cost of keeping the gradient masked on a layer that stays dense;
- (``--inference-bound``, its own section) what bounds inference: each convolution of
  speed.py's table dense, sparse and with no non-zeros at all (the floor under every density),
  and the inference of VGG-D, WRN-16-8 and ResNet-18, dense, accelerated and accelerated with
  no non-zeros left, split by module, with the speedup left if the sparse layers' passes around
  their products cost nothing;
- (``--density-bound``, no timing, its own section) how much of each CIFAR model's training
  FLOPs ERK at 5% leaves in layers of 10% density and more, and the FLOP speedup left if those
  stay dense: the bound that the densest layers put on a whole model.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if os.environ.get("OMP_WAIT_POLICY") != "PASSIVE":
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import sparselearn as sl
from sparselearn.accel import SparseConv2d, SparseLinear, SparseWeight
from sparselearn.experiments.report import replace_section
from sparselearn.kernels import kernels_for
from sparselearn.kernels import ops as kops
from sparselearn.kernels.machine import cpu_name
from sparselearn.models import create_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for the sibling benchmark script
from benchmarks.speed import (  # timed as speed.py times them
    CONV_CASES,
    conv_case,
    full_step,
    inference,
    paired_ms,
    settle,
    train_step,
)

START, END = "<!-- profile:start -->", "<!-- profile:end -->"
BOUND_START, BOUND_END = "<!-- density-bound:start -->", "<!-- density-bound:end -->"
INFERENCE_START, INFERENCE_END = "<!-- inference-bound:start -->", "<!-- inference-bound:end -->"
BOUND_MODELS = ("vgg-d", "wrn-16-8", "resnet18")
BOUND_THRESHOLDS = (0.1, 0.15, 0.2)


def median_ms(fn: Callable[[], object], repeats: int = 9) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def kernel_times(n: int, density: float, batch: int) -> tuple[float, ...]:
    """Median ms of pack, W x, the backward (packing g, then W^T g and dW in one pass), and of
    W^T g and dW each alone on packed g (the kernels used when only one gradient is wanted); and
    the non-zeros."""
    x, g = torch.randn(batch, n), torch.randn(batch, n)
    mask = torch.rand(n, n, generator=torch.Generator().manual_seed(0)) < density
    w = SparseWeight(torch.randn(n, n), mask)
    crow, col, crow_t, col_t, perm, inv = w.crow, w.col, w.crow_t, w.col_t, w.perm, w.perm_inv
    val = w.values.detach()
    k = kernels_for(x)
    xp, gp = kops.pack(x, k), kops.pack(g, k)
    return (
        median_ms(lambda: kops.pack(x, k)),
        median_ms(lambda: kops.spmm(crow, col, val, xp, n, batch, None, None, k)),
        median_ms(
            lambda: kops.linear_backward(crow, col, crow_t, col_t, perm, inv, val, g, xp, False, k)
        ),
        median_ms(lambda: kops.spmm(crow_t, col_t, val, gp, n, batch, perm, None, k)),
        median_ms(lambda: kops.sampled(crow, col, gp, xp, k)),
        col.numel(),
    )


def dense_matmul_ms(n: int, batch: int) -> float:
    x, w = torch.randn(batch, n), torch.randn(n, n)
    return median_ms(lambda: x @ w.t())


def empty_step_ms(n: int, batch: int) -> tuple[float, float, float]:
    """A training step (as in speed.py) of an n x n layer with no non-zeros, sparse and dense:
    what a step costs besides the products (packing, writing the output and the input
    gradient, bias, autograd)."""
    x = torch.randn(batch, n, requires_grad=True)
    dense = nn.Linear(n, n)
    empty = torch.zeros(n, n, dtype=torch.bool)
    sparse = [SparseLinear(dense, empty, threads=t) for t in (None, 1)]
    return (
        median_ms(train_step(sparse[0], x), 21),
        median_ms(train_step(sparse[1], x), 21),
        median_ms(train_step(dense, x), 9),
    )


def linear_kernels() -> list[str]:
    rows = [
        "| layer, density | pack x (ms) | W x (ms) | backward: pack g, W^T g + dW in one pass (ms) "
        "| alone: W^T g / dW (ms) | sparse GFLOP/s | dense x W^T (ms) | dense GFLOP/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    batch = 256
    for n in (4096, 1024):
        dense_ms = dense_matmul_ms(n, batch)
        dense_rate = 2 * n * n * batch / 1e9 / dense_ms * 1e3
        for density in (0.01, 0.05, 0.1):
            t_pack, t_f, t_b, t_t, t_s, nnz = kernel_times(n, density, batch)
            rate = 3 * 2 * nnz * batch / 1e9 / (t_f + t_b) * 1e3
            rows.append(
                f"| {n}x{n}, {100 * density:g}% | {t_pack:.2f} | {t_f:.2f} | {t_b:.2f} | "
                f"{t_t:.2f} / {t_s:.2f} | {rate:.0f} | {dense_ms:.2f} | {dense_rate:.0f} |"
            )
    rows += [
        "",
        "A training step of a layer with no non-zeros at all (`SparseLinear` at 0%), next to the "
        "dense layer's step: the floor that no kernel speed lowers.",
        "",
        "| layer, batch 256 | sparse step at 0% (ms): all threads / one | dense step (ms) "
        "| best possible speedup |",
        "|---|---:|---:|---:|",
    ]
    for n in (4096, 1024):
        floor, floor_one, dense = empty_step_ms(n, batch)
        rows.append(
            f"| {n}x{n} | {floor:.2f} / {floor_one:.2f} | {dense:.2f} "
            f"| {dense / min(floor, floor_one):.1f}x |"
        )
    return rows


def layout_rows() -> list[str]:
    """Writing a (256, n) output (the forward product of a layer with no non-zeros) and packing
    a (256, n) input, per MiB, for widths that are and are not a multiple of 1024 floats (rows
    4 KiB apart: their cache lines share L1 sets), on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = [
        "| width n | write a (256, n) output: ms per MiB | pack a (256, n) input: ms per MiB |",
        "|---:|---:|---:|",
    ]
    try:
        for n in (1000, 1024, 4000, 4096):
            x = torch.randn(256, n)
            w = SparseWeight(torch.randn(n, n), torch.zeros(n, n, dtype=torch.bool))
            k = kernels_for(x)
            xp, val = kops.pack(x, k), w.values.detach()
            mib = 256 * n * 4 / 2**20
            out_ms = median_ms(
                lambda: kops.spmm(w.crow, w.col, val, xp, n, 256, None, None, k),  # noqa: B023
                201,
            )
            pack_ms = median_ms(lambda: kops.pack(x, k), 201)  # noqa: B023
            rows.append(f"| {n} | {out_ms / mib:.4f} | {pack_ms / mib:.4f} |")
    finally:
        torch.set_num_threads(threads)
    return rows


def conv_algorithms() -> list[str]:
    """A 3x3 convolution's training step (forward and both gradients) and inference, batch 64
    (batch panels), computed on planes and as a product over patches, by output size: where
    PANEL_UNFOLD_MAX_POSITIONS comes from."""
    from sparselearn.accel.layers import PANEL_UNFOLD_MAX_POSITIONS, UNFOLD_MAX_POSITIONS

    rows = [
        f'`SparseConv2d(algorithm="auto")` takes patches up to {PANEL_UNFOLD_MAX_POSITIONS} '
        f"output positions on batch panels (batches of 16 and more), up to "
        f"{UNFOLD_MAX_POSITIONS} otherwise.",
        "",
        "| 3x3 convolution, batch 64 | density | dense ms | planes ms | patches ms "
        "| inference: dense / planes / patches ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c_in, c_out, hw, density in [(512, 512, 2, 0.033), (512, 512, 3, 0.033),
                                     (512, 512, 4, 0.033), (256, 512, 4, 0.05),
                                     (256, 256, 8, 0.066)]:  # fmt: skip
        torch.manual_seed(0)
        conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        mask = torch.rand(conv.weight.shape) < density
        x = torch.randn(64, c_in, hw, hw, requires_grad=True)
        layers = [conv] + [SparseConv2d(conv, mask, algorithm=a) for a in ("planes", "unfold")]

        d, p, u = (median_ms(train_step(m, x)) for m in layers)
        with torch.no_grad():
            di, pi, ui = (median_ms(inference(m, x)) for m in layers)
        rows.append(
            f"| {c_in} -> {c_out} ch, {hw}x{hw} output | {100 * density:g}% | {d:.1f} | {p:.1f} "
            f"| {u:.1f} | {di:.1f} / {pi:.1f} / {ui:.1f} |"
        )
    return rows


def step_rest() -> list[str]:
    """PyTorch's dropout, max pooling and BatchNorm + ReLU against sparselearn's compiled ones,
    forward and backward, on the shapes where the paper's models call them (batch 64, CIFAR
    shape)."""
    import torch.nn.functional as F
    from torch import nn

    from sparselearn.accel import BatchNorm2d, dropout, max_pool2d

    def norms(channels: int) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
        theirs, ours = nn.BatchNorm2d(channels), BatchNorm2d(channels, relu=True)
        return (lambda t: F.relu(theirs(t), inplace=True)), ours

    def step(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], None]:
        x = x.detach().requires_grad_()
        grad = torch.randn(fn(x).shape, generator=torch.Generator().manual_seed(1))

        def run() -> None:
            x.grad = None
            fn(x).backward(grad)

        return run

    rows = [
        "| op, input (batch 64) | PyTorch ms | sparselearn ms | faster |",
        "|---|---:|---:|---:|",
    ]
    cases: list[
        tuple[str, tuple[int, ...], Callable[..., torch.Tensor], Callable[..., torch.Tensor]]
    ]
    cases = [
        ("dropout 0.3, WRN-16-8's first stage", (64, 128, 32, 32),
         lambda t: F.dropout(t, 0.3), lambda t: dropout(t, 0.3)),
        ("max pool 2x2, VGG-D's first", (64, 64, 32, 32),
         lambda t: F.max_pool2d(t, 2), lambda t: max_pool2d(t, 2)),
        ("max pool 2x2, LeNet-5's first (batch 100)", (100, 20, 24, 24),
         lambda t: F.max_pool2d(t, 2), lambda t: max_pool2d(t, 2)),
        ("max pool 2x2, VGG-D's third: outputs 4 wide", (64, 256, 8, 8),
         lambda t: F.max_pool2d(t, 2), lambda t: max_pool2d(t, 2)),
        ("BatchNorm + ReLU, VGG-D's first", (64, 64, 32, 32), *norms(64)),
        ("BatchNorm + ReLU, WRN-16-8's first stage", (64, 128, 32, 32), *norms(128)),
        ("BatchNorm + ReLU, VGG-D's 4x4 planes", (64, 512, 4, 4), *norms(512)),
    ]  # fmt: skip
    for name, shape, theirs, ours in cases:
        x = torch.randn(*shape)
        t, o = median_ms(step(theirs, x)), median_ms(step(ours, x))
        rows.append(
            f"| {name}, {tuple(shape)}, forward + backward | {t:.2f} | {o:.2f} | {t / o:.1f}x |"
        )
    return rows


def mlp_inference() -> list[str]:
    x = torch.randn(256, 784)
    rows = ["| op | dense: ms per forward | sparse 5%: ms per forward |", "|---|---:|---:|"]
    tables = {}
    for kind in ("dense", "sparse"):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(784, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
            nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 10),
        )  # fmt: skip
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if kind == "sparse":
            engine = sl.sparsify(model, opt, method="static", density=0.05, init="uniform")
            sl.accelerate(model, engine, mode="sparse")
        model.eval()
        with torch.no_grad():
            for _ in range(3):
                model(x)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(10):
                    model(x)
        tables[kind] = {
            e.key: e.self_cpu_time_total / 1e3 / 10 for e in prof.key_averages() if e.count
        }

    def total(k: str) -> float:
        return tables["dense"].get(k, 0) + tables["sparse"].get(k, 0)

    keys = sorted(set(tables["dense"]) | set(tables["sparse"]), key=total, reverse=True)
    for k in keys[:10]:
        rows.append(
            f"| `{k}` | {tables['dense'].get(k, 0):.2f} | {tables['sparse'].get(k, 0):.2f} |"
        )
    return rows


def model_choices() -> list[str]:
    out = []
    for name in ("vgg-d", "wrn-16-8", "resnet18"):
        torch.manual_seed(0)
        model = create_model(name, (3, 32, 32), 10)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        engine = sl.sparsify(model, opt, method="static", density=0.05)
        x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
        report = sl.accelerate(model, engine, x, repeats=3)
        settle(model, full_step(model, opt, x, y))
        out += [f"`{name}` (batch 64, 5% ERK): per layer, forward + backward timed on its input; "
                "for the layers made sparse, the forward without gradients too (inference), "
                "and the check of the choice over the first steps of training (in the run)",
                "", "```", str(report), "```", ""]  # fmt: skip
    return out


# What each op of a training step is, for the split of a model's step: an op inside the
# optimizer's step or zero_grad is the optimizer's; otherwise the outermost op around it (or the
# op itself) whose name holds a category's fragment (lower case) names it. Sparse layers are
# sparselearn's kernels (the convolutions that run as a product over patches show their backward
# as the sparse Linear function's); dense layers are those sl.accelerate left to PyTorch.
STEP_PARTS = (
    ("sparse layers", ("_sparseconv2dfn", "_patchesfn", "_sparselinearfn", "sparselearn::")),
    ("dense layers", ("conv", "addmm", "aten::mm", "linear")),
    ("BatchNorm", ("batch_norm", "_batchnormfn")),
    ("activations", ("relu", "threshold")),
    ("additions", ("aten::add",)),
    ("dropout", ("dropout", "bernoulli")),
    ("pooling", ("pool",)),
)  # fmt: skip
OPTIMIZER_SCOPES = ("optimizer.step", "optimizer.zero_grad")


def step_part(event: Any) -> str:
    part = "other"
    while event is not None:
        name = event.name.lower()
        if name.startswith(OPTIMIZER_SCOPES):
            return "optimizer"
        part = next((p for p, keys in STEP_PARTS if any(k in name for k in keys)), part)
        event = event.cpu_parent
    return part


def cifar_model(
    name: str, sparse: bool, x: torch.Tensor
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A CIFAR model (seed 0) and its SGD optimizer; with ``sparse``, at 5% ERK (static masks:
    the training step of every method between mask updates), accelerated on ``x``."""
    torch.manual_seed(0)
    model = create_model(name, (3, 32, 32), 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if sparse:
        engine = sl.sparsify(model, opt, method="static", density=0.05)
        sl.accelerate(model, engine, x, repeats=3)
        settle(model, full_step(model, opt, x, torch.randint(0, 10, (x.shape[0],))))
    return model, opt


def model_step_split() -> list[str]:
    """A full training step (forward, loss, backward, optimizer) of each CIFAR model at 5%
    ERK, dense and accelerated, split by op: where the accelerated step's time goes."""
    parts = [p for p, _ in STEP_PARTS] + ["optimizer", "other"]
    rows = [
        "| model (batch 64) | | " + " | ".join(parts) + " | total ms per step |",
        "|---|---|" + "---:|" * (len(parts) + 1),
    ]
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    for name in ("vgg-d", "wrn-16-8", "resnet18"):
        for kind in ("dense", "sparse 5%"):
            model, opt = cifar_model(name, kind != "dense", x)
            step = full_step(model, opt, x, y)
            for _ in range(3):
                step()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    step()
            ms = dict.fromkeys(parts, 0.0)
            for e in prof.events():
                ms[step_part(e)] += e.self_cpu_time_total / 1e3 / 5
            total = sum(ms.values())
            cells = " | ".join(f"{ms[p]:.1f} ({100 * ms[p] / total:.0f}%)" for p in parts)
            rows.append(f"| {name} | {kind} | {cells} | {total:.0f} |")
    return rows


def density_bound() -> list[str]:
    """Per CIFAR model at 5% ERK: the share of its dense training FLOPs (forward and both
    gradients of every sparsified layer, ``sl.flops``) in layers at or above each density of
    BOUND_THRESHOLDS, and the FLOP speedup of the whole model if exactly those layers stay
    dense and the rest cost their sparse FLOPs. Counts, not timings: the same on every machine."""
    heads = [f"layers ≥ {t:.0%}: FLOP share, speedup left" for t in BOUND_THRESHOLDS]
    rows = [
        "| model (5% ERK) | FLOP speedup, every layer sparse | " + " | ".join(heads) + " |",
        "|---|---:|" + "---:|" * len(heads),
    ]
    for name in BOUND_MODELS:
        torch.manual_seed(0)
        model = create_model(name, (3, 32, 32), 10)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        engine = sl.sparsify(model, opt, method="static", density=0.05)
        report = sl.flops(model, engine, (3, 32, 32))
        engine.remove()
        total = sum(layer.train_dense for layer in report.layers)
        cells = []
        for t in BOUND_THRESHOLDS:
            kept = sum(layer.train_dense for layer in report.layers if layer.density >= t)
            left = sum(layer.train_sparse for layer in report.layers if layer.density < t)
            cells.append(f"{kept / total:.1%}, {total / (kept + left):.2f}x")
        rows.append(f"| {name} | {report.train_speedup:.2f}x | " + " | ".join(cells) + " |")
    return rows


def conv_floors(repeats: int = 15) -> list[str]:
    """Each convolution shape of speed.py's table, training step and inference: dense, sparse
    at its target density and sparse with no non-zeros at all, in turns. The layer at 0% costs
    only what does not shrink with the density (packing the input into panels or phase planes,
    writing the output, in the backward packing the output gradient and writing the input
    gradient, autograd): the floor under every density, and the best speedup left."""

    rows = [
        "| convolution (batch 64) | density | training step ms: dense / sparse / sparse at 0% "
        "| floor's share of the sparse step | best possible | inference ms: dense / sparse "
        "/ sparse at 0% | floor's share of the sparse forward | best possible |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c, hw, k, stride, density, _ in CONV_CASES:
        conv, sparse, x = conv_case(c, hw, k, stride, density)
        empty = SparseConv2d(conv, torch.zeros(conv.weight.shape, dtype=torch.bool))
        layers = (conv, sparse, empty)
        d, s, z = paired_ms([train_step(m, x) for m in layers], repeats)
        with torch.no_grad():
            di, si, zi = paired_ms([inference(m, x) for m in layers], repeats)
        rows.append(
            f"| {k}x{k} stride {stride}, {c} ch, {hw}x{hw} | {density:.0%} "
            f"| {d:.1f} / {s:.1f} / {z:.1f} | {z / s:.0%} | {d / z:.1f}x "
            f"| {di:.1f} / {si:.1f} / {zi:.1f} | {zi / si:.0%} | {di / zi:.1f}x |"
        )
    return rows


# The parts of a model's forward for inference_split, by module class: the sparse layers
# (sparselearn's kernels, including layers that infer with a dense copy of their weight), the
# layers left dense, BatchNorm (with the ReLU it applies), pooling, and every other leaf module;
# what no leaf module runs (ResNet's residual additions, reshapes, Python) is "outside modules".
INFERENCE_PARTS = (
    ("sparse layers", ("SparseConv2d", "SparseLinear", "SparseConv1D")),
    ("dense layers", ("Conv2d", "Linear", "Conv1D")),
    ("BatchNorm", ("BatchNorm2d", "BatchNorm1d")),
    ("pooling", ("MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d")),
)


def inference_part(module: nn.Module) -> str:
    if getattr(module, "inference", None) == "dense":
        return "dense layers"  # a sparse layer that infers with a dense copy of its weight
    name = type(module).__name__
    return next((p for p, names in INFERENCE_PARTS if name in names), "other modules")


class LeafTimes:
    """Forward hooks that add each leaf module's wall time (a sparse layer counts as a leaf) to
    its part of INFERENCE_PARTS while ``on``."""

    def __init__(self, model: nn.Module) -> None:
        self.on = False
        self.ms: dict[str, float] = {}
        for module in self._leaves(model):
            self._hook(module, inference_part(module))

    def _hook(self, module: nn.Module, part: str) -> None:
        start: list[float] = []
        module.register_forward_pre_hook(lambda *_: start.append(time.perf_counter()))
        module.register_forward_hook(lambda *_: self._add(part, start.pop()))

    def _leaves(self, m: nn.Module) -> list[nn.Module]:
        if inference_part(m).endswith("layers") or not list(m.children()):
            return [m]
        return [leaf for child in m.children() for leaf in self._leaves(child)]

    def _add(self, part: str, start: float) -> None:
        if self.on:
            self.ms[part] = self.ms.get(part, 0.0) + 1e3 * (time.perf_counter() - start)


def without_nonzeros(model: nn.Module) -> nn.Module:
    """A copy of an accelerated model whose sparse layers (those that infer sparse) have no
    non-zeros left: its sparse layers cost only their passes around the products."""
    empty = copy.deepcopy(model)
    for module in empty.modules():
        if inference_part(module) == "sparse layers":
            weight = module.weight_sparse
            assert isinstance(weight, SparseWeight)
            weight.restructure(torch.zeros(weight.shape, dtype=torch.bool))
    return empty


def inference_split(repeats: int = 15) -> list[str]:
    """The forward without gradients (eval mode, after a few training steps) of each CIFAR
    model at 5% ERK, dense, accelerated, and accelerated with no non-zeros left in its sparse
    layers, split by module (forward hooks, wall time, means over the timed forwards; the
    models in turns): where the accelerated model's inference time goes, and how fast it would
    infer if its sparse layers' passes around the products cost nothing."""
    names = [p for p, _ in INFERENCE_PARTS] + ["other modules", "outside modules"]
    rows = [
        "| model (batch 64) | | " + " | ".join(names) + " | total ms per forward |",
        "|---|---|" + "---:|" * (len(names) + 1),
    ]
    bounds = [
        "| model | inference speedup | if the sparse layers' passes around the products cost "
        "nothing |",
        "|---|---:|---:|",
    ]
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    rounds = 3
    for name in ("vgg-d", "wrn-16-8", "resnet18"):
        models = []
        for sparse in (False, True):
            model, opt = cifar_model(name, sparse, x)
            step = full_step(model, opt, x, y)
            for _ in range(4):  # as speed.py's models infer: after training steps
                step()
            models.append(model.eval())
        models.append(without_nonzeros(models[1]))
        kinds = ("dense", "sparse 5%", "sparse, no non-zeros")
        built = [(model, LeafTimes(model), [0.0]) for model in models]
        with torch.no_grad():
            for _ in range(rounds):
                for model, times, total in built:
                    for _ in range(2):  # untimed
                        model(x)
                    times.on = True
                    for _ in range(repeats // rounds):
                        t = time.perf_counter()
                        model(x)
                        total[0] += 1e3 * (time.perf_counter() - t)
                    times.on = False
        n = rounds * (repeats // rounds)
        wholes, sparse_ms = [], []
        for kind, (_, times, total) in zip(kinds, built, strict=True):
            ms = {p: times.ms.get(p, 0.0) / n for p in names}
            whole = total[0] / n
            ms["outside modules"] = max(0.0, whole - sum(ms.values()))
            cells = " | ".join(f"{ms[p]:.1f} ({100 * ms[p] / whole:.0f}%)" for p in names)
            rows.append(f"| {name} | {kind} | {cells} | {whole:.0f} |")
            wholes.append(whole)
            sparse_ms.append(ms["sparse layers"])
        dense, accelerated, _ = wholes
        bounds.append(
            f"| {name} | {dense / accelerated:.2f}x | {dense / (accelerated - sparse_ms[2]):.2f}x |"
        )
    return [*rows, "", *bounds]


def masking_ms(engine: Any, n: int) -> tuple[float, float]:
    """Zeroing the inactive entries of one n x n gradient, and a dense layer's step."""
    layer = engine.layers[0]
    grad = torch.randn(n, n)
    x = torch.randn(256, n, requires_grad=True)
    lin = nn.Linear(n, n)
    return (
        median_ms(lambda: layer.zero_inactive_(grad)),
        median_ms(lambda: lin(x).sum().backward()),
    )


def gradient_masking() -> list[str]:
    from sparselearn.engine import SparseEngine

    rows = []
    for n in (4096, 1024):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(n, n))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        engine: SparseEngine = sl.sparsify(model, opt, method="static", density=0.5)
        t, s = masking_ms(engine, n)
        rows.append(f"- {n}x{n} at 50%: zeroing the inactive gradient entries takes {t:.2f} ms, "
                    f"{100 * t / s:.0f}% of the dense layer's {s:.2f} ms step")  # fmt: skip
        engine.remove()
    return rows


def rigl_update() -> list[str]:
    """Training steps that each end in a RigL mask update, MLP at 5%, op by op."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
        nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 10),
    )  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    # RigL needs the dense gradient, which the engine captures only on scheduled update steps:
    # update on every step, so that each profiled step is an update step
    engine = sl.sparsify(
        model, opt, method="rigl", density=0.05, total_steps=10_000, update_every=1, stop_at=1.0
    )
    x, y = torch.randn(256, 784), torch.randint(0, 10, (256,))

    def update() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    update()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            update()
    events = sorted(
        (e for e in prof.key_averages() if e.count), key=lambda e: -e.self_cpu_time_total
    )
    total = sum(e.self_cpu_time_total for e in events) / 3e3
    update_ms = 1e3 * statistics.median(u.seconds for u in engine.history[-3:])
    rows = [
        f"Total {total:.0f} ms per step with an update (forward, backward and optimizer step "
        f"included); the engine's own timer: {update_ms:.0f} ms for the update itself. Random "
        "inputs: unlike real data, no gradient is exactly zero.",
        "",
        "| op | calls per update | self ms per update |",
        "|---|---:|---:|",
    ]
    for e in events[:12]:
        rows.append(f"| `{e.key}` | {e.count / 3:.0f} | {e.self_cpu_time_total / 3e3:.1f} |")
    return rows


def write_section(lines: list[str], out: Path | None, start: str, end: str) -> None:
    """Print a section, and write it between its markers in ``out`` where given."""
    print("\n".join(lines), flush=True)
    if out:
        replace_section(out, start, end, "\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    p.add_argument(
        "--density-bound",
        action="store_true",
        help="only the FLOP bound of ERK's densest layers (counts, no timing, seconds)",
    )
    p.add_argument(
        "--inference-bound",
        action="store_true",
        help="only what bounds inference: the convolutions' floors, the models' forward split "
        "by module (minutes)",
    )
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    bound = [
        "Command: `python benchmarks/op_profile.py --density-bound --out docs/performance.md` "
        "(also run by `make bench`); FLOP counts of `sl.flops`, no timing.",
        "",
        *density_bound(),
    ]
    write_section(bound, args.out, BOUND_START, BOUND_END)
    if args.density_bound:
        return
    setting = (
        f"{cpu_name()}, {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, float32"
    )
    inference_parts = [
        "Command: `python benchmarks/op_profile.py --inference-bound --out docs/performance.md` "
        f"(also run by `make bench`); {setting}.",
        "",
        "**A convolution with no non-zeros: the floor under every density (median of 15, dense "
        "and sparse in turns).**",
        "",
        *conv_floors(),
        "",
        "**Inference of each CIFAR model, dense, accelerated and accelerated with no non-zeros "
        "left, split by module (forward hooks, wall time, mean of 15 forwards).**",
        "",
        *inference_split(),
    ]
    write_section(inference_parts, args.out, INFERENCE_START, INFERENCE_END)
    if args.inference_bound:
        return
    head = (
        f"Command: `make bench` (`python benchmarks/op_profile.py --out docs/performance.md`); "
        f"{setting}, batch 256 for the Linear rows."
    )
    parts = [head, ""]
    for title, fn in [
        ("Linear kernels, each timed alone (median of 9)", linear_kernels),
        ("Output and packing by width, one thread (median of 201)", layout_rows),
        ("Convolutions on small outputs: planes or patches (median of 9)", conv_algorithms),
        ("MLP 784-4096x3-10 inference, self CPU time per op (torch profiler)", mlp_inference),
        ("Per-layer choices of `sl.accelerate`", model_choices),
        (
            "A training step of each CIFAR model, split by op (self CPU time, torch profiler)",
            model_step_split,
        ),
        (
            "The rest of a step: PyTorch's dropout, max pooling and BatchNorm, and sparselearn's",
            step_rest,
        ),
        ("Keeping the gradient masked on a dense layer", gradient_masking),
        ("One RigL mask update on the MLP at 5% (torch profiler)", rigl_update),
    ]:
        lines = fn()
        print(f"\n{title}\n" + "\n".join(lines), flush=True)
        parts += [f"**{title}.**", "", *lines, ""]
    if args.out:
        replace_section(args.out, START, END, "\n".join(parts))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
