"""Accelerated models under ``torch.compile``: the full training step (forward, loss, backward,
SGD step) of each model at 5% ERK, accelerated and run eagerly against the same model compiled
(``fullgraph=True``, inductor), in turns in one process; then where the time of each goes, from
the profiler: the sparse operators, and everything around them (what compilation fuses:
BatchNorm, activations, additions, the loss).

Usage: ``make bench`` (or ``python benchmarks/compiled.py --out docs/performance.md``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

if os.environ.get("OMP_WAIT_POLICY") != "PASSIVE":  # see speed.py
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for the sibling benchmark script
from benchmarks.speed import machine, paired_ms

import sparselearn as sl
from sparselearn.experiments.report import replace_section
from sparselearn.models import create_model

START, END = "<!-- compiled:start -->", "<!-- compiled:end -->"
MODELS = ("resnet18", "vgg-d", "tiny-gpt")


def batch(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    if name == "tiny-gpt":  # 16 sequences of 128 tokens, a vocabulary of 256
        idx = torch.randint(0, 256, (16, 128), generator=gen)
        return idx, torch.randint(0, 256, (16, 128), generator=gen)
    return torch.randn(64, 3, 32, 32, generator=gen), torch.randint(0, 10, (64,), generator=gen)


def accelerated(name: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model at 5% ERK (static masks: every method's step between mask updates), every
    supported layer on the sparse kernels (the same layers in both runs)."""
    torch.manual_seed(0)
    if name == "tiny-gpt":
        model = create_model(name, (128,), 256)
    else:
        model = create_model(name, (3, 32, 32), 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    engine = sl.sparsify(model, opt, method="static", density=0.05)
    sl.accelerate(model, engine, mode="sparse")
    return model, opt


def step_of(
    model: Callable[[torch.Tensor], torch.Tensor],
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(x)
        F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
        opt.step()

    return step


def split(step: Callable[[], None], runs: int = 3) -> tuple[float, float]:
    """(ms per step in sparselearn's operators, ms in everything else), from the profiler."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            step()
    sparse = other = 0.0
    for e in prof.events():
        ms = e.self_cpu_time_total / 1e3 / runs
        if e.name.startswith(("sparselearn::", "sparselearn_cpu::")):
            sparse += ms
        else:
            other += ms
    return sparse, other


def bench(repeats: int) -> list[str]:
    rows = [
        "| model (5% ERK, every supported layer sparse) | eager ms | compiled ms | compiled "
        "speedup | compile s | eager: sparselearn's operators / the rest ms | compiled: "
        "sparselearn's operators / the rest ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in MODELS:
        x, y = batch(name)
        eager_model, eager_opt = accelerated(name)
        model, opt = accelerated(name)
        compiled = torch.compile(model, fullgraph=True)
        eager, comp = step_of(eager_model, eager_opt, x, y), step_of(compiled, opt, x, y)
        t0 = time.perf_counter()
        comp()  # compiles the forward and the backward
        compile_s = time.perf_counter() - t0
        e_ms, c_ms = paired_ms([eager, comp], repeats, rounds=3, settle=2)
        (es, eo), (cs, co) = split(eager), split(comp)
        rows.append(
            f"| {name} | {e_ms:.0f} | {c_ms:.0f} | {e_ms / c_ms:.2f}x | {compile_s:.0f} "
            f"| {es:.0f} / {eo:.0f} | {cs:.0f} / {co:.0f} |"
        )
        print(rows[-1], flush=True)
        del compiled, model, eager_model
        torch._dynamo.reset()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="markdown file to write the section into")
    p.add_argument("--repeats", type=int, default=6)
    args = p.parse_args()
    env = (
        f"{machine()}; float32; torch.compile(fullgraph=True), inductor; median of "
        f"{args.repeats} steps in 3 turns"
    )
    print(env, flush=True)
    rows = bench(args.repeats)
    text = "\n".join(
        [
            "Command: `make bench` (`python benchmarks/compiled.py --out docs/performance.md`).",
            "",
            f"Machine: {env}.",
            "",
            "**A full training step (forward, loss, backward, SGD step), accelerated, eager "
            "and compiled; and where each spends its time (the profiler's self time in "
            "sparselearn's operators: the sparse layers, and the CNNs' BatchNorm, pooling and "
            "dropout; and in the rest).**",
            "",
            *rows,
        ]
    )
    if args.out:
        replace_section(args.out, START, END, text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
