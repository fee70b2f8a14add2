"""What mixed precision costs an accelerated layer: the sparse kernels compute in float32, so
under bfloat16 autocast (and with bfloat16 weights) a layer casts its input (and values) to
float32 and its output back. This times a training step (forward, then both gradients from a
given output gradient) and inference of the same layers in float32 and under autocast, dense
and sparse, in turns in one process.

Usage: ``make bench`` (or ``python benchmarks/autocast.py --out docs/performance.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

if os.environ.get("OMP_WAIT_POLICY") != "PASSIVE":  # see speed.py
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for the sibling benchmark script
from benchmarks.op_profile import median_ms
from benchmarks.speed import machine, masked

from sparselearn.accel import SparseConv2d, SparseLinear
from sparselearn.experiments.report import replace_section

START, END = "<!-- autocast:start -->", "<!-- autocast:end -->"
DENSITY = 0.05


def autocast(on: bool) -> contextlib.AbstractContextManager[object]:
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


def step(module: nn.Module, x: torch.Tensor, amp: bool) -> Callable[[], None]:
    """Forward and backward from a given output gradient, under autocast where ``amp``."""
    x = x.detach().requires_grad_()
    with torch.no_grad(), autocast(amp):
        grad = torch.randn(module(x).shape, generator=torch.Generator().manual_seed(1))

    def run() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        with autocast(amp):
            y = module(x)
        y.backward(grad.to(y.dtype))

    return run


def infer(module: nn.Module, x: torch.Tensor, amp: bool) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad(), autocast(amp):
            module(x)

    return run


def rounds_ms(fns: list[Callable[[], None]], repeats: int, rounds: int) -> list[list[float]]:
    """Each callable's median ms in each round (two untimed runs, then ``repeats`` timed),
    the callables in turns within every round, so that all sides share the machine's load."""
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, per in zip(fns, out, strict=True):
            per.append(median_ms(fn, repeats))
    return out


def show(ms: list[float]) -> str:
    return f"{statistics.median(ms):.2f} ({min(ms):.2f}-{max(ms):.2f})"


def cases() -> list[tuple[str, nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    linear = nn.Linear(4096, 4096)
    conv = nn.Conv2d(128, 128, 3, padding=1)
    return [
        ("Linear 4096x4096, batch 256", linear, torch.randn(256, 4096)),
        ("Conv 3x3 128->128, 16x16, batch 32", conv, torch.randn(32, 128, 16, 16)),
    ]


def bench(repeats: int, rounds: int) -> list[str]:
    rows = [
        "| layer (5%) | work | dense float32 ms | dense autocast ms | sparse float32 ms "
        "| sparse autocast ms | autocast / float32, sparse | sparse, bfloat16 weights ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, dense, x in cases():
        mask = masked(dense, DENSITY)
        make = SparseConv2d if isinstance(dense, nn.Conv2d) else SparseLinear
        # (each on a copy: a sparse layer adopts the dense layer's bias)
        sparse = make(copy.deepcopy(dense), mask)
        half = make(copy.deepcopy(dense), mask).bfloat16()
        for work, fn in (("training step", step), ("inference", infer)):
            fns = [
                fn(dense, x, False),
                fn(dense, x, True),
                fn(sparse, x, False),
                fn(sparse, x, True),
                fn(half, x.bfloat16(), False),
            ]
            d32, d16, s32, s16, s_half = rounds_ms(fns, repeats, rounds)
            ratio = [a / b for a, b in zip(s16, s32, strict=True)]
            rows.append(
                f"| {name} | {work} | {show(d32)} | {show(d16)} | {show(s32)} | {show(s16)} "
                f"| {statistics.median(ratio):.2f}x ({min(ratio):.2f}-{max(ratio):.2f}) "
                f"| {show(s_half)} |"
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="markdown file to write the section into")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per round")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    env = machine()
    print(env, flush=True)
    rows = bench(args.repeats, args.rounds)
    text = [
        "Command: `make bench` (`python benchmarks/autocast.py --out docs/performance.md`).",
        "",
        f"Machine: {env}. Median ms over {args.rounds} rounds of {args.repeats} timed runs "
        "(the range: the rounds' medians); autocast is `torch.autocast('cpu', "
        "dtype=torch.bfloat16)` over float32 weights; the last column runs the layer with "
        "bfloat16 weights on a bfloat16 input.",
        "",
        *rows,
    ]
    if args.out:
        replace_section(args.out, START, END, "\n".join(text))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
