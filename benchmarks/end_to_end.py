"""End to end: ``sparselearn train`` on a CNN, dense against sparse with the sparse kernels.

Usage: ``make bench`` (or ``python benchmarks/end_to_end.py --out docs/performance.md``).

Each run is a whole ``sparselearn train`` process on Fashion-MNIST, one after the other on the
same machine: data, forward, backward, optimizer, mask updates and the evaluation of the
validation and test splits after every epoch. The per-epoch time is the run's own
``epoch_seconds`` (from the epoch's first batch to the end of its evaluation); the process's
wall time adds the start-up, ``sl.accelerate``'s timing of each layer, the evaluation of the
untrained model and the checkpoints. Writes its section of the output file between markers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# OpenMP reads its wait policy when it loads (see speed.py); the runs inherit it.
if os.environ.get("OMP_WAIT_POLICY") != "PASSIVE":
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch

from sparselearn.experiments.report import replace_section

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for the sibling benchmark script
from benchmarks.speed import cpu_name

START, END = "<!-- end-to-end:start -->", "<!-- end-to-end:end -->"
TARGET = 2.0  # per-epoch wall time, dense over sparse

# (row name, the run's flags beyond the shared ones)
RUNS: tuple[tuple[str, list[str]], ...] = (
    ("dense", ["--method", "dense"]),
    (
        "sparse momentum 5% (ERK), sparse kernels",
        [
            "--method", "sparse_momentum", "--density", "0.05", "--init", "erk",
            "--accelerate", "auto", "--update-every", "epoch", "--momentum-window", "20",
        ],
    ),
    (
        "RigL 5% (ERK), sparse kernels",
        ["--method", "rigl", "--density", "0.05", "--accelerate", "auto"],
    ),
)  # fmt: skip


def run(name: str, flags: list[str], shared: list[str], folder: Path) -> dict[str, Any]:
    out = folder / name.split()[0].lower()
    command = [sys.executable, "-m", "sparselearn", "train", *shared, *flags, "--out", str(out)]
    print("$", " ".join(command[1:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = rows[1:]
    train = [b["wall_time"] - a["wall_time"] for a, b in zip(rows, epochs, strict=False)]
    seconds = [r["epoch_seconds"] for r in epochs]
    return {
        "epoch": statistics.median(seconds),
        "range": (min(seconds), max(seconds)),
        "train": statistics.median(train),
        "eval": statistics.median(s - t for s, t in zip(seconds, train, strict=True)),
        "wall": wall,
        "test": epochs[-1]["test_acc"],
    }


def table(results: list[tuple[str, dict[str, Any]]]) -> list[str]:
    dense = results[0][1]
    rows = [
        "| run | test accuracy | epoch s (median, range) | training s | evaluation s "
        "| epoch speedup | process wall s | target | |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in results:
        speedup = dense["epoch"] / r["epoch"]
        target = "" if r is dense else f"{TARGET:g}x"
        verdict = "" if r is dense else ("met" if speedup >= TARGET else "**missed**")
        rows.append(
            f"| {name} | {100 * r['test']:.2f}% | {r['epoch']:.1f} ({r['range'][0]:.1f}-"
            f"{r['range'][1]:.1f}) | {r['train']:.1f} | {r['eval']:.1f} | {speedup:.2f}x "
            f"| {r['wall']:.0f} | {target} | {verdict} |"
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="markdown file to write the section into")
    p.add_argument("--model", default="wrn-16-8")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps-per-epoch", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--runs", type=Path, help="where the runs go (default: a temporary folder)")
    args = p.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
    shared = [
        "--model", args.model, "--data", "fashion-mnist", "--epochs", str(args.epochs),
        "--steps-per-epoch", str(args.steps_per_epoch), "--batch-size", str(args.batch_size),
        "--threads", str(threads), "--seed", "1", "--no-progress",
    ]  # fmt: skip
    env = (
        f"{cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}, {threads} threads, "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    )
    print(env, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.runs or Path(tmp)
        results = [(name, run(name, flags, shared, folder)) for name, flags in RUNS]
    rows = table(results)
    print("\n".join(rows))
    if args.out:
        body = [
            "Command: `make bench` (`python benchmarks/end_to_end.py --out docs/performance.md`).",
            "",
            f"Machine: {env}. `sparselearn train --model {args.model} --data fashion-mnist "
            f"--epochs {args.epochs} --steps-per-epoch {args.steps_per_epoch} --batch-size "
            f"{args.batch_size}`, seed 1, each run alone; the flags of each row are in "
            "`RUNS` of `benchmarks/end_to_end.py`. Evaluation: the 6,000 validation and 10,000 "
            "test images after every epoch.",
            "",
            *rows,
        ]
        replace_section(args.out, START, END, "\n".join(body))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
