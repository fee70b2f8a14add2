"""sparselearn's Linear layer against its peers, side by side in one process: PyTorch's own CSR
product (MKL, through sparselearn's PyTorch backend), SparseProp and SparseLab, each given the
same masked weights and checked against a float64 masked reference before it is timed.

Usage: ``make bench-peers``, which installs the peers into an environment of their own
(``.venv-peers``, never the project's) and runs this script for every instruction set the CPU
can run (``SPARSELEARN_MARCH=x86-64-v3`` too on an AVX-512 machine).

A training step is the layer's forward, its backward from a given output gradient (input
gradient and weight gradient at the active positions) and a plain SGD step; inference is a
forward without gradients. Every speedup is over the dense ``nn.Linear`` with the same masked
weights, taken per round (all contenders in turns within a round, after untimed runs) and
reported as the median of the rounds' ratios with their range.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

if os.environ.get("OMP_WAIT_POLICY") != "PASSIVE":  # see speed.py
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for the sibling benchmark script
from benchmarks.autocast import rounds_ms
from benchmarks.speed import markers

from sparselearn.accel import SparseLinear
from sparselearn.experiments.report import replace_section
from sparselearn.kernels import extension
from sparselearn.kernels.build import march
from sparselearn.kernels.machine import cpu_isa, cpu_name

LR = 0.01


@dataclass(frozen=True)
class Case:
    label: str
    n_in: int
    n_out: int
    batch: int
    density: float
    work: str  # "training step" or "inference"


CASES = [
    Case("4096² b256", 4096, 4096, 256, 0.05, "training step"),
    Case("4096² b256", 4096, 4096, 256, 0.01, "training step"),
    Case("3072² b200", 3072, 3072, 200, 0.05, "training step"),
    Case("1024² b128", 1024, 1024, 128, 0.10, "training step"),
    Case("FFN 640→2560, 1024 tokens", 640, 2560, 1024, 0.10, "training step"),
    Case("4096² b256", 4096, 4096, 256, 0.05, "inference"),
    Case("3072² b200", 3072, 3072, 200, 0.05, "inference"),
]


@dataclass
class Contender:
    """A layer built from the masked dense one, and how to read its weight back (dense)."""

    name: str
    build: Callable[[nn.Linear, torch.Tensor], nn.Module]
    weight: Callable[[nn.Module], torch.Tensor]


def _sparseprop(dense: nn.Linear, mask: torch.Tensor) -> nn.Module:
    from sparseprop.modules import SparseLinear as SparsePropLinear

    bias = nn.Parameter(dense.bias.detach().clone())
    return SparsePropLinear(dense.weight.detach().clone(), bias)


def _sparseprop_weight(m: nn.Module) -> torch.Tensor:
    return m.to_dense().weight.detach()


def _sparselab(dense: nn.Linear, mask: torch.Tensor) -> nn.Module:
    """SparseLab's layer draws its own mask: its storage is replaced by one of these weights
    (as its constructor builds it: a padded CSR and its values aliased as the parameter)."""
    import numpy as np
    import sparselab
    from sparselab import layout

    layer = sparselab.SparseLinear(dense.in_features, dense.out_features, bias=True)
    csr = layout.from_dense(dense.weight.detach().clone(), padding_ratio=layer.padding_ratio)
    layer._csr = csr
    layer._values = nn.Parameter(torch.from_numpy(np.asarray(csr.values)))
    with torch.no_grad():
        layer.bias.copy_(dense.bias)
    return layer


def _sparselab_weight(m: nn.Module) -> torch.Tensor:
    return m._csr.to_dense().detach()


def contenders() -> list[Contender]:
    ours = Contender(
        "sparselearn",
        lambda d, m: SparseLinear(copy.deepcopy(d), m),
        lambda m: m.weight_sparse.dense(),
    )
    torch_csr = Contender(
        "PyTorch CSR (MKL)",
        lambda d, m: SparseLinear(copy.deepcopy(d), m, backend="torch"),
        lambda m: m.weight_sparse.dense(),
    )
    return [
        ours,
        torch_csr,
        Contender("SparseProp", _sparseprop, _sparseprop_weight),
        Contender("SparseLab", _sparselab, _sparselab_weight),
    ]


def masked_linear(case: Case) -> tuple[nn.Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    dense = nn.Linear(case.n_in, case.n_out)
    mask = torch.rand(dense.weight.shape, generator=g) < case.density
    with torch.no_grad():
        dense.weight.normal_(0, case.n_in**-0.5, generator=g)
        dense.weight.mul_(mask)
        dense.bias.normal_(0, 0.1, generator=g)
    return dense, mask


def check(c: Contender, dense: nn.Linear, mask: torch.Tensor, batch: int) -> str | None:
    """Why ``c`` disagrees with the float64 masked reference (output, input gradient, the SGD
    update, a second forward), or None."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, dense.in_features, generator=g)
    gy = torch.randn(batch, dense.out_features, generator=g)
    w, b = dense.weight.detach().double(), dense.bias.detach().double()
    want_y = x.double() @ w.t() + b
    want_gx = gy.double() @ w
    want_w = w - LR * (gy.double().t() @ x.double()) * mask
    want_y2 = x.double() @ want_w.t() + (b - LR * gy.double().sum(0))
    layer = c.build(dense, mask)
    opt = torch.optim.SGD(layer.parameters(), lr=LR)
    xr = x.clone().requires_grad_()
    y = layer(xr)
    y.backward(gy)
    opt.step()
    with torch.no_grad():
        y2 = layer(x)
    checks = [
        ("output", y, want_y),
        ("input gradient", xr.grad, want_gx),
        ("updated weight", c.weight(layer), want_w),
        ("second forward", y2, want_y2),
    ]
    for what, got, want in checks:
        assert got is not None
        err = float((got.double() - want).abs().max())
        scale = float(want.abs().max()) + 1e-12
        if err > 1e-4 * scale + 1e-5:
            return f"{what} off by {err:.3g} (scale {scale:.3g})"
    return None


