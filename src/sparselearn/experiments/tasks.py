"""What a run learns: classification (images) or next-token prediction (text), with its loss,
its per-batch score and its evaluation metrics."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..data.base import Data
from .parallel import World, shard


@dataclass(frozen=True)
class Task:
    name: str
    score: str  # the summary key that reports aggregate over seeds
    score_label: str
    higher_is_better: bool
    evaluate_keys: tuple[str, ...]  # what evaluate() gives, per split

    def loss(self, logits: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
        """Cross-entropy (``reduction``: mean or sum); ``logits`` (B, classes) or
        (B, T, vocab)."""
        return nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction=reduction
        )

    def count(self, y: Tensor) -> int:
        """What a batch's loss is a mean over: samples, or predicted tokens."""
        return y.numel()

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        data: Data,
        split: str,
        batch_size: int,
        device: torch.device,
        world: World | None = None,
    ) -> dict[str, float | None]:
        """The split's metrics (``{"acc": ...}``, or loss, perplexity and bits per character);
        None for a split that is empty. Under data parallelism (``world``) each rank evaluates
        its share of every batch and the sums are reduced."""
        world = world or World()
        was_training = model.training
        model.eval()
        correct = total = 0
        loss_sum = 0.0
        for x, y in data.batches(split, batch_size, shuffle=False, seed=0, epoch=0, augment=False):
            x, y = shard(world, x, y)
            if not len(y):
                continue
            logits = model(x.to(device, non_blocking=True))
            if self.name == "language":
                loss_sum += float(self.loss(logits, y.to(logits.device), reduction="sum"))
                total += self.count(y)
            else:
                correct += int((logits.argmax(1).cpu() == y).sum())
                total += len(y)
        model.train(was_training)
        loss_sum, correct_f, total_f = world.sum(loss_sum, correct, total)
        correct, total = round(correct_f), round(total_f)
        if self.name == "language":
            if not total:
                return {"loss": None, "ppl": None, "bpc": None}
            loss = loss_sum / total
            return {"loss": loss, "ppl": math.exp(loss), "bpc": loss / math.log(2)}
        return {"acc": correct / total if total else float("nan")}


CLASSIFY = Task("classify", "test_acc", "test accuracy (%)", True, ("acc",))
LANGUAGE = Task("language", "test_ppl", "test perplexity", False, ("loss", "ppl", "bpc"))


def task_of(data_task: str) -> Task:
    return LANGUAGE if data_task == "language" else CLASSIFY
