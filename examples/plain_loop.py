"""Sparse momentum at 5% density on LeNet-300-100, Fashion-MNIST, in a plain PyTorch loop.

Run with ``python examples/plain_loop.py`` (``make data`` installs Fashion-MNIST).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from torch import nn

import sparselearn as sl
from sparselearn.data import read_idx

DATA_DIRS = [os.environ.get("SPARSELEARN_DATA", ""), "/usr/share/datasets/fashion-mnist"]


def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = "train" if split == "train" else "t10k"
    for d in DATA_DIRS:
        images = Path(d) / f"{prefix}-images-idx3-ubyte.gz"
        labels = Path(d) / f"{prefix}-labels-idx1-ubyte.gz"
        if d and images.exists() and labels.exists():
            x = read_idx(images).float().div_(255).sub_(0.2860).div_(0.3530)  # (N, 28, 28)
            return x.reshape(len(x), -1), read_idx(labels).long()
    raise SystemExit(
        "Fashion-MNIST not found in $SPARSELEARN_DATA or /usr/share/datasets/fashion-mnist: "
        "run `make data`, or `apt-get install dataset-fashion-mnist`"
    )


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), 1000):
        correct += int((model(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum())
    model.train()
    return correct / len(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    x_train, y_train = load("train")
    x_test, y_test = load("test")
    model = nn.Sequential(
        nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    )
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    steps_per_epoch = len(x_train) // args.batch_size

    # the two lines that make training sparse
    engine = sl.sparsify(
        model,
        optimizer,
        method="sparse_momentum",
        density=args.density,
        total_steps=args.epochs * steps_per_epoch,
        update_every="epoch",
        steps_per_epoch=steps_per_epoch,
    )
    print("Before training:\n" + engine.summary() + "\n")

    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(x_train))
        for i in range(steps_per_epoch):  # the user's own loop, unchanged
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            optimizer.step()
        update = engine.last_update
        moved = (
            f", moved {update.total_grown:,} weights"
            if update and update.step == engine.step
            else ""
        )
        print(
            f"epoch {epoch}: test accuracy {100 * accuracy(model, x_test, y_test):.2f}%, "
            f"density {engine.density():.4f}{moved} ({time.perf_counter() - start:.1f} s)"
        )
    print("\nAfter training:\n" + engine.summary())


if __name__ == "__main__":
    main()
