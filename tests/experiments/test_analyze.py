"""`sparselearn analyze`: class selectivity of channels and neurons."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sparselearn.experiments.analyze import analyze, selectivity, specialisation
from sparselearn.experiments.config import TrainConfig
from sparselearn.experiments.train import train
from tests.datafiles import write_mnist_like


def test_selectivity_index() -> None:
    means = torch.tensor(
        [
            [1.0, 1.0, 1.0, 1.0],  # responds to all classes alike
            [2.0, 0.0, 0.0, 0.0],  # one class only
            [3.0, 1.0, 1.0, 1.0],  # (3 - 1) / (3 + 1)
        ]
    )
    assert torch.allclose(selectivity(means), torch.tensor([0.0, 1.0, 0.5]))


def test_analyze_runs(tmp_path: Path) -> None:
    data = write_mnist_like(tmp_path / "mnist", n_train=300, n_test=100)
    runs = []
    for method, density in (("dense", None), ("static", 0.3)):
        cfg = TrainConfig(
            model="lenet5",
            data="mnist",
            data_dir=str(data),
            download=False,
            epochs=1,
            batch_size=50,
            method=method,
            density=density,
        )
        train(cfg, tmp_path / method, progress=False)
        runs.append(tmp_path / method)
    layers = specialisation(runs[0])
    assert [layer.layer for layer in layers] == ["conv1", "conv2", "fc3"]
    assert [layer.selectivity.numel() + layer.dead for layer in layers] == [20, 50, 500]
    for layer in layers:
        assert torch.all((layer.selectivity >= 0) & (layer.selectivity <= 1))
    doc = tmp_path / "results.md"
    text = analyze(runs, out=tmp_path / "fig", markdown=doc)
    assert "| dense | conv1 | 20 (" in text
    assert "| static 30% | fc3 | 500 (" in text
    assert (tmp_path / "fig" / "lenet5-class-selectivity.png").read_bytes()[:4] == b"\x89PNG"
    assert "<!-- analysis:start -->" in doc.read_text()
    with pytest.raises(FileNotFoundError):
        analyze([tmp_path / "nothing"])


def test_analysis_from_records_without_checkpoints(tmp_path: Path) -> None:
    """A run whose checkpoint is gone is analyzed from the selectivity.json recorded when its
    checkpoint was: the same table; without either, or with a damaged record, a clear error."""
    data = write_mnist_like(tmp_path / "mnist", n_train=300, n_test=100)
    cfg = TrainConfig(
        model="lenet5", data="mnist", data_dir=str(data), download=False, epochs=1,
        batch_size=50, method="static", density=0.3,
    )  # fmt: skip
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    measured = specialisation(run)
    text = analyze([run])
    (run / "checkpoint.pt").unlink()
    recorded = specialisation(run)
    assert [x.layer for x in recorded] == [x.layer for x in measured]
    assert [x.dead for x in recorded] == [x.dead for x in measured]
    for a, b in zip(recorded, measured, strict=True):
        torch.testing.assert_close(a.selectivity, b.selectivity, atol=1e-6, rtol=0)
    assert analyze([run]) == text
    (run / "selectivity.json").write_text('{"layers": [{"layer": "conv1"}]}')
    with pytest.raises(ValueError, match=r"selectivity\.json is damaged"):
        specialisation(run)
    (run / "selectivity.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no checkpoint\.pt to analyze"):
        specialisation(run)
