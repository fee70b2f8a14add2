"""Sparse training with the Hugging Face ``transformers`` Trainer: one callback.

Example::

    from sparselearn.integrations.huggingface import SparseTrainingCallback

    trainer = Trainer(model=model, args=args, train_dataset=train,
                      callbacks=[SparseTrainingCallback(method="sparse_momentum", density=0.1)])
    trainer.train()                                  # or train(resume_from_checkpoint=True)

When training begins the callback sparsifies the Trainer's model and the torch optimizer inside
the Trainer's wrapper, with ``total_steps`` from the Trainer's state (optimizer steps, so
gradient accumulation is counted right). The Trainer's gradient clipping and mixed precision
work unchanged: gradients are masked as they accumulate, before clipping.

Every checkpoint folder gets ``sparselearn_engine.pt`` (masks, step, RNG states, history). On
``trainer.train(resume_from_checkpoint=...)`` the Trainer restores the weights and the optimizer
before callbacks start, so the engine adopts the checkpoint's masks without applying freshly
drawn ones first; the restored weights are checked against them. The file is looked for in
``output_dir/checkpoint-<global step>`` (where ``resume_from_checkpoint=True`` resumes from);
a checkpoint kept elsewhere is named with ``resume_from=``.

Each mask update appends ``sparsity/density``, ``sparsity/pruned`` and ``sparsity/regrown`` to
the Trainer's log (``trainer.state.log_history``). ``callback.engine`` is the engine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .. import checkpoint
from ..engine import SparseEngine, sparsify
from ._common import (
    check_arguments,
    check_weights_match,
    inner_optimizer,
    update_log,
    with_epoch,
)

__all__ = ["ENGINE_FILE", "SparseTrainingCallback"]

ENGINE_FILE = "sparselearn_engine.pt"
_OWNER = "SparseTrainingCallback"


def _checkpoint_folder(args: TrainingArguments, state: TrainerState) -> Path:
    """Where the Trainer writes (and ``resume_from_checkpoint=True`` finds) this step's
    checkpoint."""
    return Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"


def _steps_per_epoch(args: TrainingArguments, loader: Any) -> int:
    """Optimizer steps per epoch, as the Trainer counts them."""
    try:
        batches = len(loader)
    except TypeError:  # an iterable dataset: no epochs to count
        return 0
    return batches // max(1, args.gradient_accumulation_steps)


class SparseTrainingCallback(TrainerCallback):
    """Keep the Trainer's model sparse with ``method`` at ``density``.

    Args:
        method: a method from :func:`sparselearn.methods`.
        density: fraction of weights kept active.
        resume_from: the checkpoint folder to take the engine state from on resume, when it
            is not ``output_dir/checkpoint-<global step>``.
        **options: engine options, as for :func:`sparselearn.sparsify` (``total_steps`` is the
            Trainer's; ``update_every="epoch"`` counts the Trainer's optimizer steps per epoch).
    """

    def __init__(
        self,
        method: str = "sparse_momentum",
        density: float | None = None,
        *,
        resume_from: str | os.PathLike[str] | None = None,
        **options: Any,
    ) -> None:
        check_arguments(_OWNER, method, density, options)
        self.method = method
        self.density = density
        self.options = options
        self.resume_from = Path(resume_from) if resume_from is not None else None
        self.engine: SparseEngine | None = None
        self._logged = 0

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        optimizer: Any = None,
        train_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise RuntimeError(f"{_OWNER}: the Trainer has no model at train start")
        torch_optimizer = inner_optimizer(optimizer, _OWNER)
        if self.engine is not None and self.engine.attached:
            self.engine.remove()  # a second trainer.train(): a new run
        saved = self._saved_state(args, state, model) if state.global_step > 0 else None
        self.engine = sparsify(
            model,
            torch_optimizer,
            self.method,
            self.density,
            total_steps=state.max_steps,
            state=saved,
            **with_epoch(self.options, _steps_per_epoch(args, train_dataloader)),
        )
        self._logged = len(self.engine.history)

    def _saved_state(self, args: TrainingArguments, state: TrainerState, model: Any) -> Any:
        folder = self.resume_from or _checkpoint_folder(args, state)
        path = folder / ENGINE_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{_OWNER}: resuming at step {state.global_step}, but {path} does not exist: "
                "the checkpoint holds no sparselearn engine state (it was written without this "
                "callback) or it is not in output_dir; pass SparseTrainingCallback(..., "
                "resume_from='<checkpoint folder>'), or train from the start"
            )
        content = checkpoint.load(path, map_location="cpu")
        written_at = content.get("global_step")
        if written_at != state.global_step:
            raise ValueError(
                f"{path} was written at step {written_at}, but the Trainer resumes at step "
                f"{state.global_step}: pass resume_from= the folder of the checkpoint resumed"
            )
        engine_state = content["engine"]
        check_weights_match(model, engine_state["masks"], str(path))
        return engine_state

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.engine is None:
            return
        for update in self.engine.history[self._logged :]:
            state.log_history.append({**update_log(update), "step": state.global_step})
        self._logged = len(self.engine.history)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.engine is None or not state.is_world_process_zero:
            return
        folder = _checkpoint_folder(args, state)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{_OWNER}: the Trainer's checkpoint folder {folder} does not exist, so the "
                "engine state cannot be saved beside it (hyperparameter search writes "
                "checkpoints elsewhere; it is not supported)"
            )
        checkpoint.save(
            folder / ENGINE_FILE,
            {"global_step": state.global_step, "engine": self.engine.state_dict()},
        )
