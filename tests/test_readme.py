"""Every Python example in the README runs as written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import sparselearn as sl
from tests.helpers import MLP, batches

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def namespace() -> dict[str, Any]:
    torch.manual_seed(0)
    model = MLP()
    return {
        "torch": torch,
        "nn": nn,
        "model": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        "train_loader": list(batches("mlp", 6)),
        "loss_fn": nn.functional.cross_entropy,
        "epochs": 2,
    }


def test_the_readme_has_examples() -> None:
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index: int, capsys: pytest.CaptureFixture[str]) -> None:
    registries: list[sl.Registry[Any]] = [
        sl.GROWTH,
        sl.PRUNE,
        sl.REDISTRIBUTION,
        sl.MASK_SCHEDULE,
        sl.METHODS,
    ]
    before = [set(r.names()) for r in registries]
    ns = namespace()
    try:
        exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), ns)
    finally:
        for registry, names in zip(registries, before, strict=True):
            for name in set(registry.names()) - names:
                registry.unregister(name)
    engine = ns.get("engine") or getattr(ns.get("mask"), "engine", None)
    assert isinstance(engine, sl.SparseEngine)
    for name, mask in engine.masks.items():
        weight = dict(ns["model"].named_parameters())[name]
        assert torch.count_nonzero(weight.detach()[~mask]) == 0
