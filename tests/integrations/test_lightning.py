"""The Lightning callback: a LightningModule trained, checkpointed at an epoch's end, resumed
with fit(ckpt_path=...) to the same masks and weights as an uninterrupted run; accumulation,
clipping and bf16-mixed precision on CPU; density logged with self.log."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sparselearn.integrations.lightning import SparseTraining

EPOCHS = 4
BATCHES = 8  # per epoch; accumulation of 2: 4 optimizer steps per epoch


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                 nn.Linear(64, 4))  # fmt: skip

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def loader() -> DataLoader[Any]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(BATCHES * 8, 20, generator=g)
    y = torch.randint(0, 4, (BATCHES * 8,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


class StopAfter(pl.Callback):
    """Stops training at the end of epoch ``epochs`` (an interruption)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 == self.epochs:
            trainer.should_stop = True


def fit(
    root: Path,
    callback: SparseTraining,
    *more: pl.Callback,
    ckpt: Path | None = None,
    **extra: Any,
) -> tuple[pl.Trainer, Classifier]:
    module = Classifier()
    settings: dict[str, Any] = {
        "max_epochs": EPOCHS,
        "accumulate_grad_batches": 2,
        "gradient_clip_val": 1.0,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": str(root),
        "deterministic": True,
    }
    settings.update(extra)
    trainer = pl.Trainer(callbacks=[callback, *more], **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader(), ckpt_path=ckpt, weights_only=True)
    return trainer, module


def method() -> SparseTraining:
    return SparseTraining(method="sparse_momentum", density=0.1, update_every=3)


def test_lightning_resume_reaches_the_uninterrupted_masks(tmp_path: Path) -> None:
    whole_cb = method()
    whole, whole_module = fit(tmp_path / "whole", whole_cb)
    engine = whole_cb.engine
    assert engine is not None
    assert engine.step == whole.global_step == EPOCHS * BATCHES // 2
    assert len(engine.history) >= 3
    assert abs(engine.density() - 0.1) < 0.01

    part_cb = method()
    part, _ = fit(tmp_path / "part", part_cb, StopAfter(2))
    assert part.global_step == whole.global_step // 2
    ckpt = tmp_path / "part.ckpt"
    part.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)
    assert any(key.startswith("SparseTraining") for key in saved["callbacks"])

    again_cb = method()
    again, again_module = fit(tmp_path / "again", again_cb, ckpt=ckpt)
    assert again_cb.engine is not None
    assert again.global_step == whole.global_step
    for name, mask in engine.masks.items():
        assert torch.equal(again_cb.engine.masks[name], mask), name
    for (name, a), b in zip(
        whole_module.state_dict().items(), again_module.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(b, a, msg=name)
    assert [u.step for u in again_cb.engine.history] == [u.step for u in engine.history]


def test_bf16_mixed_precision_keeps_the_budget_and_logs_density(tmp_path: Path) -> None:
    cb = SparseTraining(method="rigl", density=0.2, update_every=2)
    trainer, module = fit(tmp_path, cb, precision="bf16-mixed")
    engine = cb.engine
    assert engine is not None
    assert len(engine.history) >= 2
    params = dict(module.named_parameters())
    for name, mask in engine.masks.items():
        assert torch.count_nonzero(params[name].detach()[~mask]) == 0, name
    assert "sparsity/density" in trainer.callback_metrics
    assert float(trainer.callback_metrics["sparsity/density"]) == pytest.approx(0.2, abs=0.01)


def test_resume_from_a_checkpoint_without_engine_state_says_so(tmp_path: Path) -> None:
    trainer, _ = fit(tmp_path, SparseTraining(method="static", density=0.5), StopAfter(1))
    ckpt = tmp_path / "static.ckpt"
    trainer.save_checkpoint(ckpt)
    with pytest.raises(RuntimeError, match="holds no sparselearn engine state"):
        fit(tmp_path, SparseTraining(method="rigl", density=0.5), ckpt=ckpt)


def test_options_the_callback_sets_itself_are_refused() -> None:
    with pytest.raises(TypeError, match="does not take 'total_steps'"):
        SparseTraining(method="rigl", density=0.1, total_steps=5)
    with pytest.raises(ValueError, match="needs a density"):
        SparseTraining(method="set")


def test_update_every_epoch_counts_the_trainers_optimizer_steps(tmp_path: Path) -> None:
    cb = SparseTraining(method="set", density=0.2, update_every="epoch")
    fit(tmp_path, cb)
    assert cb.engine is not None
    per_epoch = BATCHES // 2  # accumulation of 2
    assert cb.engine.config.steps_per_epoch == per_epoch
    assert [u.step for u in cb.engine.history] == [per_epoch, 2 * per_epoch, 3 * per_epoch]
