"""The training run behind ``sparselearn train``: one configuration, one run directory.

A run directory holds ``config.yaml`` (reload it with ``--config``), ``sparsity.yaml`` (the
engine's resolved options), ``metrics.jsonl`` (one row per epoch), ``checkpoint.pt`` (written
atomically after every epoch; ``--resume`` continues from it and reaches the same final numbers),
``summary.json`` and ``plots/``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import OPTION_NAMES, _check_unit, unknown_option_message
from .data.datasets import Data, load_dataset, steps_per_epoch
from .engine import SparseEngine, sparsify
from .flops import count_flops
from .methods import METHODS
from .models import create_model

CHECKPOINT_FORMAT = 1
# engine options the training run sets itself
_DERIVED = ("steps_per_epoch",)
SPARSITY_OPTIONS: tuple[str, ...] = tuple(o for o in OPTION_NAMES if o not in (*_DERIVED, "seed"))


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run. Defaults follow the sparse momentum paper's MNIST setup."""

    model: str = "lenet300-100"
    data: str = "fashion-mnist"
    method: str = "sparse_momentum"
    label: str | None = None  # the name shown in reports (default: the method)
    density: float | None = 0.05  # None for dense
    epochs: int = 100
    batch_size: int = 100
    optimizer: str = "sgd"  # sgd (Nesterov momentum) or adam
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    lr_schedule: str = "step"  # step, cosine or constant
    lr_milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of training (step schedule)
    lr_gamma: float = 0.1
    val_fraction: float = 0.1
    split_seed: int = 0
    augment: bool | None = None  # None: the dataset's default (CIFAR, ImageNet: on)
    seed: int = 1
    data_dir: str | None = None
    download: bool = True
    data_mirror: str | None = None
    image_size: int | None = None
    workers: int = 0
    threads: int | None = None
    device: str = "auto"
    amp: bool = False
    grad_clip: float | None = None
    accelerate: str = "off"
    eval_batch_size: int = 1000
    sparsity: Mapping[str, Any] = field(default_factory=dict)  # engine options that were set

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "eval_batch_size")
        for name in positive:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.lr_schedule not in ("step", "cosine", "constant"):
            raise ValueError(
                f"lr_schedule must be 'step', 'cosine' or 'constant', got {self.lr_schedule!r}"
            )
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if any(not 0 < m < 1 for m in self.lr_milestones):
            raise ValueError(
                f"lr_milestones are fractions of training in (0, 1), got {self.lr_milestones}"
            )
        if self.accelerate not in ("off", "auto", "sparse"):
            raise ValueError(
                f"accelerate must be 'off', 'auto' (time each layer, keep the faster) or "
                f"'sparse' (every supported layer), got {self.accelerate!r}"
            )
        if self.accelerate != "off" and self.amp:
            raise ValueError(
                "accelerate and amp cannot be combined: the sparse kernels compute in the "
                "weights' dtype (float32); drop one of them"
            )
        if self.density is not None:  # checked before any data is read
            _check_unit("density", self.density, low_open=True, high_open=False)
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        unknown = [k for k in self.sparsity if k not in SPARSITY_OPTIONS]
        if unknown:
            raise ValueError(unknown_option_message(unknown[0], SPARSITY_OPTIONS))
        object.__setattr__(self, "lr_milestones", tuple(self.lr_milestones))
        object.__setattr__(self, "sparsity", dict(self.sparsity))

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
        return cls(**run, sparsity=sparse)


# ----------------------------------------------------------------------------- building blocks


def engine_options(cfg: TrainConfig) -> dict[str, Any]:
    """The run's engine options in the engine's own types (module types, update_every)."""
    out: dict[str, Any] = {}
    for key, value in cfg.sparsity.items():
        if key in ("include", "exclude"):
            value = [_selector(v) for v in ([value] if isinstance(value, str) else value)]
        elif key == "update_every" and isinstance(value, str) and value != "epoch":
            value = int(value)
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


def lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total``."""
    progress = step / total
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.lr_schedule == "step":
        return cfg.lr * cfg.lr_gamma ** sum(progress >= m for m in cfg.lr_milestones)
    return cfg.lr


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Data, split: str, batch_size: int, device: torch.device
) -> float:
    """Top-1 accuracy on ``split``."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in data.batches(split, batch_size, shuffle=False, seed=0, epoch=0, augment=False):
        logits = model(x.to(device, non_blocking=True))
        correct += int((logits.argmax(1).cpu() == y).sum())
        total += len(y)
    model.train(was_training)
    return correct / total if total else float("nan")