def runner(layer: nn.Module, case: Case) -> Callable[[], None]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(case.batch, case.n_in, generator=g)
    if case.work == "inference":

        def infer() -> None:
            with torch.no_grad():
                layer(x)

        return infer
    gy = torch.randn(case.batch, case.n_out, generator=g)
    xr = x.requires_grad_()
    opt = torch.optim.SGD(layer.parameters(), lr=1e-9)  # the step's work, the weights kept

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        xr.grad = None
        layer(xr).backward(gy)
        opt.step()

    return step


def bench(repeats: int, rounds: int) -> list[str]:
    names = [c.name for c in contenders()]
    rows = [
        "| shape (density) | work | dense ms | " + " | ".join(names) + " |",
        "|---|---|---:|" + "---:|" * len(names),
    ]
    for case in CASES:
        dense, mask = masked_linear(case)
        fns, cells = [runner(copy.deepcopy(dense), case)], []
        for c in contenders():
            why = check(c, dense, mask, min(case.batch, 64))
            if why is None:
                fns.append(runner(c.build(dense, mask), case))
            cells.append(why)
        times = rounds_ms(fns, repeats, rounds)
        dense_ms, timed = times[0], iter(times[1:])
        shown = []
        for why in cells:
            if why is not None:
                shown.append(f"wrong: {why}")
                continue
            ratios = [d / s for d, s in zip(dense_ms, next(timed), strict=True)]
            shown.append(f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
        rows.append(
            f"| {case.label} ({case.density:.0%}) | {case.work} "
            f"| {statistics.median(dense_ms):.1f} | " + " | ".join(shown) + " |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="markdown file to write the section into")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per round")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    if extension() is None:
        raise SystemExit("the compiled kernels are unavailable: nothing to compare")
    env = (
        f"{cpu_name()} ({cpu_isa()}), {os.cpu_count()} cores; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; "
        f"sparselearn's kernels built with -march={march()}; SparseProp "
        f"{version('sparseprop')}, SparseLab {version('sparselab')} (their own builds)"
    )
    print(env, flush=True)
    rows = bench(args.repeats, args.rounds)
    command = ("" if march() == "native" else f"SPARSELEARN_MARCH={march()} ") + (
        ".venv-peers/bin/python benchmarks/peers.py --out docs/performance.md"
    )
    text = [
        f"Command: `make bench-peers` (`{command}`).",
        "",
        f"Machine: {env}. Speedup over the dense layer with the same masked weights: the "
        f"median of {args.rounds} rounds' ratios (range), each round {args.repeats} timed runs "
        "of every contender in turns after untimed ones. Every contender was first checked "
        "against a float64 masked reference (output, input gradient, the SGD update, a second "
        "forward); one that disagrees is marked instead of timed.",
        "",
        *rows,
    ]
    if args.out:
        replace_section(args.out, *markers("peers"), "\n".join(text))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
