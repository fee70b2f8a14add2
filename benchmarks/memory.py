"""Peak memory of a whole training run, dense against sparse: the peak RSS of a fresh process per
configuration, construction, mask updates and optimizer state included.

Usage: ``make bench`` (or ``python benchmarks/memory.py --out docs/performance.md``).

Each configuration runs in a process of its own (a process's peak RSS never falls, so one
process per row is the only honest measure): an MLP 1024-W-W-W-10 (a dense row
builds it as ``nn.Linear`` layers are; a sparse row under ``torch.device("meta")``, then
``sl.sparsify`` and ``sl.accelerate(mode="sparse")``, which materialises the active weights
only, held with their optimizer state as CSR values), a few optimizer steps on
Fashion-MNIST images padded to 32x32 (1024 inputs), batch 64, with mask updates inside the run
(every ``--every`` steps). A sparse row builds the model on the meta device, so that no
dense weight ever exists. The row records the RSS before the model exists (the interpreter,
torch and the batches), after construction, and the peak over the whole run from there
(``VmHWM`` of ``/proc/self/status``, reset once the data is read). Writes its section of the
output file between markers and leaves the rest of the file alone.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# OpenMP reads its wait policy when it loads (see speed.py)
if os.environ.get("OMP_WAIT_POLICY") != "PASSIVE":
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for the sibling benchmark script
from benchmarks.mask_update import load_fashion_mnist, mlp, write_section
from benchmarks.speed import machine

import sparselearn as sl

START, END = "<!-- memory:start -->", "<!-- memory:end -->"
METHODS = ["static", "set", "rigl", "dsr", "sparse_momentum"]
OPTIMIZERS = ["sgd", "adamw"]
GIB = 1024**3


@dataclass(frozen=True)
class Config:
    method: str  # "dense" or a sparse method
    optimizer: str  # "sgd" (momentum 0.9) or "adamw"
    density: float
    width: int
    steps: int
    every: int
    batch: int


def _status(field: str) -> int | None:
    """A size of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return None


def rss_now() -> int:
    """This process's resident set now, in bytes."""
    rss = _status("VmRSS")
    if rss is None:
        raise RuntimeError("no VmRSS in /proc/self/status")
    return rss