class Progress:
    """A one-line progress bar on stderr when it is a terminal; silent otherwise."""

    def __init__(self, total_steps: int, enabled: bool | None = None) -> None:
        self.total = total_steps
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._last = 0.0

    def update(
        self, epoch: int, epochs: int, step: int, loss: float, acc: float, density: float
    ) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self._last < 0.2 and step < self.total):
            return
        self._last = now
        frac = step / self.total
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        sys.stderr.write(
            f"\r[{bar}] epoch {epoch}/{epochs} step {step}/{self.total} "
            f"loss {loss:.4f} acc {100 * acc:.2f}% density {density:.4f}"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


# ----------------------------------------------------------------------------- files


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a file so that a reader (or a crash) never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dump_yaml(values: Mapping[str, Any]) -> str:
    import yaml

    return str(yaml.safe_dump(dict(values), sort_keys=False, default_flow_style=None))


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    import yaml

    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


# ----------------------------------------------------------------------------- the run


def train(
    cfg: TrainConfig,
    out: str | os.PathLike[str],
    *,
    resume: bool = False,
    progress: bool | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train as ``cfg`` says, writing the run directory ``out``; returns the summary."""
    out = Path(out)
    checkpoint_path = out / "checkpoint.pt"
    if resume and not checkpoint_path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint in {out}")
    if not resume and (checkpoint_path.exists() or (out / "summary.json").exists()):
        raise FileExistsError(
            f"{out} already holds a run; pass --resume to continue it or choose another --out"
        )
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    data = load_dataset(
        cfg.data,
        cfg.data_dir,
        val_fraction=cfg.val_fraction,
        split_seed=cfg.split_seed,
        download=cfg.download,
        mirror=cfg.data_mirror,
        image_size=cfg.image_size,
    )
    if hasattr(data, "workers"):
        data.workers = cfg.workers
    augment = data.info.augment if cfg.augment is None else cfg.augment
    model = create_model(cfg.model, data.info.input_shape, data.info.num_classes).to(device)
    optimizer = make_optimizer(cfg, model)
    spe = steps_per_epoch(data, cfg.batch_size)
    total_steps = cfg.epochs * spe
    options = engine_options(cfg)
    schedule = options.get("schedule", METHODS.get(cfg.method).defaults.get("schedule"))
    if schedule in ("periodic", "gradual"):
        options["steps_per_epoch"] = spe  # lets update_every say "epoch"
    engine = sparsify(
        model,
        optimizer,
        method=cfg.method,
        density=None if schedule == "dense" else cfg.density,
        total_steps=total_steps,
        seed=cfg.seed,
        **options,
    )
    scaler = torch.amp.GradScaler(device.type) if cfg.amp and device.type == "cuda" else None
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    metrics: list[dict[str, Any]] = []
    start_epoch, wall = 0, 0.0
    state: dict[str, Any] | None = None
    if resume:
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT or not _same_config(state.get("config"), cfg):
            raise ValueError(
                f"{checkpoint_path} was written by a different configuration; resume with the "
                f"run's own config ({out / 'config.yaml'})"
            )
    accelerated: list[str] = []
    thread_caps: dict[str, int] = {}
    if cfg.accelerate != "off":
        saved = None
        if state is not None:
            # checkpoints from before thread caps hold only the names
            saved = (state["accelerated"], state.get("accelerated_threads", {}))
        accelerated, thread_caps = _accelerate(cfg, model, engine, data, device, saved, out)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        engine.load_state_dict(state["engine"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, wall = int(state["epoch"]), float(state["wall_time"])
        metrics = read_metrics(out)[: start_epoch + 1]  # the epoch-0 row, then one per epoch
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "config.yaml", dump_yaml(_jsonable(cfg.to_dict())))
        write_atomic(out / "sparsity.yaml", dump_yaml(engine.config.to_dict()))
        # epoch 0: where training starts (untrained accuracy, initial layer densities)
        metrics.append(
            {
                "epoch": 0,
                "step": 0,
                "train_loss": None,
                "train_acc": None,
                "val_acc": evaluate(model, data, "val", cfg.eval_batch_size, device)
                if data.size("val")
                else None,
                "test_acc": evaluate(model, data, "test", cfg.eval_batch_size, device),
                "density": engine.density(),
                "layer_density": engine.layer_densities(),
                "pruned": 0,
                "regrown": 0,
                "mask_updates": 0,
                "lr": lr_at(cfg, 0, total_steps),
                "prune_rate": engine.config.prune_rate_at(0)
                if engine.config.schedule == "periodic"
                else None,
                "epoch_seconds": 0.0,
                "wall_time": 0.0,
            }
        )

    bar = Progress(total_steps, progress)
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        seen = correct = 0
        loss_sum = 0.0
        step_before = engine.step
        for x, y in data.batches(
            "train", cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch, augment=augment
        ):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            lr = lr_at(cfg, engine.step, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=cfg.amp):
                logits = model(x)  # (B, classes)
                loss = nn.functional.cross_entropy(logits, y)
            if scaler is not None:
                scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
                scaler.unscale_(optimizer)
            else:
                loss.backward()  # type: ignore[no-untyped-call]
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            bar.update(
                epoch + 1,
                cfg.epochs,
                engine.step,
                loss_sum / seen,
                correct / seen,
                engine.density(),
            )
        wall += time.perf_counter() - t0

        updates = [u for u in engine.history if step_before < u.step <= engine.step]
        row = {
            "epoch": epoch + 1,
            "step": engine.step,
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "val_acc": evaluate(model, data, "val", cfg.eval_batch_size, device)
            if data.size("val")
            else None,
            "test_acc": evaluate(model, data, "test", cfg.eval_batch_size, device),
            "density": engine.density(),
            "layer_density": engine.layer_densities(),
            "pruned": sum(u.total_pruned for u in updates),
            "regrown": sum(u.total_grown for u in updates),
            "mask_updates": len(updates),
            "lr": lr_at(cfg, max(engine.step - 1, 0), total_steps),
            "prune_rate": engine.config.prune_rate_at(engine.step)
            if engine.config.schedule == "periodic"
            else None,
            "epoch_seconds": time.perf_counter() - t0,
            "wall_time": wall,
        }
        metrics.append(row)
        write_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in metrics))
        save_checkpoint(
            checkpoint_path,
            {
                "format": CHECKPOINT_FORMAT,
                "config": _jsonable(cfg.to_dict()),
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "engine": engine.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "torch_rng": torch.get_rng_state(),
                "wall_time": wall,
                "accelerated": accelerated,
                "accelerated_threads": thread_caps,
            },
        )
        if on_epoch is not None:
            on_epoch(row)
    bar.close()

    summary = summarize(cfg, model, engine, data, metrics)
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    from .plots import plot_run

    plot_run(metrics, out / "plots")
    engine.remove()
    return summary


def _same_config(saved: Any, cfg: TrainConfig) -> bool:
    """``saved`` (a checkpoint's config) describes ``cfg``; options added to sparselearn after
    the checkpoint was written count as their defaults."""
    if not isinstance(saved, dict):
        return False
    try:
        filled = TrainConfig.from_dict(saved).to_dict()
    except (TypeError, ValueError):
        return False
    return _jsonable(filled) == _jsonable(cfg.to_dict())


def _accelerate(
    cfg: TrainConfig,
    model: nn.Module,
    engine: SparseEngine,
    data: Any,
    device: torch.device,
    saved: tuple[list[str], dict[str, int]] | None,
    out: Path,
) -> tuple[list[str], dict[str, int]]:
    """``sl.accelerate`` for a run: timed on a real training batch (``auto``) or forced
    (``sparse``); a resumed run re-applies the layers and thread caps its first launch chose.
    The per-layer report goes to ``acceleration.txt``; returns the names of the accelerated
    weights and their thread caps (kept in the checkpoint)."""
    from .accel import accelerate

    # timing draws random inputs on the layers' device: keep the run's RNG, there too
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if saved is not None:
            report = accelerate(model, engine, mode="sparse", layers=saved[0], threads=saved[1])
        else:
            x = None
            if cfg.accelerate == "auto":
                batches = data.batches(
                    "train", cfg.batch_size, shuffle=False, seed=cfg.seed, epoch=0, augment=False
                )
                x = next(iter(batches))[0].to(device)
            report = accelerate(model, engine, example_input=x, mode=cfg.accelerate)
    if saved is None:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "acceleration.txt", f"{report}\n")
    return report.accelerated, report.thread_caps


def summarize(
    cfg: TrainConfig,
    model: nn.Module,
    engine: SparseEngine,
    data: Data,
    metrics: list[dict[str, Any]],
) -> dict[str, Any]:
    last = metrics[-1]
    flops = count_flops(model, data.info.input_shape, engine.masks)
    trained = [m for m in metrics if m["epoch"] > 0]
    vals = [m["val_acc"] for m in trained if m["val_acc"] is not None]
    best = max(range(len(vals)), key=vals.__getitem__) if vals else None
    active = sum(int(m.sum()) for m in engine.masks.values())
    return {
        "model": cfg.model,
        "data": cfg.data,
        "method": cfg.method,
        "label": cfg.label or cfg.method,
        "density": cfg.density if engine.config.schedule != "dense" else 1.0,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "test_acc": last["test_acc"],
        "val_acc": last["val_acc"],
        "best_val_acc": vals[best] if best is not None else None,
        "best_val_epoch": best + 1 if best is not None else None,
        "final_density": engine.density(),
        "active_weights": active,
        "sparsified_weights": sum(m.numel() for m in engine.masks.values()),
        "parameters": sum(p.numel() for p in model.parameters()),
        "inference_flops": {"dense": flops.dense, "sparse": flops.sparse, "ratio": flops.ratio},
        "wall_time": last["wall_time"],
        "steps": last["step"],
        "config": _jsonable(cfg.to_dict()),
        "sparsity": engine.config.to_dict(),
    }


def read_metrics(run: str | os.PathLike[str]) -> list[dict[str, Any]]:
    path = Path(run) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _jsonable(values: Mapping[str, Any]) -> dict[str, Any]:
    """Plain JSON/YAML values (tuples become lists), so that saved configs compare equal."""
    plain: dict[str, Any] = json.loads(json.dumps(dict(values)))
    return plain


def iter_runs(paths: list[str | os.PathLike[str]]) -> Iterator[Path]:
    """Run directories (those holding a summary.json) under ``paths``."""
    for p in map(Path, paths):
        if (p / "summary.json").exists():
            yield p
        else:
            yield from sorted(s.parent for s in p.rglob("summary.json"))
