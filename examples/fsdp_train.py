"""Sparse momentum at 5% density on LeNet-300-100, Fashion-MNIST, sharded with FSDP2.

Run with ``torchrun --nproc_per_node 2 examples/fsdp_train.py`` (gloo on CPU, NCCL with one GPU
per process). Each rank holds its block of every weight and of every mask, and reads its share
of each global batch. ``--out DIR`` checkpoints after every epoch (the model and optimizer with
``torch.distributed.checkpoint``, each rank's engine state in ``DIR/engine-rank<r>.pt``), and
``--resume`` continues from there on the same number of ranks.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.fsdp import fully_shard

import sparselearn as sl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for the sibling example
from examples.plain_loop import load  # the same Fashion-MNIST files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=100, help="the global batch")
    parser.add_argument("--limit", type=int, default=None, help="training images to use")
    parser.add_argument("--out", type=Path, default=None, help="checkpoint directory")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stop-after", type=int, default=None, help="stop after this epoch")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else None
    if device is not None:
        torch.cuda.set_device(device)
    torch.manual_seed(1)  # the same initial weights and batch order on every rank
    x_train, y_train = load("train")
    x_test, y_test = load("test")
    if args.limit is not None:
        x_train, y_train = x_train[: args.limit], y_train[: args.limit]
    model = nn.Sequential(
        nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    ).to(device)
    fully_shard(model)  # every weight becomes a DTensor: this rank holds a block of its rows
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    steps_per_epoch = len(x_train) // args.batch_size
    options = {
        "method": "sparse_momentum",
        "density": args.density,
        "total_steps": args.epochs * steps_per_epoch,
        "update_every": "epoch",
        "steps_per_epoch": steps_per_epoch,
    }
    first = 1
    if args.resume:
        assert args.out is not None, "--resume needs --out"
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp_load(
            {"model": model_state, "optimizer": optim_state},
            checkpoint_id=str(args.out / "checkpoint"),
        )
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
        state = torch.load(args.out / f"engine-rank{rank}.pt", weights_only=True)
        engine = sl.sparsify(model, optimizer, state=state, **options)  # adopts the saved masks
        first = engine.step // steps_per_epoch + 1
    else:
        engine = sl.sparsify(model, optimizer, **options)

    share = args.batch_size // world
    last = args.epochs if args.stop_after is None else args.stop_after
    for epoch in range(first, last + 1):
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(epoch))
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            idx = idx[rank * share : (rank + 1) * share]  # this rank's share of the batch
            x, y = x_train[idx].to(device), y_train[idx].to(device)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        if args.out is not None:
            model_state, optim_state = get_state_dict(model, optimizer)
            dcp_save(
                {"model": model_state, "optimizer": optim_state},
                checkpoint_id=str(args.out / "checkpoint"),
            )
            torch.save(engine.state_dict(), args.out / f"engine-rank{rank}.pt")
        correct = 0
        with torch.no_grad():  # every rank runs the forward: the weights are gathered for it
            for i in range(0, len(y_test), 1000):
                guess = model(x_test[i : i + 1000].to(device)).argmax(1).cpu()
                correct += int((guess == y_test[i : i + 1000]).sum())
        if rank == 0:
            # layer.active: the whole weight's count (engine.masks[name].full_tensor() gathers
            # the whole mask, a collective that every rank must join)
            masks = {layer.name: layer.active for layer in engine.layers}
            print(
                f"epoch {epoch}: test accuracy {100 * correct / len(y_test):.2f}%, density "
                f"{engine.density():.4f}, active weights {masks}",
                flush=True,
            )
    dist.barrier()  # no rank tears down its connections while another still uses them
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # fully_shard keeps references to the process group that destroy_process_group does not
    # drop (torch 2.13), so its gloo threads still run when the interpreter exits, and tearing
    # them down then can abort the process after its work is done: leave without that teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
