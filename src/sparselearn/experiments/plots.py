"""Plots (matplotlib, imported on first use with a non-interactive backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._io import atomic_file


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Write a PNG atomically."""
    try:
        with atomic_file(path) as f:
            fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    finally:
        _pyplot().close(fig)


def plot_run(metrics: Sequence[Mapping[str, Any]], folder: Path) -> list[Path]:
    """Learning curves and per-layer density over training, as PNG files in ``folder``."""
    plt = _pyplot()
    epochs = [m["epoch"] for m in metrics]

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    trained = [m for m in metrics if m["train_loss"] is not None]
    ax_loss.plot(
        [m["epoch"] for m in trained], [m["train_loss"] for m in trained], label="train loss"
    )
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend()
    curves_of: tuple[tuple[str, str], ...]
    if "test_ppl" in metrics[0]:  # a language model: perplexity, lower is better
        curves_of = (("val_ppl", "validation"), ("test_ppl", "test"))
        scale, ylabel = 1.0, "perplexity"
    else:
        curves_of = (("train_acc", "train"), ("val_acc", "validation"), ("test_acc", "test"))
        scale, ylabel = 100.0, "accuracy (%)"
    for key, label in curves_of:
        points = [(m["epoch"], scale * m[key]) for m in metrics if m.get(key) is not None]
        if points:
            ax_acc.plot(*zip(*points, strict=True), label=label)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel(ylabel)
    ax_acc.legend()
    curves = folder / "learning_curves.png"
    save_figure(fig, curves)

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name in metrics[0]["layer_density"]:
        ax.plot(epochs, [100 * m["layer_density"][name] for m in metrics], label=name)
    ax.plot(epochs, [100 * m["density"] for m in metrics], "k--", label="all layers")
    ax.set_xlabel("epoch")
    ax.set_ylabel("density (%)")
    ax.set_yscale("log")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7)
    density = folder / "layer_density.png"
    save_figure(fig, density)
    return [curves, density]
