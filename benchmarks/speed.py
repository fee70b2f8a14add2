"""Speed of the accelerated sparse layers against dense PyTorch (``sl.accelerate``).

Usage: ``make bench`` (or ``python benchmarks/speed.py --out docs/performance.md``); with
``SPARSELEARN_MARCH=x86-64-v3`` the kernels are built for AVX2 and the tables go to a section of
their own (``make bench`` runs both where the CPU has AVX-512).

Every number is a median over repeats, measured in one process, dense and sparse side by side,
after warm-up. Rows: single Linear layers (training step = forward + both gradients), an MLP
784-4096-4096-4096-10 (full step with the optimizer, and inference), single convolutions, and
the VGG/WRN models of the experiments, each next to its theoretical FLOP speedup and its
target. Writes its section of the output file between markers and leaves the rest alone.
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

# OpenMP reads its wait policy when it loads: on a machine with few cores, threads that spin while
# waiting take the cores from the ones that work, and small ops slow down many times. Restart
# with the policy set before torch is imported.
if os.environ.get("OMP_WAIT_POLICY") != "PASSIVE":
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch
import torch.nn.functional as F
from torch import nn

import sparselearn as sl
from sparselearn.accel import SparseConv2d, SparseLinear
from sparselearn.experiments.report import replace_section
from sparselearn.kernels import extension
from sparselearn.kernels.build import march
from sparselearn.kernels.machine import cpu_isa, cpu_name
from sparselearn.models import create_model


def markers(name: str = "speed") -> tuple[str, str]:
    """This build's section ``name``: the machine's own (``native``) or another instruction
    set's (``SPARSELEARN_MARCH=x86-64-v3`` on an AVX-512 machine: ``speed-x86-64-v3``)."""
    tag = name if march() == "native" else f"{name}-{march()}"
    return f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"


# The batch of each Linear width, and the training-step targets: (width, density) -> speedup on
# an AVX-512 build, on an AVX2 one (docs/performance.md, "The targets"); at 20% and above a
# layer is never slower than dense (1x); other rows are reported.
LINEAR_BATCH = {4096: 256, 1024: 128}
LINEAR_TARGET = {
    (4096, 0.01): (20.0, 20.0),
    (4096, 0.05): (15.0, 10.0),
    (4096, 0.1): (3.5, 3.5),
    (1024, 0.1): (4.0, 4.0),
}


