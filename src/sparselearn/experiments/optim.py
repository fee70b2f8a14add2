"""The optimizer and the learning-rate schedule of a training run."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    )


def lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total``: a linear warm-up over
    the first ``warmup`` of training, then the schedule (cosine decays over what follows)."""
    progress = step / total
    if cfg.warmup and progress < cfg.warmup:
        return cfg.lr * (step + 1) / (cfg.warmup * total)
    if cfg.lr_schedule == "cosine":
        after = (progress - cfg.warmup) / (1 - cfg.warmup)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * after))
    if cfg.lr_schedule == "step":
        return cfg.lr * cfg.lr_gamma ** sum(progress >= m for m in cfg.lr_milestones)
    return cfg.lr
