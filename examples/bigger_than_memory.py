"""Train at 1% density a network whose dense weights would not fit in this machine's memory.

An MLP 784-W-...-W-10 (``--hidden`` layers of width ``--width``; the defaults: 8 layers of
32768, 7.5 billion weights, 28 GiB of dense fp32 weights alone) is built on the meta device
(shapes, no values), sparsified at 1% (``sl.sparsify`` draws each layer's active positions as
a list) and materialised by ``sl.accelerate`` with its active weights only, drawn from each
layer's own initialisation. It then trains on Fashion-MNIST with mask updates (RigL or sparse
momentum), each update scoring growth block by block of rows. It prints the peak RSS of the
process (``VmHWM``), beside what the dense model would need.

Run with ``python examples/bigger_than_memory.py --method rigl`` (``make data`` installs
Fashion-MNIST); ``--width 4096`` for a quick try.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# Read when the process starts, so set here and the script started again. OpenMP's wait
# policy: sleeping threads, not spinning ones. glibc's mmap threshold, fixed at 4 MiB: by
# default it rises to the largest block freed so far (up to 32 MiB), and the activations,
# gradient panels and blocks of a wide layer (a few MiB each) then come from a heap that
# fragments and keeps what they free, a gigabyte over a few mask updates here.
if (
    os.environ.get("OMP_WAIT_POLICY") != "PASSIVE"
    or os.environ.get("MALLOC_MMAP_THRESHOLD_") != "4194304"
):
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "4194304"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch
import torch.nn.functional as F
from torch import nn

import sparselearn as sl
from sparselearn.data import read_idx

DATA_DIRS = [os.environ.get("SPARSELEARN_DATA", ""), "/usr/share/datasets/fashion-mnist"]
GIB = 1024**3


def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = "train" if split == "train" else "t10k"
    for d in DATA_DIRS:
        images = Path(d) / f"{prefix}-images-idx3-ubyte.gz"
        labels = Path(d) / f"{prefix}-labels-idx1-ubyte.gz"
        if d and images.exists() and labels.exists():
            x = read_idx(images).float().div_(255).sub_(0.2860).div_(0.3530)
            return x.reshape(len(x), -1), read_idx(labels).long()
    raise SystemExit(
        "Fashion-MNIST not found in $SPARSELEARN_DATA or /usr/share/datasets/fashion-mnist: "
        "run `make data`, or `apt-get install dataset-fashion-mnist`"
    )


def status(field: str) -> float:
    """A size from /proc/self/status (VmRSS: now, VmHWM: the peak), in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024 / GIB
    raise RuntimeError(f"no {field} in /proc/self/status")


def mlp(width: int, hidden: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(784, width), nn.ReLU()]
    for _ in range(hidden - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


@torch.no_grad()
def he_for_the_active_fan_in(model: nn.Module) -> None:
    """Rescale each sparse layer's values to He initialisation for the inputs a unit really has
    (its active weights, about density x fan-in), keeping their drawn shape. The layers' own
    initialisation is scaled for the dense fan-in: at 1% density each layer would shrink the
    signal tenfold, and eight layers lose it (Evci et al., 2022, "Gradient flow in sparse
    neural networks")."""
    for module in model.modules():
        if isinstance(module, sl.accel.SparseLinear):
            w = module.weight_sparse
            per_unit = w.nnz / w.rows
            std = float(w.values.std())
            w.values.mul_((2.0 / per_unit) ** 0.5 / std)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(
        int((model(x[i : i + 500]).argmax(1) == y[i : i + 500]).sum())
        for i in range(0, len(y), 500)
    )
    model.train()
    return correct / len(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="rigl", choices=["rigl", "sparse_momentum", "set"])
    parser.add_argument("--width", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=8)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=100, help="steps between mask updates")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--test", type=int, default=2000, help="test images to score")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export", type=Path, default=None, help="write the model here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x_train, y_train = load("train")
    x_test, y_test = load("test")
    x_test, y_test = x_test[: args.test], y_test[: args.test]
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    flags = Path("/proc/cpuinfo").read_text()
    isa = "AVX-512" if " avx512f" in flags else "AVX2" if " avx2" in flags else "no AVX2"
    print(
        f"{cpu} ({isa}), "
        f"torch {torch.__version__}, {args.threads} threads, "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
        f"MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}; RSS with the data: "
        f"{status('VmRSS'):.2f} GiB",
        flush=True,
    )

    t0 = time.perf_counter()
    with torch.device("meta"):  # shapes only: no dense weight is ever made
        model = mlp(args.width, args.hidden)
    weights = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    options: dict[str, object] = {"update_every": args.every, "seed": args.seed}
    if args.method == "sparse_momentum":
        options["momentum_window"] = 3  # the dense gradient's factors, 3 steps before updates
    engine = sl.sparsify(
        model, optimizer, args.method, args.density, total_steps=args.steps, **options
    )
    sl.accelerate(model, engine, mode="sparse", live_rounds=0)
    he_for_the_active_fan_in(model)
    active = sum(layer.active for layer in engine.layers)
    print(
        f"MLP 784-{args.width}x{args.hidden}-10: {weights / 1e9:.2f} billion weights, "
        f"{weights * 4 / GIB:.1f} GiB of dense fp32 weights ({weights * 12 / GIB:.1f} GiB "
        f"with the gradient and SGD momentum); {args.method} at {args.density:g}: "
        f"{active / 1e6:.1f} million active, built in {time.perf_counter() - t0:.1f} s, "
        f"RSS {status('VmRSS'):.2f} GiB",
        flush=True,
    )

    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(y_train), (args.batch,), generator=gen)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        loss.backward()
        optimizer.step()  # masks are updated from the step hook
        update = engine.last_update
        if update is not None and update.step == step:
            print(
                f"step {step}: mask update, {update.total_pruned:,} pruned and regrown in "
                f"{update.seconds:.1f} s",
                flush=True,
            )
        if step % 25 == 0 or step == args.steps:
            elapsed = time.perf_counter() - t0
            print(
                f"step {step}: loss {loss.item():.3f}, {elapsed / step:.2f} s/step, "
                f"RSS {status('VmRSS'):.2f} GiB, peak {status('VmHWM'):.2f} GiB",
                flush=True,
            )
    print(
        f"test accuracy ({len(y_test)} images) {100 * accuracy(model, x_test, y_test):.2f}%; "
        f"density {engine.density():.4f}; {len(engine.history)} mask updates; peak RSS of the "
        f"whole run {status('VmHWM'):.2f} GiB, against {weights * 4 / GIB:.1f} GiB for the "
        "dense weights alone",
        flush=True,
    )
    if args.export is not None:  # the active weights as CSR, written tensor by tensor
        t0 = time.perf_counter()
        sl.export(model, engine, args.export)
        print(
            f"exported to {args.export}: {args.export.stat().st_size / GIB:.2f} GiB in "
            f"{time.perf_counter() - t0:.1f} s; peak RSS {status('VmHWM'):.2f} GiB",
            flush=True,
        )


if __name__ == "__main__":
    main()