def avx512_build() -> bool:
    """Whether the kernels of this run use AVX-512 (a native build on an AVX-512 CPU)."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    return march() in ("native", "x86-64-v4") and " avx512f" in flags


def linear_target(n: int, density: float) -> float | None:
    if density >= 0.2:
        return 1.0
    target = LINEAR_TARGET.get((n, density))
    return None if target is None else target[0 if avx512_build() else 1]


def inference(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    return lambda: model(x)


def paired_ms(
    fns: list[Callable[[], object]], repeats: int, rounds: int = 3, settle: int = 3
) -> list[float]:
    """Median ms of each callable over ``repeats`` timed runs, taken in ``rounds`` turns: in
    each turn a callable runs ``settle`` times untimed, then its share of the timed runs.

    Turns put the sides of a speedup under the same load of this shared machine (timed one
    after the other, a change of load between them moved ratios by 10-20%). The untimed runs
    matter as much: right after a dense 4096x4096 step, a 1% sparse step took 9.4 ms, then
    7.9, 6.9, ... and 6.1 ms by the eighth (caches, allocator, clock); a model trains in the
    settled state.
    """
    per_turn = -(-repeats // rounds)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, out in zip(fns, times, strict=True):
            for _ in range(settle):
                fn()
            for _ in range(per_turn):
                t = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t)
    return [1e3 * statistics.median(t) for t in times]


def train_step(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """Forward and backward (input and weight gradients) of one layer, from a given output
    gradient: what the layer does inside a network, where the gradient comes from the layers
    above. (The step used to end in a ``.sum()`` loss, :func:`sum_loss_step`, which is no part
    of the layer: on the 1024² layer at 1% it took a third of the sparse step.)"""
    x = x.detach().requires_grad_()
    with torch.no_grad():
        grad = torch.randn(module(x).shape, generator=torch.Generator().manual_seed(1))

    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(grad)

    return step


def settle(model: nn.Module, step: Callable[[], object], most: int = 200) -> None:
    """Run ``step`` until every accelerated layer of ``model`` has ended the check of its choice
    in the run (``sl.accelerate``'s ``live_rounds``): what is timed after is what a run computes
    once it is under way."""
    for _ in range(most):
        if all(getattr(m, "live", None) is None for m in model.modules()):
            return
        step()
    raise RuntimeError(f"the accelerated layers did not end their check in {most} steps")


def sum_loss_step(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """The layer's step with a ``.sum()`` loss on top (PyTorch's reduction over the output,
    its thread wake-ups, and a constant, stride-0 output gradient)."""
    x = x.detach().requires_grad_()

    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).sum().backward()

    return step


def masked(module: nn.Module, density: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = module.weight
    assert isinstance(w, torch.Tensor)
    mask = torch.rand(w.shape, generator=g) < density
    with torch.no_grad():
        w.mul_(mask)
    return mask


def verdict(speedup: float, target: float | None) -> str:
    if target is None:
        return "(reported)"
    return "met" if speedup >= target else "**missed**"


def bench_linear(repeats: int) -> list[str]:
    rows = [
        "| layer | density | dense ms | sparse ms, all threads | chosen | chosen ms | speedup "
        "| target | | with a `.sum()` loss: dense / chosen ms, speedup |",
        "|---|---:|---:|---:|---|---:|---:|---:|---|---|",
    ]
    for n, batch in LINEAR_BATCH.items():
        x = torch.randn(batch, n)
        for density in (0.01, 0.05, 0.1, 0.2, 0.5):
            torch.manual_seed(0)
            dense = nn.Linear(n, n)
            mask = masked(dense, density)
            sparse = SparseLinear(copy.deepcopy(dense), mask)
            # what sl.accelerate does with this layer: time both on the real input, keep the faster
            model = nn.Sequential(copy.deepcopy(dense))
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            engine = sl.sparsify(model, opt, method="static", density=density, init="uniform")
            report = sl.accelerate(model, engine, x, repeats=repeats)
            settle(model, train_step(model, x))
            choice = report.layers[0]
            chosen = choice.chosen + ("" if choice.threads is None else ", 1 thread")
            chosen += ", dense steps" if choice.steps == "dense" else ""
            d_ms, s_ms, c_ms, ds_ms, cs_ms = paired_ms(
                [
                    train_step(dense, x),
                    train_step(sparse, x),
                    train_step(model, x),
                    sum_loss_step(dense, x),
                    sum_loss_step(model, x),
                ],
                repeats,
            )
            target = linear_target(n, density)
            speedup = d_ms / c_ms
            rows.append(
                f"| Linear {n}x{n}, batch {batch} | {100 * density:g}% | {d_ms:.2f} | {s_ms:.2f} "
                f"| {chosen} | {c_ms:.2f} | {speedup:.2f}x "
                f"| {'-' if target is None else f'{target:g}x'} | {verdict(speedup, target)} "
                f"| {ds_ms:.2f} / {cs_ms:.2f}, {ds_ms / cs_ms:.2f}x |"
            )
            engine.remove()
    return rows


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
        nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 10),
    )  # fmt: skip


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def full_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def bench_mlp(repeats: int) -> list[str]:
    x, y = torch.randn(256, 784), torch.randint(0, 10, (256,))
    built = {}
    for kind in ("dense", "sparse"):
        torch.manual_seed(0)
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        flop_speedup = 1.0
        if kind == "sparse":
            engine = sl.sparsify(model, opt, method="static", density=0.05, init="uniform")
            sl.accelerate(model, engine, x, repeats=repeats)
            settle(model, full_step(model, opt, x, y))
            flop_speedup = sl.flops(model, engine, (784,)).paper_speedup
        built[kind] = (model, opt, flop_speedup)
    models = [built[k][0] for k in ("dense", "sparse")]
    train = paired_ms([full_step(m, o, x, y) for m, o, _ in built.values()], repeats)
    for m in models:
        m.eval()
    with torch.no_grad():
        infer = paired_ms([inference(m, x) for m in models], repeats)
    results = {
        kind: (train[i], infer[i], state_bytes(built[kind][0], built[kind][1]), built[kind][2])
        for i, kind in enumerate(("dense", "sparse"))
    }
    (dt, di, dm, _), (st, si, sm, fs) = results["dense"], results["sparse"]
    return [
        "| MLP 784-4096x3-10, batch 256 | dense | sparse 5% | speedup | theoretical | target | |",
        "|---|---:|---:|---:|---:|---:|---|",
        f"| training step (SGD momentum) | {dt:.1f} ms | {st:.1f} ms | {dt / st:.2f}x | {fs:.1f}x "
        f"| 4x | {verdict(dt / st, 4.0)} |",
        f"| inference | {di:.1f} ms | {si:.1f} ms | {di / si:.2f}x | {fs:.1f}x "
        f"| 6x | {verdict(di / si, 6.0)} |",
        f"| weights + optimizer state, counted (tensor bytes) | {dm / 2**20:.1f} MiB "
        f"| {sm / 2**20:.1f} MiB "
        f"| {dm / sm:.1f}x smaller | | | |",
    ]


# (channels, size, kernel, stride, density, target training speedup): the targets of
# docs/performance.md, on both instruction sets (inference is reported, its targets withdrawn:
# the passes around the products bound it, docs/performance.md says how far)
CONV_CASES = [
    (128, 16, 3, 1, 0.05, 4.0), (128, 32, 3, 1, 0.05, 4.0), (256, 16, 3, 1, 0.05, 4.0),
    (256, 32, 3, 1, 0.05, 4.0), (128, 16, 3, 1, 0.02, 7.0), (128, 32, 3, 1, 0.02, 7.0),
    (256, 16, 3, 1, 0.02, 7.0), (256, 32, 3, 1, 0.02, 7.0), (256, 16, 1, 1, 0.05, 4.0),
    (128, 32, 3, 2, 0.05, 2.5), (256, 16, 3, 2, 0.05, 2.5),
]  # fmt: skip


def conv_case(
    c: int, hw: int, k: int, stride: int, density: float
) -> tuple[nn.Conv2d, SparseConv2d, torch.Tensor]:
    """A row of CONV_CASES: the dense convolution (masked), its sparse twin, a batch of 64."""
    torch.manual_seed(0)
    conv = nn.Conv2d(c, c, k, stride=stride, padding=k // 2)
    sparse = SparseConv2d(conv, masked(conv, density))
    return conv, sparse, torch.randn(64, c, hw, hw)


def bench_conv(repeats: int) -> list[str]:
    rows = [
        "| convolution (batch 64) | density | dense ms | sparse ms | speedup "
        "| inference dense/sparse ms | inference speedup | training target | |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c, hw, k, stride, density, target in CONV_CASES:
        conv, sparse, x = conv_case(c, hw, k, stride, density)
        reps = max(3, repeats // 2) if hw == 32 and c == 256 else repeats
        d_ms, s_ms = paired_ms([train_step(conv, x), train_step(sparse, x)], reps)
        with torch.no_grad():
            di, si = paired_ms([inference(conv, x), inference(sparse, x)], reps)
        rows.append(
            f"| {k}x{k} stride {stride}, {c} ch, {hw}x{hw} | {density:.0%} | {d_ms:.1f} "
            f"| {s_ms:.1f} | {d_ms / s_ms:.2f}x | {di:.1f} / {si:.1f} | {di / si:.2f}x "
            f"| {target:g}x | {verdict(d_ms / s_ms, target)} |"
        )
    return rows


def bench_models(repeats: int) -> list[str]:
    rows = [
        "| model (CIFAR-10 shape, batch 64, 5%) | train dense / accelerated ms | train speedup "
        "| FLOP speedup (as computed / paper) | inference dense / accelerated ms "
        "| inference speedup | FLOP speedup | layers sparse | training target | |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    reps = max(3, repeats // 2)
    for name, target in (("vgg-d", 2.5), ("wrn-16-8", 2.5), ("resnet18", 2.0)):
        x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
        built = []
        extra = ("", "", "")
        for kind in ("dense", "sparse"):
            torch.manual_seed(0)
            model = create_model(name, (3, 32, 32), 10)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            if kind == "sparse":
                # static masks: the training step of every method between mask updates
                engine = sl.sparsify(model, opt, method="static", density=0.05)
                report = sl.accelerate(model, engine, x, repeats=3)
                settle(model, full_step(model, opt, x, y))
                f = sl.flops(model, engine, (3, 32, 32))
                extra = (
                    f"{f.train_speedup:.1f}x / {f.paper_speedup:.1f}x",
                    f"{f.inference_speedup:.1f}x",
                    f"{len(report.accelerated)}/{len(report.layers)}",
                )
            built.append((model, opt))
        dt, st = paired_ms([full_step(m, o, x, y) for m, o in built], reps, rounds=2, settle=1)
        for model, _ in built:
            model.eval()
        with torch.no_grad():
            di, si = paired_ms([inference(m, x) for m, _ in built], reps, rounds=2, settle=1)
        fl_train, fl_inf, n_sparse = extra
        rows.append(
            f"| {name} | {dt:.0f} / {st:.0f} | {dt / st:.2f}x | {fl_train} | {di:.0f} / {si:.0f} "
            f"| {di / si:.2f}x | {fl_inf} | {n_sparse} | {target:g}x "
            f"| {verdict(dt / st, target)} |"
        )
        del built
    return rows


def machine() -> str:
    """Set the threads from ``OMP_NUM_THREADS`` and say what the timings ran on: the CPU, its
    instruction sets, the threads and wait policy, and the sparse kernels' build."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    kernels = (
        f"compiled C++/OpenMP kernels (-march={march()})"
        if extension() is not None
        else "PyTorch fallback"
    )
    return (
        f"{cpu_name()} ({cpu_isa()}), {os.cpu_count()} cores; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; "
        f"sparse kernels: {kernels}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="markdown file to write the section into")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument(
        "--only", nargs="+", choices=["linear", "mlp", "conv", "models"],
        default=["linear", "mlp", "conv", "models"],
    )  # fmt: skip
    args = p.parse_args()
    env = (
        f"{machine()}; float32; median of {args.repeats} repeats "
        "(fewer for the largest shapes) after warm-up"
    )
    print(env, flush=True)
    sections = {
        "linear": ("Linear layers: training step (forward, then the input and weight gradients "
                   "from a given output gradient); *chosen* is what `sl.accelerate` "
                   "keeps after timing dense, sparse on all threads and sparse on one, and "
                   "checking that choice over the first steps",
                   bench_linear),
        "mlp": ("Whole model, full training step (forward, backward, SGD step) and inference",
                bench_mlp),
        "conv": ("Convolutions: training step (forward, then both gradients from a given output "
                 "gradient) and inference, sparse "
                 "kernels forced (`sl.accelerate` keeps the dense layer where slower)", bench_conv),
        "models": ("Experiment models at 5% (ERK), full training step and inference, "
                   "`sl.accelerate` choosing per layer", bench_models),
    }  # fmt: skip
    parts = [
        "Command: `make bench` (`"
        + ("" if march() == "native" else f"SPARSELEARN_MARCH={march()} ")
        + "python benchmarks/speed.py --out docs/performance.md`).",
        "",
        f"Machine: {env}.",
    ]
    for key in args.only:
        title, fn = sections[key]
        t0 = time.time()
        rows = fn(args.repeats)
        print(f"\n{title} ({time.time() - t0:.0f} s)\n" + "\n".join(rows), flush=True)
        parts += ["", f"**{title}.**", "", *rows]
    if args.out:
        replace_section(args.out, *markers(), "\n".join(parts))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
