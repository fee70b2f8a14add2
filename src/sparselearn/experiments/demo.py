"""``sparselearn demo``: Fashion-MNIST, dense against sparse momentum at 5%.

LeNet-300-100 three times: dense, sparse momentum with masks, and the same method computing
with the sparse weights (``--accelerate auto``). Masks alone make nothing faster: the second run
does the dense arithmetic and the engine's work on top. The third trains with the sparse kernels
(``sl.accelerate``); sparse momentum needs the dense gradient only for the momentum of missing
weights, so it runs with a momentum window (the dense gradient in the 50 steps before each mask
update, of 540; docs/results.md measures what a window costs in accuracy). LeNet-5 twice, dense
and sparse momentum with the sparse kernels: its convolutions hold most of its work, where the
small Linear layers of LeNet-300-100 leave little for sparsity to save next to the rest of a
training step. LeNet-5 trains with the gradient norm clipped at 5, as in docs/results.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .train import train

_KERNELS: dict[str, Any] = {
    "method": "sparse_momentum",
    "density": 0.05,
    "accelerate": "auto",
    "sparsity": {"update_every": "epoch", "momentum_window": 50},
}

# (model, row name, run folder, TrainConfig settings); each model's first run is its dense one
RUNS: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    ("lenet300-100", "dense", "dense", {"method": "dense", "density": None}),
    (
        "lenet300-100",
        "sparse momentum, masks",
        "sparse_momentum",
        {"method": "sparse_momentum", "density": 0.05, "sparsity": {"update_every": "epoch"}},
    ),
    ("lenet300-100", "sparse momentum, sparse kernels", "sparse_momentum-kernels", _KERNELS),
    ("lenet5", "dense", "lenet5-dense", {"method": "dense", "density": None, "grad_clip": 5.0}),
    (
        "lenet5",
        "sparse momentum, sparse kernels",
        "lenet5-sparse_momentum-kernels",
        {**_KERNELS, "grad_clip": 5.0},
    ),
)


def demo(
    out: Path = Path("runs/demo"),
    epochs: int = 3,
    data_dir: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> int:
    """Train the runs of ``RUNS``, then show them side by side. Progress and the table go
    to ``echo`` (one line per call; ``sparselearn demo`` prints them), or to the ``sparselearn``
    logger at INFO level."""
    say = echo or logging.getLogger("sparselearn").info
    folder = Path(out) / time.strftime("%Y%m%d-%H%M%S")  # never overwrite an earlier demo
    rows = []
    compiled = False  # the first run with the sparse kernels builds them
    for model, name, sub, settings in RUNS:
        cfg = TrainConfig(
            model=model,
            data="fashion-mnist",
            epochs=epochs,
            data_dir=data_dir,
            **settings,
        )
        density = settings["density"]
        say(
            f"training {model}, {name}{'' if density is None else f' at {density:.0%} density'} "
            f"for {epochs} epochs ..."
        )
        if settings.get("accelerate", "off") != "off" and not compiled:
            say("  (the sparse kernels are compiled on first use on a machine: about a minute)")
            compiled = True
        rows.append((model, name, train(cfg, folder / sub)))

    header = (
        "model",
        "run",
        "test accuracy",
        "active weights",
        "inference FLOPs vs dense",
        "training time",
        "vs dense",
    )
    table = [header]
    dense: dict[str, Any] = {}
    for model, name, s in rows:
        dense.setdefault(model, s)  # each model's first run is its dense one
        d = dense[model]
        table.append(
            (
                model,
                name if s["method"] == "dense" else f"{name} ({s['density']:.0%})",
                f"{100 * s['test_acc']:.2f}%",
                f"{s['active_weights']:,} / {s['sparsified_weights']:,}",
                f"{100 * s['inference_flops']['sparse'] / d['inference_flops']['dense']:.1f}%",
                f"{s['wall_time']:.1f} s",
                f"{d['wall_time'] / s['wall_time']:.2f}x",
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    say("")
    for j, r in enumerate(table):
        say(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if j == 0:
            say("  ".join("-" * w for w in widths))
    say("")
    say(
        "training time: the epochs' training steps, evaluation excluded; vs dense: how many "
        "times faster than the same model's dense run"
    )
    for _, _, sub, settings in RUNS:
        if settings.get("accelerate", "off") != "off":
            say(
                "which layers the sparse kernels took, dense and sparse ms each: "
                f"{folder / sub / 'acceleration.txt'}"
            )
    say(f"Run folders, with learning curves and per-layer density plots in plots/: {folder}/")
    for _, _, sub, _ in RUNS:
        say(f"  {folder / sub / 'plots'}")
    return 0
