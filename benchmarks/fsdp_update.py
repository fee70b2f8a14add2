"""Mask-update cost under FSDP2 (two ranks, gloo, CPU) against one process, for the MLP
784-4096-4096-4096-10 at 5% density.

Usage: ``make bench`` (or ``python benchmarks/fsdp_update.py --out docs/performance.md``).

One process uses every core; the two ranks share them (half each), so both sides have the same
machine. They are measured in turns, round after round (one process, then the two ranks), each
update timed by the engine's own timer; under FSDP an update's time is the slowest rank's. The
section reports medians with the range over rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("OMP_WAIT_POLICY") != "PASSIVE":  # see mask_update.py
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch
import torch.distributed as dist
from torch import nn
from torch.multiprocessing.spawn import spawn

import sparselearn as sl
from sparselearn.kernels.machine import cpu_name

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for the sibling benchmark script
from benchmarks.mask_update import load_fashion_mnist, mlp, sgd, write_section

START, END = "<!-- fsdp-update:start -->", "<!-- fsdp-update:end -->"
METHODS = ["sparse_momentum", "rigl", "set", "dsr"]
WORLD = 2


def update_times(
    model: nn.Module,
    method: str,
    args: argparse.Namespace,
    data: list[tuple[torch.Tensor, torch.Tensor]],
) -> list[float]:
    """Train with an update every ``args.every`` steps; the engine's time for each update."""
    opt = sgd(model)
    total = 100 * args.every * (args.updates + 2)
    engine = sl.sparsify(model, opt, method, args.density, total, update_every=args.every, seed=0)
    for i in range(args.every * args.updates):
        x, y = data[i % len(data)]
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    times = [u.seconds for u in engine.history if u.kind != "skipped"]
    engine.remove()
    return times


def _rank(rank: int, store: str, out: str, args: argparse.Namespace) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(args.threads // WORLD)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        data = load_fashion_mnist(args.batch, 4)
        half = args.batch // WORLD  # each rank its share of every global batch
        shard = [
            (x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half])
            for x, y in data
        ]
        results = {}
        for method in args.methods:
            torch.manual_seed(0)
            model = mlp(args.width)
            fully_shard(model)
            results[method] = update_times(model, method, args, shard)
        torch.save(results, f"{out}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # see tests/engine/test_distributed.py


def sharded(args: argparse.Namespace) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        spawn(_rank, args=(f"{tmp}/store", tmp, args), nprocs=WORLD)
        ranks = [torch.load(f"{tmp}/rank{r}.pt", weights_only=True) for r in range(WORLD)]
    # an update ends when its slowest rank is done
    return {m: [max(ts) for ts in zip(*(r[m] for r in ranks), strict=True)] for m in args.methods}


def one_process(args: argparse.Namespace) -> dict[str, list[float]]:
    torch.set_num_threads(args.threads)
    data = load_fashion_mnist(args.batch, 4)
    out = {}
    for method in args.methods:
        torch.manual_seed(0)
        out[method] = update_times(mlp(args.width), method, args, data)
    return out


def render(
    rounds: list[tuple[dict[str, list[float]], dict[str, list[float]]]], args: argparse.Namespace
) -> str:
    lines = [
        START,
        "## Mask updates under FSDP2",
        "",
        f"MLP 784-{args.width}-{args.width}-{args.width}-10, density {args.density}, global batch "
        f"{args.batch}, SGD (Nesterov momentum 0.9), real Fashion-MNIST batches: one process "
        f"with {args.threads} threads against `fully_shard` on {WORLD} ranks (gloo, CPU) with "
        f"{args.threads // WORLD} thread(s) each, in turns, {len(rounds)} rounds of "
        f"{args.updates} updates. Medians over the updates of each round; the range is over "
        "rounds.",
        "",
        f"Measured with `{' '.join(['python', *sys.argv])}` (run by `make bench`) on "
        f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}.",
        "",
        "| method | one process (ms) | FSDP2, 2 ranks (ms) | FSDP2 / one process | target |",
        "|---|---:|---:|---:|---|",
    ]
    for method in args.methods:
        one = [1e3 * statistics.median(r[0][method]) for r in rounds]
        two = [1e3 * statistics.median(r[1][method]) for r in rounds]
        ratio = [b / a for a, b in zip(one, two, strict=True)]
        target = "at most 2x" if method == "sparse_momentum" else ""
        if target:
            target += ": met" if max(ratio) <= 2 else ": **missed**"
        lines.append(
            f"| {method} | {statistics.median(one):.0f} ({min(one):.0f}-{max(one):.0f}) | "
            f"{statistics.median(two):.0f} ({min(two):.0f}-{max(two):.0f}) | "
            f"{statistics.median(ratio):.2f}x ({min(ratio):.2f}-{max(ratio):.2f}) | {target} |"
        )
    lines += [
        "",
        "Each rank scores and selects within its own block of every weight and exchanges only "
        "the candidates at or past an agreed threshold (about as many as are selected), so the "
        "update's passes over whole layers are split between the ranks. SET's prune criterion "
        "ranks weights within their sign group across the whole layer, which is not elementwise: "
        "under FSDP each rank gathers the whole weight for it.",
        END,
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="markdown file to update")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--updates", type=int, default=5, help="timed updates per method")
    parser.add_argument("--every", type=int, default=2, help="steps between updates")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    args = parser.parse_args()
    if args.threads % WORLD:
        parser.error(f"--threads must be a multiple of {WORLD} (each rank gets its share)")
    rounds = []
    for i in range(args.rounds):
        t0 = time.perf_counter()
        one = one_process(args)
        two = sharded(args)
        rounds.append((one, two))
        print(f"round {i + 1}: {time.perf_counter() - t0:.0f} s", flush=True)
        for m in args.methods:
            print(
                f"  {m}: one process {1e3 * statistics.median(one[m]):.0f} ms, "
                f"FSDP2 {1e3 * statistics.median(two[m]):.0f} ms",
                flush=True,
            )
    section = render(rounds, args)
    print(section)
    if args.out is not None:
        write_section(args.out, section, START, END)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
