"""Speed of structured sparse Linear layers (constant fan-in, 2:4) against dense PyTorch and
against the unstructured kernel at the same density.

Usage: ``make bench`` (or ``python benchmarks/structure.py --out docs/performance.md``); with
``SPARSELEARN_MARCH=x86-64-v3`` the kernels are built for AVX2 and the table goes to a section of
its own (``make bench`` runs both where the CPU has AVX-512).

Inference (``torch.inference_mode``) at batch 1 (online serving: the row-product kernel) and at
batch 256 (the panel kernels), and the training step at batch 256 (forward, then both gradients
from a given output gradient). Each mask is drawn with the structure's own code
(:func:`sparselearn.structure.pick_per_group`): unstructured at the density, constant fan-in
with the same count in every row, 2:4 at 50%. Every number is the median of repeats taken in
turns, dense and sparse side by side in one process; each row is measured in ``--runs``
separate rounds and the speedups are given as their range.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

if os.environ.get("OMP_WAIT_POLICY") != "PASSIVE":  # see speed.py
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for the sibling benchmark script
from benchmarks.speed import machine, markers, paired_ms, train_step

from sparselearn.accel import SparseLinear
from sparselearn.experiments.report import replace_section
from sparselearn.kernels.build import march
from sparselearn.structure import Groups, parse_structure, pick_per_group

# (in, out): ViT-B/16's MLP (SRigL's layer), a GPT-2-medium-sized MLP input, and a large square
SHAPES = [(768, 3072), (3072, 768), (1024, 4096), (4096, 4096)]
TARGET_BATCH1 = 3.4  # SRigL's CPU figure for online inference at 90% sparsity


def mask_of(shape: tuple[int, int], structure: str, density: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if structure == "unstructured":
        return torch.rand(shape, generator=g) < density
    s = parse_structure(structure)
    groups = Groups("w", shape, "out_first", s)
    k = s.n if s.kind == "n:m" else round(density * groups.size)
    noise = torch.rand((groups.count, groups.size), generator=g)
    return groups.unview(pick_per_group(noise, torch.ones_like(noise, dtype=torch.bool), k, g,
                                        largest=True))  # fmt: skip


def infer(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return module(x)

    return run


def layers(n_in: int, n_out: int, density: float) -> tuple[nn.Linear, dict[str, SparseLinear]]:
    torch.manual_seed(0)
    dense = nn.Linear(n_in, n_out)
    sparse = {}
    for structure, d in (("unstructured", density), ("fan_in", density), ("2:4", 0.5)):
        mask = mask_of((n_out, n_in), structure, d)
        layer = copy.deepcopy(dense)
        with torch.no_grad():
            layer.weight.mul_(mask)
        sparse[structure] = SparseLinear(layer, mask)
    return dense, sparse


def speedups(dense_fn: Callable[[], object], fns: list[Callable[[], object]], repeats: int,
             runs: int) -> tuple[float, list[list[float]]]:  # fmt: skip
    """Dense ms (median over the runs) and each contender's speedup in every run."""
    dense_ms: list[float] = []
    ratios: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        times = paired_ms([dense_fn, *fns], repeats)
        dense_ms.append(times[0])
        for r, t in zip(ratios, times[1:], strict=True):
            r.append(times[0] / t)
    return sorted(dense_ms)[len(dense_ms) // 2], ratios


def span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.2f}x" if abs(hi - lo) < 0.005 else f"{lo:.2f}-{hi:.2f}x"


def bench(repeats: int, runs: int, density: float) -> list[str]:
    rows = [
        "| layer (in→out) | case | dense ms | unstructured 10% | constant fan-in 10% | 2:4 (50%) "
        "| fan-in ≥ unstructured | target |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for n_in, n_out in SHAPES:
        dense, sparse = layers(n_in, n_out, density)
        order = ["unstructured", "fan_in", "2:4"]
        cases: list[tuple[str, int, Callable[[nn.Module, torch.Tensor], Callable[[], object]]]]
        cases = [("inference, batch 1", 1, infer), ("inference, batch 256", 256, infer),
                 ("training step, batch 256", 256, train_step)]  # fmt: skip
        for label, batch, make in cases:
            x = torch.randn(batch, n_in)
            reps = repeats * (8 if batch == 1 else 1)
            d_ms, ratios = speedups(make(dense, x), [make(sparse[s], x) for s in order], reps, runs)
            unstructured, fan_in, nm = ratios
            ahead = min(f / u for f, u in zip(fan_in, unstructured, strict=True))
            if batch == 1:
                target = f"{TARGET_BATCH1:g}x dense: " + (
                    "met" if min(fan_in) >= TARGET_BATCH1 else "**missed**"
                )
            elif label.startswith("inference"):
                target = "≥ unstructured: " + ("met" if ahead >= 0.97 else "**missed**")
            else:
                target = "(reported)"
            rows.append(
                f"| {n_in}→{n_out} | {label} | {d_ms:.3f} | {span(unstructured)} "
                f"| {span(fan_in)} | {span(nm)} | {ahead:.2f} (lowest ratio) | {target} |"
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="markdown file to write the section into")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--density", type=float, default=0.1)
    args = p.parse_args()
    env = machine()
    print(env, flush=True)
    t0 = time.time()
    rows = bench(args.repeats, args.runs, args.density)
    print(f"({time.time() - t0:.0f} s)")
    parts = [
        "Command: `make bench` (`"
        + ("" if march() == "native" else f"SPARSELEARN_MARCH={march()} ")
        + "python benchmarks/structure.py --out docs/performance.md`).",
        "",
        f"Machine: {env}; float32; speedups over dense, the range over {args.runs} rounds of "
        f"{args.repeats} repeats in turns ({8 * args.repeats} at batch 1); *fan-in ≥ "
        "unstructured*: the lowest ratio of the fan-in layer's speedup to the unstructured "
        "one's in a round (the target counts 0.97 and above, within the rounds' spread, as "
        "met).",
        "",
        *rows,
    ]
    if args.out:
        replace_section(args.out, *markers("structure"), "\n".join(parts))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
