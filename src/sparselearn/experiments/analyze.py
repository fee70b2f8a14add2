"""``sparselearn analyze``: how class-specialised are the channels and neurons of a model?

For every convolutional channel and hidden neuron (the ReLU of each Conv and Linear layer except
the output layer), the mean absolute activation is computed per class on the test set. A unit's
class specialisation is the class selectivity index (Morcos et al. 2018):

    SI = (mu_max - mu_rest) / (mu_max + mu_rest)

where ``mu_max`` is its mean activation on its favourite class and ``mu_rest`` the mean over the
other classes: 0 when it responds to every class alike, 1 when it responds to one class only.
Units that never activate on the test set ("dead") are counted apart.

Each run's result is recorded beside its checkpoint, in ``selectivity.json``; where a run keeps
no checkpoint (the records of docs/results.md's studies keep none), the analysis reads that
record instead, so that its table and figure can be regenerated without the trained model.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..models import create_model
from .config import TrainConfig
from .report import replace_section
from .runs import iter_runs, load_yaml, read_json, write_atomic
from .train import load_data

START, END = "<!-- analysis:start -->", "<!-- analysis:end -->"  # the default section
RECORD = "selectivity.json"


@dataclass(frozen=True)
class LayerSpecialisation:
    layer: str
    selectivity: Tensor  # (live units,)
    dead: int


def selectivity(class_means: Tensor) -> Tensor:
    """Class selectivity index of each row of a (units, classes) matrix of mean activations."""
    k = class_means.shape[1]
    top = class_means.max(dim=1).values
    rest = (class_means.sum(dim=1) - top) / (k - 1)
    return (top - rest) / (top + rest)


def specialisation(run: Path, batch_size: int = 1000) -> list[LayerSpecialisation]:
    """Per-layer class selectivity of the trained model in ``run``: measured on its checkpoint
    and recorded in ``selectivity.json``, or read from that record where the run keeps no
    checkpoint."""
    run = Path(run)
    if not (run / "checkpoint.pt").exists():
        return _read_record(run)
    layers = _measure(run, batch_size)
    record = [
        # six decimals: the tables print three
        {
            "layer": x.layer,
            "dead": x.dead,
            "selectivity": [round(v, 6) for v in x.selectivity.tolist()],
        }
        for x in layers
    ]
    write_atomic(run / RECORD, json.dumps({"layers": record}) + "\n")
    return layers


def _read_record(run: Path) -> list[LayerSpecialisation]:
    path = run / RECORD
    if not path.exists():
        raise FileNotFoundError(
            f"{run} has no checkpoint.pt to analyze, and no {RECORD} measured on one: "
            "analyze needs the trained model"
        )
    record = read_json(path)  # not valid JSON: an error that names the file
    try:
        return [
            LayerSpecialisation(x["layer"], torch.tensor(x["selectivity"]), int(x["dead"]))
            for x in record["layers"]
        ]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"{path} is damaged ({err!r}); restore it, or the run's checkpoint.pt to measure again"
        ) from None


@torch.no_grad()
def _measure(run: Path, batch_size: int) -> list[LayerSpecialisation]:
    cfg = TrainConfig.from_dict(load_yaml(run / "config.yaml"))
    data = load_data(cfg)
    model = create_model(cfg.model, data.info.input_shape, data.info.num_classes)
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    model.eval()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    layers = layers[:-1]  # the output layer's units are the classes themselves
    k = data.info.num_classes
    sums = {n: torch.zeros(0) for n, _ in layers}
    counts = torch.zeros(k)
    labels: Tensor = torch.zeros(0, dtype=torch.long)

    def hook(name: str):  # type: ignore[no-untyped-def]
        def fn(_m: nn.Module, _i: object, out: Tensor) -> None:
            act = out.relu().abs()  # (B, C, H, W) or (B, units)
            per_unit = act.flatten(2).mean(2) if act.dim() > 2 else act  # (B, units)
            onehot = nn.functional.one_hot(labels, k).float()  # (B, classes)
            total = onehot.T @ per_unit  # (classes, units)
            sums[name] = total if sums[name].numel() == 0 else sums[name] + total

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers]
    try:
        for x, y in data.batches("test", batch_size, shuffle=False, seed=0, epoch=0, augment=False):
            labels = y
            counts += torch.bincount(y, minlength=k).float()
            model(x)
    finally:
        for h in handles:
            h.remove()
    out = []
    for name, _ in layers:
        means = (sums[name] / counts[:, None]).T  # (units, classes)
        live = means.sum(dim=1) > 0
        out.append(LayerSpecialisation(name, selectivity(means[live]), int((~live).sum())))
    return out


def analyze(
    paths: Sequence[str | os.PathLike[str]],
    *,
    out: Path | None = None,
    markdown: Path | None = None,
    section: str = "analysis",
) -> str:
    """Summary statistics per method and layer (pooled over the runs given), and histograms."""
    groups: dict[str, dict[str, list[LayerSpecialisation]]] = defaultdict(lambda: defaultdict(list))
    model_name = ""
    for run in iter_runs(list(paths)):
        s = read_json(run / "summary.json")
        label = s["method"] if s["method"] == "dense" else f"{s['method']} {100 * s['density']:g}%"
        model_name = s["model"]
        for layer in specialisation(run):
            groups[label][layer.layer].append(layer)
    if not groups:
        raise FileNotFoundError(f"no finished runs under {', '.join(map(str, paths))}")
    lines = [
        f"Class selectivity of {model_name} units on the test set (0: responds to all classes "
        "alike, 1: to one class only), pooled over seeds.",
        "",
        "| model | layer | units (dead) | mean | median | share above 0.5 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for label, by_layer in groups.items():
        for layer_name, items in by_layer.items():
            si = torch.cat([i.selectivity for i in items])
            dead = sum(i.dead for i in items)
            units = si.numel() + dead
            share = 100 * float((si > 0.5).float().mean())
            lines.append(
                f"| {label} | {layer_name} | {units} ({dead}) | {float(si.mean()):.3f} | "
                f"{float(si.median()):.3f} | {share:.1f}% |"
            )
    text = "\n".join(lines) + "\n"
    if out is not None:
        figure = _histograms(groups, out / f"{model_name}-class-selectivity.png")
        if markdown is not None:
            text += f"\n![class selectivity]({os.path.relpath(figure, markdown.parent)})\n"
    if markdown is not None:
        replace_section(markdown, f"<!-- {section}:start -->", f"<!-- {section}:end -->", text)
    return text


def _histograms(groups: dict[str, dict[str, list[LayerSpecialisation]]], path: Path) -> Path:
    from .plots import _pyplot, save_figure

    plt = _pyplot()
    layer_names = list(next(iter(groups.values())))
    fig, axes = plt.subplots(1, len(layer_names), figsize=(3.6 * len(layer_names), 3.2))
    axes = [axes] if len(layer_names) == 1 else list(axes)
    for ax, layer in zip(axes, layer_names, strict=True):
        for label, by_layer in groups.items():
            si = torch.cat([i.selectivity for i in by_layer.get(layer, [])])
            if si.numel():
                ax.hist(si.numpy(), bins=20, range=(0, 1), density=True, alpha=0.5, label=label)
        ax.set_title(layer)
        ax.set_xlabel("class selectivity")
    axes[0].set_ylabel("density of units")
    axes[0].legend(fontsize=8)
    save_figure(fig, path)
    return path