def peak_rss() -> int:
    """This process's peak resident set since :func:`reset_peak`, in bytes."""
    peak = _status("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if peak is None else peak


def reset_peak() -> None:
    """Start the peak afresh from the RSS now (Linux: ``5`` into ``/proc/self/clear_refs``), so
    that reading the whole data file before the run does not count as the run's."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")


def optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=1e-3)


def run_one(cfg: Config) -> dict[str, float]:
    """One configuration, in this process: what its row records."""
    torch.manual_seed(0)
    data = [
        (F.pad(x.view(-1, 28, 28), (2, 2, 2, 2)).reshape(-1, 1024), y)
        for x, y in load_fashion_mnist(cfg.batch, cfg.steps)
    ]
    reset_peak()
    base = rss_now()
    if cfg.method == "dense":
        model = mlp(cfg.width, inputs=1024)
    else:
        with torch.device("meta"):  # never dense: sl.accelerate materialises the active weights
            model = mlp(cfg.width, inputs=1024)
    opt = optimizer(cfg.optimizer, model)
    engine = None
    if cfg.method != "dense":
        options: dict[str, object] = {"seed": 0}
        if cfg.method != "static":
            options["update_every"] = cfg.every
        if cfg.method == "sparse_momentum":
            options["momentum_window"] = min(2, cfg.every)  # dense gradients only before updates
        engine = sl.sparsify(model, opt, cfg.method, cfg.density, total_steps=cfg.steps, **options)
        sl.accelerate(model, engine, mode="sparse", live_rounds=0)
    built = rss_now()
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    updates = 0 if engine is None else sum(u.kind != "skipped" for u in engine.history)
    return {
        "base": base / GIB,
        "built": built / GIB,
        "peak": peak_rss() / GIB,
        "updates": updates,
    }


def measure(cfg: Config) -> dict[str, float]:
    """:func:`run_one` in a fresh process."""
    out = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps(cfg.__dict__)],
        capture_output=True,
        text=True,
        env=os.environ,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{cfg} failed:\n{out.stderr[-3000:]}")
    result: dict[str, float] = json.loads(out.stdout.splitlines()[-1])
    return result


def render(rows: list[tuple[Config, dict[str, float]]], args: argparse.Namespace) -> str:
    widths = sorted({c.width for c, _ in rows})
    lines = [
        START,
        "## Memory: peak RSS of a whole run",
        "",
        f"`python benchmarks/memory.py --widths {' '.join(map(str, widths))} --steps "
        f"{args.steps} --every {args.every}` (in `make bench`), on {machine()}. MLP "
        f"1024-W-W-W-10, batch {args.batch}, {args.steps} optimizer steps on Fashion-MNIST "
        f"(padded to 32x32), mask updates every {args.every} steps; each row is a fresh "
        "process. Sparse rows build the model on the meta device, then `sl.sparsify` and "
        '`sl.accelerate(mode="sparse")`, which materialises the active weights only (held with '
        "their optimizer state as CSR values); sparse momentum with `momentum_window=2`.",
    ]
    for width in widths:
        at = [(c, r) for c, r in rows if c.width == width]
        dense_adamw = next(
            (r for c, r in at if c.method == "dense" and c.optimizer == "adamw"), None
        )
        dense_weights = (1024 * width + 2 * width * width + width * 10) * 4 / GIB
        lines += [
            "",
            f"W = {width} ({dense_weights:.2f} GiB of dense fp32 weights):",
            "",
            "| method | optimizer | density | before the model (GiB) | after construction (GiB) "
            "| peak (GiB) | peak / dense AdamW | updates |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for cfg, r in at:
            ratio = f"{r['peak'] / dense_adamw['peak']:.2f}" if dense_adamw else "-"
            density = "1" if cfg.method == "dense" else f"{cfg.density:g}"
            lines.append(
                f"| {cfg.method} | {cfg.optimizer} | {density} | {r['base']:.2f} | "
                f"{r['built']:.2f} | {r['peak']:.2f} | {ratio} | {int(r['updates'])} |"
            )
    lines += [
        "",
        "*Before the model*: the interpreter, torch and the run's batches. *After construction*: "
        "once the model, the optimizer and (sparse rows) the engine and its accelerated layers "
        "exist, before the first step. *Peak*: the largest RSS from before the model to the end "
        "of the run (construction, steps and mask updates; reading the whole data file before "
        "it is not counted). A sparse model is never dense on the way: it is built on the meta "
        "device, and its mask updates score growth block by block of rows from the factors of "
        'the dense gradient (docs/architecture.md, "Mask updates in index form").',
        END,
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="markdown file to update")
    parser.add_argument("--widths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.05])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a row, in this process
    args = parser.parse_args()
    if args.one is not None:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
        print(json.dumps(run_one(Config(**json.loads(args.one)))), flush=True)
        return
    print(machine(), flush=True)
    configs = []
    for width in args.widths:
        configs += [
            Config("dense", opt, 1.0, width, args.steps, args.every, args.batch)
            for opt in OPTIMIZERS
        ]
        configs += [
            Config(method, opt, density, width, args.steps, args.every, args.batch)
            for density in args.densities
            for method in args.methods
            for opt in OPTIMIZERS
        ]
    rows = []
    for cfg in configs:
        result = measure(cfg)
        print(
            f"W={cfg.width} {cfg.method} {cfg.optimizer} {cfg.density:g}: built "
            f"{result['built']:.2f} GiB, peak {result['peak']:.2f} GiB, "
            f"{int(result['updates'])} updates",
            flush=True,
        )
        rows.append((cfg, result))
    section = render(rows, args)
    print(section)
    if args.out is not None:
        write_section(args.out, section, START, END)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
