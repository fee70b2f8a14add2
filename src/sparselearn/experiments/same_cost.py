"""Densities at which a wider sparse model costs what a smaller dense one does.

``same-nnz``: the wide model keeps as many non-zero parameters as the dense reference has
parameters (its dense parts, embeddings, norms and biases, count in full; the sparsified
weights make up the rest). ``same-flops``: a training step costs the wide model as many FLOPs
per sample as the dense reference's, by :func:`sparselearn.flops` (attention's products and the
dense layers included; the wide model's weight gradient dense on the steps where its method
needs it), so the two train for the same FLOPs over the same steps. A study names these in
place of a number (``density: same-flops`` in a method's settings, with the spec's
``reference``), and they are resolved here from the run's own configuration: its model, data,
method, settings and steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..flops import flops
from ..models import create_model
from .config import TrainConfig

VIEWS = ("same-nnz", "same-flops")
DIGITS = 4  # a resolved density is rounded to this many decimals (it names the run's folder)


@dataclass(frozen=True)
class Cost:
    parameters: int  # non-zero parameters: the dense parts in full, the active weights
    sparsified: int  # weights under masks (all of them, active or not)
    flops: int  # a training step's FLOPs per sample (sparselearn.flops, attention included)


class Costs:
    """What the model of ``cfg`` (a run's settings, as in a study) costs at a density, and
    what the dense ``reference`` model trained with the same settings costs."""

    def __init__(self, cfg: Mapping[str, Any], reference: str) -> None:
        self.cfg = dict(cfg)
        self.reference_name = reference
        self.base = TrainConfig.from_dict({**cfg, "density": 0.5})
        data = _data(self.base)
        self.steps = _steps(self.base, data)
        self.shape, self.classes = data.info.input_shape, data.info.num_classes
        self.dtype = torch.long if data.info.task == "language" else None
        # the reference trains with the run's settings, without the method's options
        fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"sparsity", "label"}
        own = {k: v for k, v in cfg.items() if k in fields}
        self._reference = TrainConfig.from_dict(
            {**own, "model": reference, "method": "dense", "density": None}
        )

    def reference(self) -> Cost:
        return self._cost(self._reference)

    def at(self, density: float) -> Cost:
        return self._cost(TrainConfig.from_dict({**self.cfg, "density": density}))

    def _cost(self, run: TrainConfig) -> Cost:
        torch.manual_seed(run.seed)
        model = create_model(run.model, self.shape, self.classes)
        engine = _engine(run, model, self.steps)
        masked = sum(m.numel() for m in engine.masks.values())
        active = sum(int(m.sum()) for m in engine.masks.values())
        params = sum(p.numel() for p in model.parameters()) - masked + active
        report = flops(model, engine, self.shape, dtype=self.dtype)
        return Cost(params, masked, report.train_sparse_total)


def resolve(cfg: Mapping[str, Any], reference: str, view: str) -> float:
    """The density of ``cfg``'s model (``cfg``: a run's settings, as in a study) at which it
    costs what the dense ``reference`` model on the same data does, by ``view``: the largest
    density on a grid of ``DIGITS`` decimals that costs no more (same-flops), or the nearest
    (same-nnz)."""
    if view not in VIEWS:
        raise ValueError(f"a same-cost density is one of {', '.join(VIEWS)}, got {view!r}")
    costs = Costs(cfg, reference)
    model, method = costs.base.model, costs.base.method
    target = costs.reference()
    whole = costs.at(1.0)
    if whole.parameters <= target.parameters or whole.flops <= target.flops:
        raise ValueError(
            f"{model} costs no more than dense {reference} ({whole.parameters:,} parameters, "
            f"{whole.flops:,} training FLOPs per sample against {target.parameters:,} and "
            f"{target.flops:,}): it is not wider"
        )
    step = 10.0**-DIGITS
    if view == "same-nnz":
        dense_parts = whole.parameters - whole.sparsified
        density = (target.parameters - dense_parts) / whole.sparsified
        if density < step:
            raise ValueError(
                f"{model} cannot keep {target.parameters:,} non-zero parameters (those of dense "
                f"{reference}): its unsparsified parameters alone number {dense_parts:,}"
            )
        return round(density, DIGITS)
    # a step's FLOPs grow linearly with the active weights: solve the line through two
    # densities (the lowest a layer can take is not known here: a tenth, and all), then step
    # to the largest density on the grid within the budget
    tenth = costs.at(0.1).flops
    slope = (whole.flops - tenth) / 0.9
    if whole.flops - slope > target.flops:
        raise ValueError(
            f"{model} under {method} costs more training FLOPs than dense {reference} with no "
            f"weight active ({(whole.flops - slope) / 1e6:,.1f} against "
            f"{target.flops / 1e6:,.1f} MFLOPs per sample: its dense parts and dense-gradient "
            "steps alone): no same-flops density exists"
        )
    density = max(step, round(1.0 - (whole.flops - target.flops) / slope, DIGITS))
    while density > step and costs.at(density).flops > target.flops:
        density = round(density - step, DIGITS)
    while costs.at(round(density + step, DIGITS)).flops <= target.flops:
        density = round(density + step, DIGITS)
    return density


def _data(cfg: TrainConfig) -> Any:
    from .train import load_data

    return load_data(cfg)


def _steps(cfg: TrainConfig, data: Any) -> tuple[int, int]:
    """(steps per epoch, total steps) as the run trains."""
    from .train import _epoch_steps

    per_epoch = _epoch_steps(cfg, data)
    return per_epoch, per_epoch * cfg.epochs


def _engine(cfg: TrainConfig, model: torch.nn.Module, steps: tuple[int, int]) -> Any:
    from .optim import make_optimizer
    from .train import _sparsify

    return _sparsify(cfg, model, make_optimizer(cfg, model), *steps)
