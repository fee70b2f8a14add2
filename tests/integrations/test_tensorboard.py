"""TensorBoard event files, read back: every mask update of a user's loop with its per-layer
counts and the fraction of weights ever active; `sparselearn train --tensorboard` with metrics
per epoch, and a resumed run that continues the record instead of repeating it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import (  # type: ignore[import-untyped]
    EventAccumulator,
)
from torch import nn

import sparselearn as sl
from sparselearn.experiments import cli
from sparselearn.experiments.train import train
from sparselearn.integrations.tensorboard import TensorBoardLogger
from tests.datafiles import write_mnist_like


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_every_update_of_a_loop_is_written(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = sl.sparsify(model, opt, "set", density=0.2, total_steps=40, update_every=5)
    ever = {k: m.clone() for k, m in engine.masks.items()}
    with TensorBoardLogger(tmp_path) as board:
        board.watch(engine)
        for step in range(40):
            opt.zero_grad()
            model(torch.randn(8, 16)).pow(2).mean().backward()
            opt.step()
            for k, m in engine.masks.items():
                ever[k] |= m
            if step % 10 == 9:
                board.log_metrics({"loss": 1.0 / (step + 1), "name": "skipped"}, step=step + 1)
    got = scalars(tmp_path)
    updates = engine.history
    assert len(updates) >= 4
    assert [s for s, _ in got["sparsity/density"]] == [u.step for u in updates]
    assert [v for _, v in got["sparsity/pruned"]] == [u.total_pruned for u in updates]
    assert [v for _, v in got["sparsity/regrown"]] == [u.total_grown for u in updates]
    for name in engine.masks:
        pruned = [v for _, v in got[f"pruned/{name}"]]
        assert pruned == [u.pruned[name] for u in updates]
        assert got[f"density/{name}"][-1][1] == pytest.approx(engine.layer_densities()[name])
    fraction = sum(int(m.sum()) for m in ever.values()) / sum(m.numel() for m in ever.values())
    trace = [v for _, v in got["sparsity/ever_active"]]
    assert trace == sorted(trace)
    assert trace[0] > 0.2  # SET regrows at random: the record grows
    assert trace[-1] == pytest.approx(fraction)
    assert [s for s, _ in got["metrics/loss"]] == [10, 20, 30, 40]
    assert "metrics/name" not in got


def test_watch_refuses_a_record_of_another_model(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    engine = sl.sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "static", 0.5)
    with TensorBoardLogger(tmp_path) as board, pytest.raises(ValueError, match="ever_active"):
        board.watch(engine, ever_active={"0.weight": torch.ones(3, 3, dtype=torch.bool)})


def _flags(data_dir: Path, out: Path, epochs: int) -> list[str]:
    return [
        "train", "--model", "lenet300-100", "--data", "mnist", "--data-dir", str(data_dir),
        "--no-download", "--epochs", str(epochs), "--batch-size", "50", "--density", "0.1",
        "--method", "set", "--update-every", "4", "--threads", "1", "--no-progress",
        "--out", str(out), "--tensorboard",
    ]  # fmt: skip


def test_train_writes_metrics_and_updates_and_resumes_without_repeats(tmp_path: Path) -> None:
    data_dir = write_mnist_like(tmp_path / "mnist", n_train=400, n_test=100)
    whole = tmp_path / "whole"
    summary = cli.main(_flags(data_dir, whole, 3))
    assert summary == 0
    got = scalars(whole / "tensorboard")
    steps_per_epoch = -(-(400 - 40) // 50)  # a tenth held out for validation; a last short batch
    assert [s for s, _ in got["metrics/epoch"]] == [0, *(steps_per_epoch * e for e in (1, 2, 3))]
    assert [v for _, v in got["metrics/epoch"]] == [0, 1, 2, 3]
    assert "metrics/test_acc" in got
    assert "sparsity/ever_active" in got

    # stopped after its first epoch, then resumed: the same record, each update once
    part = tmp_path / "part"

    class StopError(Exception):
        pass

    def stop(row: dict[str, Any]) -> None:
        raise StopError

    args = cli.build_parser().parse_args(_flags(data_dir, part, 3))
    with pytest.raises(StopError):
        train(cli.resolve_config(args), part, progress=False, on_epoch=stop)
    assert cli.main([*_flags(data_dir, part, 3), "--resume"]) == 0
    resumed = scalars(part / "tensorboard")
    for tag in ("sparsity/density", "sparsity/ever_active", "metrics/epoch"):
        assert [s for s, _ in resumed[tag]] == [s for s, _ in got[tag]], tag
    assert resumed["sparsity/ever_active"] == got["sparsity/ever_active"]
