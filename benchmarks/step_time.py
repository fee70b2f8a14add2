"""A training step of a small dense model against a wider one sparse at the same non-zeros.

Usage: ``python benchmarks/step_time.py`` (default: dense ``wrn-16-2`` against ``wrn-16-8`` on
Fashion-MNIST, the pair of the same-cost study in docs/results.md); ``--out FILE`` saves the
table. The wide model's density keeps the small model's non-zero parameters
(``same_cost.resolve``, as the study resolves ``same-nnz``); its layers compute with the sparse
kernels where they time faster (``sl.accelerate(mode="auto")`` on a real batch). Each repeat
times one step (forward, backward, SGD) of each model in turn on the same real batch, after
warm-up; the table gives medians and ranges over the repeats.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# OpenMP reads its wait policy when it loads (see speed.py): restart with it set.
if os.environ.get("OMP_WAIT_POLICY") != "PASSIVE":
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch
from torch import nn

import sparselearn as sl
from sparselearn._io import write_atomic
from sparselearn.experiments import same_cost
from sparselearn.experiments.config import TrainConfig
from sparselearn.experiments.train import load_data
from sparselearn.models import create_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for the sibling benchmark script
from benchmarks.speed import machine


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    start = time.perf_counter()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", default="wrn-16-2", help="the dense model")
    p.add_argument("--wide", default="wrn-16-8", help="the wider model, trained sparse")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", type=Path, help="markdown file to save the table in")
    args = p.parse_args()
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be at least 1 and --warmup at least 0")

    settings = {
        "model": args.wide,
        "data": args.data,
        "method": "static",
        "epochs": 1,
        "batch_size": args.batch_size,
    }
    density = same_cost.resolve(settings, args.small, "same-nnz")
    data = load_data(TrainConfig.from_dict({**settings, "density": density}))
    x, y = next(iter(data.batches("train", args.batch_size, shuffle=False, seed=0, epoch=0,
                                  augment=False)))  # fmt: skip
    shape, classes = data.info.input_shape, data.info.num_classes

    torch.manual_seed(0)
    small = create_model(args.small, shape, classes)
    small_opt = torch.optim.SGD(small.parameters(), lr=0.01, momentum=0.9)
    wide = create_model(args.wide, shape, classes)
    wide_opt = torch.optim.SGD(wide.parameters(), lr=0.01, momentum=0.9)
    engine = sl.sparsify(wide, wide_opt, "static", density)
    report = sl.accelerate(wide, engine, mode="auto", example_input=x)
    sparse_layers = sum(c.chosen == "sparse" for c in report.layers)

    times: dict[str, list[float]] = {"small": [], "wide": []}
    for i in range(args.warmup + args.repeats):
        for name, model, opt in (("small", small, small_opt), ("wide", wide, wide_opt)):
            seconds = _step(model, opt, x, y)
            if i >= args.warmup:
                times[name].append(seconds)

    def cell(name: str) -> str:
        t = times[name]
        return f"{statistics.median(t):.3f} ({min(t):.3f}-{max(t):.3f})"

    ratio = statistics.median(times["wide"]) / statistics.median(times["small"])
    lines = [
        f"Training step, batch {args.batch_size} of {args.data}; {machine()}",
        "",
        "| model | density | sparse layers | step (s), median (range) | x the small model |",
        "|---|---:|---:|---:|---:|",
        f"| {args.small} (dense) | 100% | 0 | {cell('small')} | 1.00 |",
        f"| {args.wide} | {density:.2%} | {sparse_layers} of {len(report.layers)} "
        f"| {cell('wide')} | {ratio:.2f} |",
        "",
        f"(medians over {args.repeats} repeats after {args.warmup} of warm-up, the two models "
        "in turn)",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        write_atomic(args.out, text + "\n")


if __name__ == "__main__":
    main()
