"""``sparselearn demo``: LeNet-300-100 on Fashion-MNIST, dense and sparse momentum at 5%."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from .config import TrainConfig
from .train import train


def demo(
    out: Path = Path("runs/demo"),
    epochs: int = 3,
    data_dir: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> int:
    """Train dense and sparse momentum at 5%, then show both side by side. Progress and the
    table go to ``echo`` (one line per call; ``sparselearn demo`` prints them), or to the
    ``sparselearn`` logger at INFO level."""
    say = echo or logging.getLogger("sparselearn").info
    folder = Path(out) / time.strftime("%Y%m%d-%H%M%S")  # never overwrite an earlier demo
    rows = []
    for method, density, extra in (
        ("dense", None, {}),
        ("sparse_momentum", 0.05, {"update_every": "epoch"}),
    ):
        cfg = TrainConfig(
            model="lenet300-100",
            data="fashion-mnist",
            method=method,
            density=density,
            epochs=epochs,
            data_dir=data_dir,
            sparsity=extra,
        )
        say(
            f"training {method}{'' if density is None else f' at {density:.0%} density'} "
            f"for {epochs} epochs ..."
        )
        summary = train(cfg, folder / method)
        rows.append((method, summary))

    dense_flops = rows[0][1]["inference_flops"]["dense"]
    header = ("method", "test accuracy", "active weights", "inference FLOPs vs dense", "wall time")
    table = [header]
    for method, s in rows:
        table.append(
            (
                method if method == "dense" else f"{method} ({s['density']:.0%})",
                f"{100 * s['test_acc']:.2f}%",
                f"{s['active_weights']:,} / {s['sparsified_weights']:,}",
                f"{100 * s['inference_flops']['sparse'] / dense_flops:.1f}%",
                f"{s['wall_time']:.1f} s",
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
    say(f"Run folders, with learning curves and per-layer density plots in plots/: {folder}/")
    for method, _ in rows:
        say(f"  {folder / method / 'plots'}")
    return 0
