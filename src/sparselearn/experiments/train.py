"""The training run behind ``sparselearn train``: one configuration, one run directory.

``train()`` reads top to bottom: set up (data, model, optimizer, engine, acceleration, a resumed
checkpoint), then per epoch the training pass, a metrics row and a checkpoint, then the summary.
The run directory (``runs.py``) holds ``config.yaml``, ``sparsity.yaml``, ``metrics.jsonl`` (one
row per epoch), ``checkpoint.pt`` (written atomically after every epoch; ``--resume`` continues
from it and reaches the same final numbers), ``summary.json`` and ``plots/``.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import checkpoint
from .._io import remove_stale_temps
from ..data.datasets import DATASETS, Data, load_dataset, steps_per_epoch
from ..engine import MaskUpdate, SparseEngine, sparsify
from ..flops import flops as training_flops
from ..kernels.machine import describe, resumed_on
from ..models import create_model
from .config import SPARSITY_OPTIONS, TrainConfig, engine_arguments, jsonable, same_config
from .optim import lr_at, make_optimizer
from .parallel import World, shard, world_from_environment
from .progress import Progress
from .runs import (
    dump_yaml,
    lock_run_dir,
    read_metrics,
    save_checkpoint,
    write_atomic,
    write_metrics,
)
from .tasks import task_of

if TYPE_CHECKING:
    from ..accel import AccelerationReport

__all__ = ["CHECKPOINT_FORMAT", "SPARSITY_OPTIONS", "TrainConfig", "evaluate", "train"]

CHECKPOINT_FORMAT = 1


def train(
    cfg: TrainConfig,
    out: str | os.PathLike[str],
    *,
    resume: bool = False,
    progress: bool | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train as ``cfg`` says, writing the run directory ``out``; returns the summary.

    The directory is locked while the run writes there (a second run into it is refused).
    """
    out = Path(out)
    device = resolve_device(cfg.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = _rank_device(device)
    world = world_from_environment(device)
    if world.parallel and cfg.accelerate != "off":
        raise ValueError(
            "--accelerate is not supported under torchrun yet: train data-parallel with "
            "dense layers (leave --accelerate off), or accelerate in one process"
        )
    _check_run_dir(out, resume)  # on every rank: each refuses what rank 0 would
    if not world.main:
        return _train(cfg, out, resume, None if progress is None else False, None, world, device)
    with lock_run_dir(out):
        remove_stale_temps(out / "plots")
        return _train(cfg, out, resume, progress, on_epoch, world, device)


def _rank_device(device: torch.device) -> torch.device:
    """Under torchrun, each rank's own GPU (``LOCAL_RANK``); the CPU stays the CPU."""
    if str(device) != "cuda":  # the CPU, or a GPU chosen by index
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def _train(
    cfg: TrainConfig,
    out: Path,
    resume: bool,
    progress: bool | None,
    on_epoch: Callable[[dict[str, Any]], None] | None,
    world: World,
    device: torch.device,
) -> dict[str, Any]:
    # ------------------------------------------------------------------ set up
    checkpoint_path = out / "checkpoint.pt"
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # the same model on every rank
    data = load_data(cfg)
    augment = data.info.augment if cfg.augment is None else cfg.augment
    model = create_model(cfg.model, data.info.input_shape, data.info.num_classes).to(device)
    optimizer = make_optimizer(cfg, model)
    epoch_steps = _epoch_steps(cfg, data)
    total_steps = cfg.epochs * epoch_steps
    engine = _sparsify(cfg, model, optimizer, epoch_steps, total_steps)
    # the forward of training goes through DDP (it averages the gradients across ranks); the
    # engine, evaluation and checkpoints use the model itself, so runs look like one process's
    net: nn.Module = DistributedDataParallel(model) if world.parallel else model
    scaler = torch.amp.GradScaler(device.type) if cfg.amp and device.type == "cuda" else None

    state: dict[str, Any] | None = None
    if resume:
        state = _load_checkpoint(checkpoint_path, device)
        if state.get("format") != CHECKPOINT_FORMAT or not same_config(state.get("config"), cfg):
            raise ValueError(
                f"{checkpoint_path} was written by a different configuration; resume with the "
                f"run's own config ({out / 'config.yaml'})"
            )
        written_by = int(state.get("world_size", 1))
        if written_by != world.size:
            how = (
                "in one process (without torchrun)"
                if written_by == 1
                else f"with torchrun --nproc_per_node {written_by}"
            )
            raise ValueError(
                f"{checkpoint_path} was written by {written_by} process(es) and this run has "
                f"{world.size}: resume it {how}"
            )
    report = None
    if cfg.accelerate != "off":
        saved = None
        if state is not None:
            # checkpoints from before thread caps (and inference choices) hold only the names
            saved = (
                state["accelerated"],
                state.get("accelerated_threads", {}),
                state.get("accelerated_inference_dense", []),
                state.get("accelerated_dense_steps", []),
            )
        report = _accelerate(cfg, model, engine, data, device, saved, out)

    start_epoch, wall = 0, 0.0
    machine = _machine(device)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        engine.load_state_dict(state["engine"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, wall = int(state["epoch"]), float(state["wall_time"])
        machine = resumed_on(state.get("machine", "unrecorded"), machine)
        metrics = read_metrics(out)[: start_epoch + 1]  # the epoch-0 row, then one per epoch
    else:
        if world.main:
            out.mkdir(parents=True, exist_ok=True)
            write_atomic(out / "config.yaml", dump_yaml(jsonable(cfg.to_dict())))
            write_atomic(out / "sparsity.yaml", dump_yaml(engine.config.to_dict()))
        # epoch 0: where training starts (untrained accuracy, initial layer densities)
        metrics = [_metrics_row(cfg, model, engine, data, device, total_steps, world, epoch=0)]
    board = _tensorboard(cfg, out, engine, state) if world.main else None
    if board is not None and state is None:
        board.log_metrics(metrics[0], step=0)

    # ------------------------------------------------------------------ epochs
    bar = Progress(total_steps, progress if world.main else False)
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        step_before = engine.step
        batches = itertools.islice(
            data.batches(
                "train", cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch, augment=augment
            ),
            epoch_steps,
        )
        loss, acc = _train_epoch(
            cfg, net, optimizer, engine, scaler, batches, device, bar, epoch, world
        )
        wall += time.perf_counter() - t0

        updates = [u for u in engine.history if step_before < u.step <= engine.step]
        row = _metrics_row(
            cfg,
            model,
            engine,
            data,
            device,
            total_steps,
            world,
            epoch=epoch + 1,
            train=(loss, acc),
            updates=updates,
            started=t0,
            wall=wall,
        )
        metrics.append(row)
        if board is not None:
            board.log_metrics(row, step=engine.step)
            board.flush()
        if not world.main:
            continue
        write_metrics(out, metrics)
        if report is not None and state is None:  # a resumed run keeps its first report
            write_atomic(out / "acceleration.txt", f"{report}\n")
        save_checkpoint(
            checkpoint_path,
            {
                "format": CHECKPOINT_FORMAT,
                "config": jsonable(cfg.to_dict()),
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "engine": engine.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "torch_rng": torch.get_rng_state(),
                "wall_time": wall,
                "machine": machine,
                # the choices as they stand (the check in the run may have changed some)
                "accelerated": report.accelerated if report else [],
                "accelerated_threads": report.thread_caps if report else {},
                "accelerated_inference_dense": report.inference_dense if report else [],
                "accelerated_dense_steps": report.dense_steps if report else [],
                "ever_active": board.ever_active() if board is not None else None,
                "world_size": world.size,
            },
        )
        if on_epoch is not None:
            on_epoch(row)
    bar.close()
    if board is not None:
        board.close()

    # ------------------------------------------------------------------ the end
    summary = summarize(cfg, model, engine, data, metrics, machine)
    if world.main:
        write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        from .plots import plot_run

        plot_run(metrics, out / "plots")
    world.barrier()  # the others wait until the run directory is complete
    engine.remove()
    return summary


# ----------------------------------------------------------------------------- the pieces


def _machine(device: torch.device) -> str:
    """What the run's wall time is measured on: the CPU and the kernel build
    (:func:`sparselearn.kernels.machine.describe`), or the GPU."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return describe()


def _tensorboard(
    cfg: TrainConfig, out: Path, engine: SparseEngine, state: dict[str, Any] | None
) -> Any:
    """The run's TensorBoard logger (``--tensorboard``), or None. Metrics are logged at the
    optimizer step that ends their epoch, mask updates at theirs; a resumed run drops what the
    interrupted one logged after its last checkpoint and continues the record of weights ever
    active from the checkpoint."""
    if not cfg.tensorboard:
        return None
    try:
        from ..integrations.tensorboard import TensorBoardLogger
    except ImportError as err:
        raise RuntimeError(
            f"--tensorboard needs TensorBoard ({err}); install it with "
            "pip install 'sparselearn[tensorboard]', or train without --tensorboard"
        ) from None
    # what was logged after the checkpoint's step is dropped (the run repeats it)
    resumed_at = int(state["engine"]["step"]) + 1 if state is not None else None
    ever = state.get("ever_active") if state is not None else None
    board = TensorBoardLogger(out / "tensorboard", purge_step=resumed_at)
    board.watch(engine, ever_active=ever)
    return board


def _load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """A run's checkpoint; an empty, truncated or foreign file is an error that names it."""
    try:
        state = checkpoint.load(path, map_location=device)
    except checkpoint.DamagedFileError as err:
        raise ValueError(f"{err}; the run cannot resume from it: start it anew elsewhere") from None
    missing = [k for k in ("model", "optimizer", "engine", "epoch", "torch_rng") if k not in state]
    if missing:
        raise ValueError(f"{path} is not a complete checkpoint: it lacks {', '.join(missing)}")
    return state


def _check_run_dir(out: Path, resume: bool) -> None:
    if resume and not (out / "checkpoint.pt").exists():
        raise FileNotFoundError(f"--resume: no checkpoint in {out}")
    if not resume and ((out / "checkpoint.pt").exists() or (out / "summary.json").exists()):
        raise FileExistsError(
            f"{out} already holds a run; pass --resume to continue it or choose another --out"
        )


def load_data(cfg: TrainConfig) -> Data:
    """The run's data as its configuration names it (what training and analysis both read)."""
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
    return data


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def _epoch_steps(cfg: TrainConfig, data: Data) -> int:
    """Optimizer steps per epoch: the batches of the training split, or ``cfg.steps_per_epoch``
    of them; asking for more batches than the split has is an error."""
    whole = steps_per_epoch(data, cfg.batch_size)
    if cfg.steps_per_epoch is None:
        return whole
    if cfg.steps_per_epoch > whole:
        raise ValueError(
            f"steps_per_epoch {cfg.steps_per_epoch} is more than the {whole} batches of "
            f"{cfg.batch_size} that the training split of {cfg.data} holds "
            f"({data.size('train')} samples); ask for at most {whole}, or leave it unset"
        )
    return cfg.steps_per_epoch


def _sparsify(
    cfg: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch_steps: int,
    total: int,
) -> SparseEngine:
    density, options = engine_arguments(cfg, epoch_steps)
    return sparsify(
        model,
        optimizer,
        method=cfg.method,
        density=density,
        total_steps=total,
        seed=cfg.seed,
        **options,
    )


def _train_epoch(
    cfg: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    engine: SparseEngine,
    scaler: torch.amp.GradScaler | None,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    bar: Progress,
    epoch: int,
    world: World,
) -> tuple[float, float]:
    """Epoch ``epoch`` (0-based): one pass over the training batches; returns the mean loss
    and the accuracy (of next-token predictions, for text). Under data parallelism each rank
    computes on its share of every global batch, with the loss scaled so that the averaged
    gradient is the whole batch's."""
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    task = task_of(cfg_task(cfg))
    seen = correct = 0
    loss_sum = 0.0
    for x, y in batches:
        total = task.count(y)
        x, y = shard(world, x, y)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        lr = lr_at(cfg, engine.step, bar.total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=cfg.amp):
            logits = model(x)  # (B, classes), or (B, T, vocab) for text
            if world.parallel:  # DDP averages over ranks: scaled, the whole batch's mean
                loss = task.loss(logits, y, reduction="sum") * (world.size / total)
            else:
                loss = task.loss(logits, y)
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
            optimizer.step()  # the engine's hooks mask and update here
        n = task.count(y)  # samples, or predicted tokens
        loss_sum += float(loss.detach()) * (total / world.size if world.parallel else n)
        correct += int((logits.argmax(-1) == y).sum())
        seen += n
        bar.update(
            epoch + 1,
            cfg.epochs,
            engine.step,
            loss_sum / max(seen, 1),
            correct / max(seen, 1),
            engine.density(),
        )
    loss_sum, correct_f, seen_f = world.sum(loss_sum, correct, seen)
    return loss_sum / seen_f, correct_f / seen_f


def evaluate(
    model: nn.Module, data: Data, split: str, batch_size: int, device: torch.device
) -> float:
    """Top-1 accuracy on ``split`` (classification)."""
    acc = task_of(data.info.task).evaluate(model, data, split, batch_size, device)["acc"]
    assert acc is not None
    return acc


def cfg_task(cfg: TrainConfig) -> str:
    return DATASETS.get(cfg.data).task


def _evaluation(
    cfg: TrainConfig, model: nn.Module, data: Data, device: torch.device, world: World
) -> dict[str, Any]:
    """The metrics row's evaluation: ``val_acc``, ``test_acc``; for text ``val_loss``,
    ``val_ppl``, ``val_bpc`` and the same for ``test``."""
    task = task_of(data.info.task)
    out: dict[str, Any] = {}
    for split in ("val", "test"):
        if split == "val" and not data.size("val"):
            values: dict[str, Any] = dict.fromkeys(task.evaluate_keys)
        else:
            values = task.evaluate(model, data, split, cfg.eval_batch_size, device, world)
        out.update({f"{split}_{k}": v for k, v in values.items()})
    return out


def _metrics_row(
    cfg: TrainConfig,
    model: nn.Module,
    engine: SparseEngine,
    data: Data,
    device: torch.device,
    total_steps: int,
    world: World,
    *,
    epoch: int,
    train: tuple[float, float] | None = None,
    updates: list[MaskUpdate] | None = None,
    started: float | None = None,
    wall: float = 0.0,
) -> dict[str, Any]:
    """One row of ``metrics.jsonl``: after ``epoch`` epochs (0: the untrained model)."""
    updates = updates or []
    return {
        "epoch": epoch,
        "step": engine.step,
        "train_loss": None if train is None else train[0],
        "train_acc": None if train is None else train[1],
        **_evaluation(cfg, model, data, device, world),
        "density": engine.density(),
        "layer_density": engine.layer_densities(),
        "pruned": sum(u.total_pruned for u in updates),
        "regrown": sum(u.total_grown for u in updates),
        "mask_updates": len(updates),
        "lr": lr_at(cfg, max(engine.step - 1, 0), total_steps),
        "prune_rate": engine.schedule.prune_rate(engine.config, engine.step),
        "epoch_seconds": 0.0 if started is None else time.perf_counter() - started,
        "wall_time": wall,
    }


def _accelerate(
    cfg: TrainConfig,
    model: nn.Module,
    engine: SparseEngine,
    data: Any,
    device: torch.device,
    saved: tuple[list[str], dict[str, int], list[str], list[str]] | None,
    out: Path,
) -> AccelerationReport:
    """``sl.accelerate`` for a run: timed on a real training batch (``auto``) or forced
    (``sparse``); a resumed run re-applies the layers, thread caps, inference and steps'
    choices that the checkpoint holds. The per-layer report goes to ``acceleration.txt``
    (written again at each checkpoint: the check in the run fills it in); returns it."""
    from ..accel import accelerate

    # timing draws random inputs on the layers' device: keep the run's RNG, there too
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if saved is not None:
            report = accelerate(
                model,
                engine,
                mode="sparse",
                layers=saved[0],
                threads=saved[1],
                inference_dense=saved[2],
                dense_steps=saved[3],
            )
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
    return report


def summarize(
    cfg: TrainConfig,
    model: nn.Module,
    engine: SparseEngine,
    data: Data,
    metrics: list[dict[str, Any]],
    machine: str | None = None,
) -> dict[str, Any]:
    """The run's ``summary.json``; ``machine`` is what its wall time was taken on (see
    :func:`_machine`)."""
    last = metrics[-1]
    task = task_of(data.info.task)
    dtype = torch.long if task.name == "language" else None
    flops = training_flops(model, engine, data.info.input_shape, dtype=dtype)
    samples = last["step"] * cfg.batch_size  # (one process's: each DDP rank trains as many)
    trained = [m for m in metrics if m["epoch"] > 0]
    key = "val_acc" if task.name == "classify" else "val_ppl"
    vals = [m[key] for m in trained if m[key] is not None]
    pick = max if task.higher_is_better else min
    best = pick(range(len(vals)), key=vals.__getitem__) if vals else None
    active = sum(int(m.sum()) for m in engine.masks.values())
    # non-zero parameters: the active weights and every other parameter in full (an
    # accelerated layer's parameter holds its active weights only)
    nonzero = sum(
        int(engine.masks[n].sum()) if n in engine.masks else p.numel()
        for n, p in model.named_parameters()
    )
    scores: dict[str, Any] = {}
    if task.name == "classify":
        scores = {"test_acc": last["test_acc"], "val_acc": last["val_acc"]}
    else:
        scores = {f"{s}_{k}": last[f"{s}_{k}"] for s in ("test", "val") for k in task.evaluate_keys}
        scores["metric"] = task.score
        scores["data_provenance"] = getattr(data, "provenance", None)
    return {
        "model": cfg.model,
        "data": cfg.data,
        "method": cfg.method,
        "label": cfg.label or cfg.method,
        "density": cfg.density if engine.schedule.masks else 1.0,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        **scores,
        f"best_{key}": vals[best] if best is not None else None,
        "best_val_epoch": best + 1 if best is not None else None,
        "final_density": engine.density(),
        "active_weights": active,
        "sparsified_weights": sum(m.numel() for m in engine.masks.values()),
        "parameters": sum(p.numel() for p in model.parameters()),
        "nonzero_parameters": nonzero,
        "inference_flops": {
            "dense": flops.total("inference_dense"),
            "sparse": flops.total("inference_sparse"),
            "ratio": flops.total("inference_sparse") / max(1, flops.total("inference_dense")),
        },
        # a training step's FLOPs per sample as the engine computes it, attention included
        # (sparselearn.flops), and the run's: what comparisons at equal training cost use
        "training_flops": {
            "per_sample": flops.train_sparse_total,
            "dense_per_sample": flops.train_dense_total,
            "attention_per_sample": 3 * flops.attention,
            "dense_gradient_share": flops.dense_gradient_share,
            "samples": samples,
            "total": flops.train_sparse_total * samples,
        },
        "wall_time": last["wall_time"],
        "machine": machine,
        "steps": last["step"],
        "config": jsonable(cfg.to_dict()),
        "sparsity": engine.config.to_dict(),
    }
