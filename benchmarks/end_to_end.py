"""End to end: ``sparselearn train`` on a CNN, dense against sparse with the sparse kernels.

Usage: ``make bench`` (or ``python benchmarks/end_to_end.py --out docs/performance.md``).

Each run is a whole ``sparselearn train`` process on Fashion-MNIST, one after the other on the
same machine: data, forward, backward, optimizer, mask updates and the evaluation of the
validation and test splits after every epoch. The per-epoch time is the run's own
``epoch_seconds`` (from the epoch's first batch to the end of its evaluation); the process's
wall time adds the start-up, ``sl.accelerate``'s timing of each layer, the evaluation of the
untrained model and the checkpoints. Writes its section of the output file between markers.

``--seeds 2 3 --only dense sparse_momentum`` runs those rows once per seed and writes a table of
their accuracies over the seeds instead (its own section): whether a sparse run's accuracy is
within the noise of dense's, which one seed cannot say.
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
from sparselearn.kernels.machine import cpu_name

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for the sibling benchmark script

START, END = "<!-- end-to-end:start -->", "<!-- end-to-end:end -->"
SEEDS_START, SEEDS_END = "<!-- end-to-end-seeds:start -->", "<!-- end-to-end-seeds:end -->"
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


def seeds_table(results: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    """Each run's test accuracy for every seed, their mean and sample standard deviation, and
    each seed's epoch speedup over dense's run of the same seed (``results``: run name -> seed
    -> what :func:`run` measured; dense first)."""
    seeds = sorted(results["dense"])
    dense = results["dense"]
    rows = [
        "| run | "
        + " | ".join(f"seed {s}: test accuracy, epoch speedup" for s in seeds)
        + " | test accuracy, mean ± sd |",
        "|---|" + "---:|" * (len(seeds) + 1),
    ]
    for name, by_seed in results.items():
        cells = []
        for s in seeds:
            r = by_seed[s]
            cells.append(f"{100 * r['test']:.2f}%, {dense[s]['epoch'] / r['epoch']:.2f}x")
        acc = [100 * by_seed[s]["test"] for s in seeds]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        mean = f"{statistics.mean(acc):.2f} ± {sd:.2f}%"
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {mean} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="markdown file to write the section into")
    p.add_argument("--model", default="wrn-16-8")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps-per-epoch", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--runs", type=Path, help="where the runs go (default: a temporary folder)")
    methods = [flags[1] for _, flags in RUNS]
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[1],
        help="one run of each row per seed; with several, a table of accuracies over the seeds",
    )
    p.add_argument("--only", nargs="+", choices=methods, help="only these rows (their --method)")
    args = p.parse_args()
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds repeats a seed: {args.seeds}")
    if args.only and "dense" not in args.only:
        p.error("--only must keep dense: every speedup is over it")
    runs = [(name, flags) for name, flags in RUNS if not args.only or flags[1] in args.only]
    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
    shared = [
        "--model", args.model, "--data", "fashion-mnist", "--epochs", str(args.epochs),
        "--steps-per-epoch", str(args.steps_per_epoch), "--batch-size", str(args.batch_size),
        "--threads", str(threads), "--no-progress",
    ]  # fmt: skip
    env = (
        f"{cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}, {threads} threads, "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    )
    print(env, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.runs or Path(tmp)
        by_seed = {
            name: {
                s: run(name, flags, [*shared, "--seed", str(s)], folder / f"seed{s}")
                for s in args.seeds
            }
            for name, flags in runs
        }
    if len(args.seeds) > 1:
        rows = seeds_table(by_seed)
        print("\n".join(rows))
        if args.out:
            command = " ".join(["python benchmarks/end_to_end.py", *sys.argv[1:]])
            body = [
                f"Command: `{command}` (not part of `make bench`: one run per seed).",
                "",
                f"Machine: {env}. The runs of the table above (their flags in `RUNS` of "
                "`benchmarks/end_to_end.py`), one per seed, each alone.",
                "",
                *rows,
            ]
            replace_section(args.out, SEEDS_START, SEEDS_END, "\n".join(body))
            print(f"\nwrote {args.out}")
        return
    (seed,) = args.seeds
    results = [(name, by_seed[name][seed]) for name, _ in runs]  # dense first
    rows = table(results)
    print("\n".join(rows))
    if args.out:
        body = [
            "Command: `make bench` (`python benchmarks/end_to_end.py --out docs/performance.md`).",
            "",
            f"Machine: {env}. `sparselearn train --model {args.model} --data fashion-mnist "
            f"--epochs {args.epochs} --steps-per-epoch {args.steps_per_epoch} --batch-size "
            f"{args.batch_size}`, seed {seed}, each run alone; the flags of each row are in "
            "`RUNS` of `benchmarks/end_to_end.py`. Evaluation: the 6,000 validation and 10,000 "
            "test images after every epoch.",
            "",
            *rows,
        ]
        replace_section(args.out, START, END, "\n".join(body))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
