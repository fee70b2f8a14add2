"""Mask-update cost versus one training step, for an MLP 784-4096-4096-4096-10 at 5% density.

Usage: ``make bench`` (or ``python benchmarks/mask_update.py --out docs/performance.md``).

Every number is a median over repeats, measured in one process, dense and sparse side by side,
on real Fashion-MNIST batches. Writes its section of the output file between markers and leaves
the rest of the file alone.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# OpenMP reads its wait policy when it loads: on a machine with few cores, threads that spin while
# waiting take the cores from the ones that work, and small ops slow down many times. Restart
# with the policy set before torch is imported.
if os.environ.get("OMP_WAIT_POLICY") != "PASSIVE":
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch
from torch import nn

import sparselearn as sl
from sparselearn.data import read_idx
from sparselearn.kernels.machine import cpu_name

START, END = "<!-- mask-update:start -->", "<!-- mask-update:end -->"
DATA_DIRS = [os.environ.get("SPARSELEARN_DATA", ""), "/usr/share/datasets/fashion-mnist"]
METHODS = ["sparse_momentum", "rigl", "set", "dsr", "gmp"]


@dataclass
class Row:
    method: str
    step_ms: float  # median training step without a mask update
    update_ms: float | None = None  # median of the engine's own timer around one update
    delta_ms: float | None = None  # median update step minus median plain step
    interval: int = 0  # the method's default update interval
    updates: int = 0


def load_fashion_mnist(batch: int, n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    for d in DATA_DIRS:
        images = Path(d) / "train-images-idx3-ubyte.gz"
        labels = Path(d) / "train-labels-idx1-ubyte.gz"
        if d and images.exists() and labels.exists():
            x = read_idx(images)[: batch * n_batches].float().div_(255).reshape(-1, 784)
            y = read_idx(labels)[: batch * n_batches].long()
            return [
                (x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch])
                for i in range(n_batches)
            ]
    raise SystemExit(
        "Fashion-MNIST not found in $SPARSELEARN_DATA or /usr/share/datasets/fashion-mnist; "
        "install it with `apt-get install dataset-fashion-mnist` (make bench does this)"
    )


def mlp(width: int, inputs: int = 784) -> nn.Module:
    """MLP inputs-width-width-width-10."""
    return nn.Sequential(
        nn.Linear(inputs, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, 10),
    )


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4
    )


def timed_steps(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: list[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    after: Callable[[], None] = lambda: None,
) -> list[float]:
    times = []
    for i in range(steps):
        x, y = data[i % len(data)]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        after()
    return times


def measure(args: argparse.Namespace) -> list[Row]:
    data = load_fashion_mnist(args.batch, 8)
    torch.manual_seed(0)
    dense = mlp(args.width)
    dense_times = timed_steps(dense, sgd(dense), data, args.warmup + args.steps)[args.warmup :]
    rows = [Row("dense (no engine)", 1e3 * statistics.median(dense_times))]
    del dense
    for method in METHODS:
        torch.manual_seed(0)
        model = mlp(args.width)
        opt = sgd(model)
        # a long run, so that the prune rate and the gradual schedule are mid-way, and an update
        # every `every` steps so that several updates are timed
        every = args.every
        total = 100 * every * (args.updates + 2)
        engine = sl.sparsify(
            model,
            opt,
            method=method,
            density=args.density,
            total_steps=total,
            update_every=every,
            seed=0,
        )
        if method == "gmp":  # start gmp mid-way so that each update prunes a real share
            engine._step = total // 4 - (total // 4) % every
        start = engine.step
        times = timed_steps(model, opt, data, args.warmup + every * args.updates)
        update_steps = {u.step - start for u in engine.history}
        normal = [t for i, t in enumerate(times, 1) if i > args.warmup and i not in update_steps]
        with_update = [t for i, t in enumerate(times, 1) if i in update_steps]
        internal = [u.seconds for u in engine.history if u.kind != "skipped"]
        row = Row(
            method,
            step_ms=1e3 * statistics.median(normal),
            update_ms=1e3 * statistics.median(internal),
            interval=int(sl.METHODS.get(method).defaults.get("update_every", 0)),
            updates=len(internal),
        )
        row.delta_ms = 1e3 * statistics.median(with_update) - row.step_ms
        rows.append(row)
        print(
            f"{method}: step {row.step_ms:.1f} ms, update {row.update_ms:.1f} ms "
            f"(step delta {row.delta_ms:.1f} ms, {row.updates} updates)",
            flush=True,
        )
        engine.remove()
        # the engine's hooks tie model, optimizer and engine in reference cycles: free them now,
        # or the next method is timed with this one's 300 MiB still allocated
        del engine, model, opt
        gc.collect()
    return rows


def render(rows: list[Row], args: argparse.Namespace) -> str:
    lines = [
        START,
        "## Mask-update cost",
        "",
        f"MLP 784-{args.width}-{args.width}-{args.width}-10, density {args.density}, batch "
        f"{args.batch}, float32, SGD (Nesterov momentum 0.9), real Fashion-MNIST batches. "
        f"Medians: {args.steps} steps for dense, {args.updates} updates per method.",
        "",
        f"Measured with `{' '.join(['python', *sys.argv])}` (run by `make bench`) on "
        f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}.",
        "",
        "| method | training step (ms) | mask update (ms) | update / step | "
        "default interval (steps) | update share of training at the default interval |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.update_ms is None:
            lines.append(f"| {r.method} | {r.step_ms:.1f} | – | – | – | – |")
            continue
        share = 100 * r.update_ms / (r.update_ms + r.interval * r.step_ms)
        lines.append(
            f"| {r.method} | {r.step_ms:.1f} | {r.update_ms:.1f} | "
            f"{r.update_ms / r.step_ms:.2f}x | {r.interval} | {share:.2f}% |"
        )
    deltas = ", ".join(f"{r.method} {r.delta_ms:.0f} ms" for r in rows if r.delta_ms is not None)
    lines += [
        "",
        "*Training step*: forward, backward and `optimizer.step()` with the engine's hooks "
        "(inactive weights and gradients zeroed), on a step without a mask update; masks alone "
        "make no step faster than dense. *Mask update*: the engine's own timer around one "
        "prune / redistribute / regrow (gmp: prune) cycle. Steps with an update took this much "
        f"longer than plain steps (median; RigL's also copies the dense gradient): {deltas}.",
        END,
    ]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str, start: str = START, end: str = END) -> None:
    """Replace the part of ``path`` between the markers ``start`` and ``end`` (or append)."""
    text = path.read_text() if path.exists() else "# Performance\n\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="markdown file to update")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed dense steps")
    parser.add_argument("--updates", type=int, default=9, help="timed mask updates per method")
    parser.add_argument("--every", type=int, default=3, help="steps between timed updates")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}",
        flush=True,
    )
    section = render(measure(args), args)
    print(section)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_section(args.out, section)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
