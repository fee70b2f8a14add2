"""The configuration of one training run: every setting, with its help text beside its field
(the ``sparselearn train`` flags are made from these fields and the engine's options)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..config import OPTION_NAMES, _check_unit, unknown_option_message
from ..data.datasets import DATASETS
from ..methods import METHODS, make_config
from ..models import MODELS, model_inputs
from ..schedules import MASK_SCHEDULE
from ..structure import parse_structure

# engine options the training run sets itself
_DERIVED = ("steps_per_epoch",)
SPARSITY_OPTIONS: tuple[str, ...] = tuple(o for o in OPTION_NAMES if o not in (*_DERIVED, "seed"))


def _setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run. Defaults follow the sparse momentum paper's MNIST setup; on a
    language corpus (``stdlib-text``) the settings marked so default to a language model's
    (AdamW, warm-up and cosine decay): the values in :data:`TASK_DEFAULTS`."""

    model: str = _setting("lenet300-100", "model name (see `sparselearn list`)")
    data: str = _setting(
        "fashion-mnist", "dataset: mnist, fashion-mnist, cifar10, imagenet, stdlib-text"
    )
    method: str = _setting("sparse_momentum", "sparse training method (see `sparselearn list`)")
    label: str | None = _setting(None, "the name of this variant in reports (default: the method)")
    density: float | None = _setting(
        0.05,
        "fraction of weights kept active, e.g. 0.05 (ignored by dense; N/M under an N:M structure)",
    )
    epochs: int = _setting(None, "training epochs (default: 100; 2 for language)")
    batch_size: int = _setting(None, "training batch size (default: 100; 32 for language)")
    steps_per_epoch: int | None = _setting(
        None,
        "training steps per epoch: the first N batches of each epoch's shuffled training split, "
        "for quick runs and timings (default: the whole split)",
    )
    optimizer: str = _setting(
        None, "sgd (Nesterov momentum), adam or adamw (default: sgd; adamw for language)"
    )
    lr: float = _setting(None, "initial learning rate (default: 0.1; 0.001 for language)")
    momentum: float = _setting(0.9, "SGD momentum")
    nesterov: bool = _setting(True, "Nesterov momentum")
    weight_decay: float = _setting(
        None,
        "weight decay (L2 for sgd and adam, decoupled for adamw) (default: 5e-4; 0.1 for language)",
    )
    lr_schedule: str = _setting(
        None, "step, cosine or constant (default: step; cosine for language)"
    )
    lr_milestones: tuple[float, ...] = _setting(
        (0.5, 0.75), "step schedule: fractions of training where the lr is multiplied by lr-gamma"
    )
    lr_gamma: float = _setting(0.1, "step schedule factor")
    val_fraction: float = _setting(0.1, "fraction of the training set held out for validation")
    split_seed: int = _setting(0, "seed of the validation split (shared by all runs)")
    augment: bool | None = _setting(
        None, "data augmentation (default: on for CIFAR-10 and ImageNet)"
    )
    seed: int = _setting(1, "seed of the model, data order and masks")
    data_dir: str | None = _setting(
        None, "where the dataset lives (then $SPARSELEARN_DATA, then the system location)"
    )
    download: bool = _setting(True, "download missing datasets from their canonical source")
    data_mirror: str | None = _setting(
        None, "base URL to download dataset files from instead of the canonical host"
    )
    image_size: int | None = _setting(None, "ImageNet crop size")
    workers: int = _setting(0, "data loader worker processes (ImageNet)")
    threads: int | None = _setting(None, "torch CPU threads")
    device: str = _setting("auto", "auto, cpu, cuda or cuda:N")
    amp: bool = _setting(
        False, "mixed precision (float16 with a grad scaler on CUDA, bfloat16 on CPU)"
    )
    grad_clip: float | None = _setting(None, "clip the gradient norm to this value")
    accelerate: str = _setting(
        "off",
        "compute with the sparse weights (sl.accelerate): off; auto (time each layer on a "
        "training batch, keep the faster); sparse (every supported layer)",
    )
    eval_batch_size: int = _setting(1000, "batch size for evaluation")
    warmup: float = _setting(
        None,
        "fraction of training over which the lr rises linearly from 0 (default: 0; 0.02 for "
        "language)",
    )
    tensorboard: bool = _setting(
        False,
        "write TensorBoard event files to RUN/tensorboard: the metrics per epoch, densities and "
        "pruned/regrown counts per mask update (needs sparselearn[tensorboard])",
    )
    # engine options that were set (the others take the method's defaults)
    sparsity: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Every setting checked before anything is read or trained; the message names it."""
        for name, registry in (("model", MODELS), ("data", DATASETS), ("method", METHODS)):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ValueError(f"{name} must be a name (see `sparselearn list`), got {value!r}")
            registry.get(value)  # unknown: the choices and a close match
        task = DATASETS.get(self.data).task
        for name, value in TASK_DEFAULTS[task].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        wants = "sequence" if task == "language" else "image"
        if model_inputs(self.model) != wants:
            raise ValueError(
                f"model {self.model!r} reads {model_inputs(self.model)}s and {self.data!r} holds "
                f"{wants}s; choose a model for it (`sparselearn list`)"
            )
        for name in ("epochs", "batch_size", "eval_batch_size"):
            _positive_int(name, getattr(self, name))
        _number("warmup", self.warmup, at_least=0, below=1)
        if self.label is not None and (not isinstance(self.label, str) or not self.label):
            raise ValueError(f"label must be a non-empty string or None, got {self.label!r}")
        _choice("optimizer", self.optimizer, ("sgd", "adam", "adamw"))
        _choice("lr_schedule", self.lr_schedule, ("step", "cosine", "constant"))
        if self.accelerate not in ("off", "auto", "sparse"):
            raise ValueError(
                f"accelerate must be 'off', 'auto' (time each layer, keep the faster) or "
                f"'sparse' (every supported layer), got {self.accelerate!r}"
            )
        _number("lr", self.lr, above=0)
        _number("momentum", self.momentum, at_least=0, below=1)
        _number("weight_decay", self.weight_decay, at_least=0)
        _number("lr_gamma", self.lr_gamma, above=0, at_most=1)
        _number("val_fraction", self.val_fraction, at_least=0, below=1)
        if self.grad_clip is not None:
            _number("grad_clip", self.grad_clip, above=0)
        if not isinstance(self.lr_milestones, (list, tuple)) or any(
            isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m < 1
            for m in self.lr_milestones
        ):
            raise ValueError(
                f"lr_milestones are fractions of training in (0, 1), got {self.lr_milestones!r}"
            )
        for name in ("nesterov", "download", "amp"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.augment is not None and not isinstance(self.augment, bool):
            raise ValueError(f"augment must be true, false or None, got {self.augment!r}")
        for name in ("seed", "split_seed", "workers"):
            _int(name, getattr(self, name), at_least=0)
        for name in ("threads", "image_size", "steps_per_epoch"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        for name in ("data_dir", "data_mirror"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string or None, got {value!r}")
        if not isinstance(self.device, str) or (
            self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:")
        ):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.density is not None:  # checked before any data is read
            _check_unit("density", self.density, low_open=True, high_open=False)
        if not isinstance(self.sparsity, Mapping):
            raise ValueError(f"sparsity must map engine options to values, got {self.sparsity!r}")
        unknown = [k for k in self.sparsity if k not in SPARSITY_OPTIONS]
        if unknown:
            raise ValueError(unknown_option_message(unknown[0], SPARSITY_OPTIONS))
        object.__setattr__(self, "lr_milestones", tuple(self.lr_milestones))
        object.__setattr__(self, "sparsity", dict(self.sparsity))
        check_engine_options(self)

    def to_dict(self) -> dict[str, Any]:
        """Flat keys, as ``--config`` reads them: run settings, then the engine options set."""
        out = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sparsity"
        }
        out["lr_milestones"] = list(self.lr_milestones)
        out.update(self.sparsity)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        run_keys = {f.name for f in dataclasses.fields(cls)} - {"sparsity"}
        run, sparse = {}, {}
        for key, value in values.items():
            if key in run_keys:
                run[key] = value
            elif key in SPARSITY_OPTIONS:
                sparse[key] = value
            else:
                raise ValueError(
                    unknown_option_message(key, (*sorted(run_keys), *SPARSITY_OPTIONS))
                )
        if "lr_milestones" in run:
            run["lr_milestones"] = tuple(run["lr_milestones"])
        if "density" not in run:
            # an N:M structure fixes the density: it is the default there
            method = run.get("method", cls.method)
            preset = METHODS.get(method).defaults if method in METHODS.names() else {}
            structure = parse_structure(
                sparse.get("structure", preset.get("structure", "unstructured"))
            )
            if structure.density is not None:
                run["density"] = structure.density
        return cls(**run, sparsity=sparse)


TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "classify": {
        "epochs": 100,
        "batch_size": 100,
        "optimizer": "sgd",
        "lr": 0.1,
        "weight_decay": 5e-4,
        "lr_schedule": "step",
        "warmup": 0.0,
    },
    "language": {
        "epochs": 2,
        "batch_size": 32,
        "optimizer": "adamw",
        "lr": 1e-3,
        "weight_decay": 0.1,
        "lr_schedule": "cosine",
        "warmup": 0.02,
    },
}
"""The settings whose default depends on what the data is (``DatasetInfo.task``)."""


def _positive_int(name: str, value: object) -> None:
    _int(name, value, at_least=1)


def _int(name: str, value: object, *, at_least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < at_least:
        what = "a positive integer" if at_least == 1 else f"an integer >= {at_least}"
        raise ValueError(f"{name} must be {what}, got {value!r}")


def _choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _number(
    name: str,
    value: object,
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = (
            (above is None or v > above)
            and (at_least is None or v >= at_least)
            and (below is None or v < below)
            and (at_most is None or v <= at_most)
        )
    if not ok:
        bounds = " and ".join(
            f"{sign} {bound:g}"
            for sign, bound in ((">", above), (">=", at_least), ("<", below), ("<=", at_most))
            if bound is not None
        )
        raise ValueError(f"{name} must be a number {bounds}, got {value!r}")


def check_engine_options(cfg: TrainConfig) -> None:
    """The run's engine options, validated as the engine will before the run's length is
    known (the data tells it)."""
    density, options = engine_arguments(cfg)
    make_config(cfg.method, density, run_length_known=False, **options)


def engine_arguments(
    cfg: TrainConfig, steps_per_epoch: int | None = None
) -> tuple[float | None, dict[str, Any]]:
    """The density and options ``sparsify`` gets for this run: no density for a method that
    masks nothing, and the epoch's steps where the method's schedule reads them (for
    ``update_every: epoch``)."""
    options = engine_options(cfg)
    schedule = MASK_SCHEDULE.get(
        options.get("schedule", METHODS.get(cfg.method).defaults.get("schedule", "periodic"))
    )
    if steps_per_epoch is not None and "steps_per_epoch" in schedule.options:
        options["steps_per_epoch"] = steps_per_epoch
    return (cfg.density if schedule.masks else None), options


def engine_options(cfg: TrainConfig) -> dict[str, Any]:
    """The run's engine options in the engine's own types (module types, update_every)."""
    out: dict[str, Any] = {}
    for key, value in cfg.sparsity.items():
        if key in ("include", "exclude"):
            value = [_selector(v) for v in ([value] if isinstance(value, str) else value)]
        elif key == "update_every" and isinstance(value, str) and value != "epoch":
            try:
                value = int(value)
            except ValueError:
                raise ValueError(
                    f"update_every must be an integer >= 0 (optimizer steps between mask "
                    f"updates) or 'epoch', got {value!r}"
                ) from None
        out[key] = value
    return out


def _selector(value: str) -> str | type[nn.Module]:
    """``type:Embedding`` names a torch.nn module type; anything else is a name or pattern."""
    if not value.startswith("type:"):
        return value
    cls = getattr(nn, value[5:], None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{value!r}: torch.nn has no module type {value[5:]!r}")
    return cls


# settings of the machine, not of the run: a resumed run may change them (a study resumed with
# another --jobs gives its runs another thread count), and nothing trains differently
MACHINE_SETTINGS = ("threads", "workers", "data_dir", "download", "data_mirror", "tensorboard")


def jsonable(values: Mapping[str, Any]) -> dict[str, Any]:
    """Plain JSON/YAML values (tuples become lists), so that saved configs compare equal."""
    plain: dict[str, Any] = json.loads(json.dumps(dict(values)))
    return plain


def same_config(saved: Any, cfg: TrainConfig) -> bool:
    """``saved`` (a checkpoint's config) describes ``cfg``, machine settings apart; options
    added to sparselearn after the checkpoint was written count as their defaults."""
    if not isinstance(saved, dict):
        return False
    try:
        filled = TrainConfig.from_dict(saved).to_dict()
    except (TypeError, ValueError):
        return False
    ours = cfg.to_dict()
    for key in MACHINE_SETTINGS:
        filled.pop(key, None)
        ours.pop(key, None)
    return jsonable(filled) == jsonable(ours)
