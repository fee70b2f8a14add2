"""The Hugging Face Trainer callback: a tiny GPT-2 built from a config (nothing downloaded)
trained, checkpointed, stopped and resumed to the same masks and weights as an uninterrupted
run; gradient accumulation counted in optimizer steps; mask updates in the Trainer's log."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers import logging as hf_logging

from sparselearn.integrations.huggingface import ENGINE_FILE, SparseTrainingCallback

hf_logging.set_verbosity_error()

STEPS = 24
SAVE = 12


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Random token sequences (a fixed seed), labels = inputs (the model shifts them)."""

    def __init__(self, n: int = 64, length: int = 16, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(7)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def arguments(out: Path, **extra: Any) -> TrainingArguments:
    settings: dict[str, Any] = {
        "output_dir": str(out),
        "max_steps": STEPS,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "learning_rate": 3e-3,
        "max_grad_norm": 1.0,
        "save_steps": SAVE,
        "logging_steps": 1000,
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }
    settings.update(extra)
    return TrainingArguments(**settings)


class StopAt(TrainerCallback):
    """Interrupts training after ``step`` (its checkpoint written): a crash, politely."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            control.should_training_stop = True


def sparse(**options: Any) -> SparseTrainingCallback:
    return SparseTrainingCallback(method="rigl", density=0.1, update_every=4, **options)


def train(out: Path, *callbacks: TrainerCallback, resume: Any = None, **extra: Any) -> Trainer:
    trainer = Trainer(
        model=tiny_gpt2(),
        args=arguments(out, **extra),
        train_dataset=Tokens(),
        callbacks=list(callbacks),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer.train(resume_from_checkpoint=resume)
    return trainer


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_trainer_resume_reaches_the_uninterrupted_masks_and_weights(tmp_path: Path) -> None:
    whole_cb = sparse()
    whole = train(tmp_path / "whole", whole_cb)
    engine = whole_cb.engine
    assert engine is not None
    # accumulation of 2 micro-batches: the engine counts optimizer steps, as the Trainer does
    assert engine.step == whole.state.global_step == STEPS
    assert len(engine.history) >= 3  # update_every=4 until stop_at: masks did change
    assert abs(engine.density() - 0.1) < 0.002
    assert (tmp_path / "whole" / f"checkpoint-{SAVE}" / ENGINE_FILE).is_file()
    assert (tmp_path / "whole" / f"checkpoint-{STEPS}" / ENGINE_FILE).is_file()
    # the Conv1D weights of GPT-2 are the sparsified ones; the tied head stays dense
    assert {name.split(".")[-2] for name in engine.masks} == {"c_attn", "c_proj", "c_fc"}
    # each mask update is in the Trainer's log
    logged = [e for e in whole.state.log_history if "sparsity/density" in e]
    assert len(logged) == len(engine.history)
    assert all(e["sparsity/pruned"] == e["sparsity/regrown"] > 0 for e in logged)

    part = tmp_path / "part"
    train(part, sparse(), StopAt(SAVE))
    assert not (part / f"checkpoint-{STEPS}").exists()
    again_cb = sparse()
    again = train(part, again_cb, resume=True)
    assert again_cb.engine is not None
    assert again.state.global_step == STEPS
    for name, mask in engine.masks.items():
        assert torch.equal(again_cb.engine.masks[name], mask), name
    final, resumed = weights(whole.model), weights(again.model)
    for name, value in final.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert [u.step for u in again_cb.engine.history] == [u.step for u in engine.history]


def test_trainer_mixed_precision_and_clipping_keep_the_budget(tmp_path: Path) -> None:
    cb = SparseTrainingCallback(method="sparse_momentum", density=0.2, update_every=4)
    trainer = train(tmp_path, cb, bf16=True, max_grad_norm=0.5, save_steps=1000)
    engine = cb.engine
    assert engine is not None
    assert len(engine.history) >= 2
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    params = dict(trainer.model.named_parameters())
    for name, mask in engine.masks.items():
        assert torch.count_nonzero(params[name].detach()[~mask]) == 0, name
    assert abs(engine.density() - 0.2) < 0.002


def test_callback_refuses_what_it_cannot_honour() -> None:
    with pytest.raises(TypeError, match=r"total_steps.*taken from the trainer"):
        SparseTrainingCallback(method="rigl", density=0.1, total_steps=10)
    with pytest.raises(TypeError, match="updte_every"):
        SparseTrainingCallback(method="rigl", density=0.1, updte_every=10)
    with pytest.raises(ValueError, match="needs a density"):
        SparseTrainingCallback(method="rigl")
    with pytest.raises(ValueError, match="did you mean 'rigl'"):
        SparseTrainingCallback(method="rgl", density=0.1)


def test_callback_accepts_per_epoch_updates_with_a_window_before_the_epoch_is_known() -> None:
    # the epoch's length is the trainer's: a window must fit in it, which only the run can tell
    cb = SparseTrainingCallback(
        method="sparse_momentum", density=0.1, update_every="epoch", momentum_window=20
    )
    assert cb.options["momentum_window"] == 20


def test_resume_without_engine_state_says_so(tmp_path: Path) -> None:
    train(tmp_path, StopAt(SAVE))  # a dense run: its checkpoints have no engine state
    with pytest.raises(FileNotFoundError, match=r"no sparselearn engine state.*resume_from="):
        train(tmp_path, sparse(), resume=True)


def test_resume_from_a_checkpoint_elsewhere(tmp_path: Path) -> None:
    train(tmp_path / "a", sparse(), StopAt(SAVE))
    checkpoint = tmp_path / "a" / f"checkpoint-{SAVE}"
    with pytest.raises(FileNotFoundError, match="resume_from"):
        train(tmp_path / "b", sparse(), resume=str(checkpoint))
    cb = sparse(resume_from=checkpoint)
    trainer = train(tmp_path / "b", cb, resume=str(checkpoint))
    assert cb.engine is not None
    assert trainer.state.global_step == STEPS


def test_a_model_without_sparsifiable_layers_fails_at_train_start(tmp_path: Path) -> None:
    class Embedding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Embedding(64, 8)

        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
            return {"loss": self.table(input_ids).pow(2).mean()}

    trainer = Trainer(
        model=Embedding(), args=arguments(tmp_path), train_dataset=Tokens(), callbacks=[sparse()]
    )
    with pytest.raises(ValueError, match="nothing to sparsify"):
        trainer.train()


def test_update_every_epoch_counts_the_trainers_optimizer_steps(tmp_path: Path) -> None:
    cb = SparseTrainingCallback(method="set", density=0.2, update_every="epoch")
    train(tmp_path, cb, save_steps=1000)
    assert cb.engine is not None
    per_epoch = 64 // 4 // 2  # 64 sequences, batches of 4, accumulation of 2
    assert cb.engine.config.steps_per_epoch == per_epoch
    assert [u.step for u in cb.engine.history][:2] == [per_epoch, 2 * per_epoch]
