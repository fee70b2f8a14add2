"""``sparselearn demo``: LeNet-300-100 on Fashion-MNIST: dense, sparse momentum at 5% with
masks, and the same method computing with the sparse weights (``--accelerate auto``).

Masks alone make nothing faster: the second run does the dense arithmetic and the engine's work
on top. The third trains with the sparse kernels (``sl.accelerate``); sparse momentum needs the
dense gradient only for the momentum of missing weights, so it runs with a momentum window (the
dense gradient in the 50 steps before each mask update, of 540; docs/results.md measures what a
window costs in accuracy).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .train import train

# (row name, run folder, TrainConfig settings)
RUNS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("dense", "dense", {"method": "dense", "density": None}),
    (
        "sparse momentum, masks",
        "sparse_momentum",
        {"method": "sparse_momentum", "density": 0.05, "sparsity": {"update_every": "epoch"}},
    ),
    (
        "sparse momentum, sparse kernels",
        "sparse_momentum-kernels",
        {
            "method": "sparse_momentum",
            "density": 0.05,
            "accelerate": "auto",
            "sparsity": {"update_every": "epoch", "momentum_window": 50},
        },
    ),
)


def demo(
    out: Path = Path("runs/demo"),
    epochs: int = 3,
    data_dir: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> int:
    """Train the three runs of ``RUNS``, then show them side by side. Progress and the table go
    to ``echo`` (one line per call; ``sparselearn demo`` prints them), or to the ``sparselearn``
    logger at INFO level."""
    say = echo or logging.getLogger("sparselearn").info
    folder = Path(out) / time.strftime("%Y%m%d-%H%M%S")  # never overwrite an earlier demo
    rows = []
    for name, sub, settings in RUNS:
        cfg = TrainConfig(
            model="lenet300-100",
            data="fashion-mnist",
            epochs=epochs,
            data_dir=data_dir,
            **settings,
        )
        density = settings["density"]
        say(
            f"training {name}{'' if density is None else f' at {density:.0%} density'} "
            f"for {epochs} epochs ..."
        )
        if settings.get("accelerate", "off") != "off":
            say("  (the sparse kernels are compiled on first use on a machine: about a minute)")
        rows.append((name, train(cfg, folder / sub)))

    dense = rows[0][1]
    header = (
        "run",
        "test accuracy",
        "active weights",
        "inference FLOPs vs dense",
        "training time",
        "vs dense",
    )
    table = [header]
    for name, s in rows:
        table.append(
            (
                name if s["method"] == "dense" else f"{name} ({s['density']:.0%})",
                f"{100 * s['test_acc']:.2f}%",
                f"{s['active_weights']:,} / {s['sparsified_weights']:,}",
                f"{100 * s['inference_flops']['sparse'] / dense['inference_flops']['dense']:.1f}%",
                f"{s['wall_time']:.1f} s",
                f"{dense['wall_time'] / s['wall_time']:.2f}x",
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    say("")
    for j, r in enumerate(table):
        say(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if j == 0:
            say("  ".join("-" * w for w in widths))
    say("")
    say(
        "training time: the epochs' training steps, evaluation excluded; vs dense: how many "
        "times faster than the dense run"
    )
    accelerated = folder / RUNS[2][1] / "acceleration.txt"
    say(f"which layers the sparse kernels took, dense and sparse ms each: {accelerated}")
    say(f"Run folders, with learning curves and per-layer density plots in plots/: {folder}/")
    for _, sub, _ in RUNS:
        say(f"  {folder / sub / 'plots'}")
    return 0
