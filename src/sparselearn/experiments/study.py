"""A grid of runs (models x methods x densities x seeds), run in parallel, finished ones skipped.

Spec (YAML)::

    out: runs/fashion-mnist
    base: {data: fashion-mnist, epochs: 6}          # settings shared by every run
    models: [lenet300-100, lenet5]
    methods:                                        # method -> its own settings
      dense: {}
      sparse_momentum: {update_every: epoch}
      sm-window-50:                                 # a variant: a label with its method
        {method: sparse_momentum, update_every: epoch, momentum_window: 50}
    densities: [0.01, 0.05]                         # not used by dense
    seeds: [1, 2, 3]

Each run lives in ``<out>/<model>/<method>/density-<d>/seed-<s>`` (dense: ``.../dense/seed-<s>``)
and is one ``sparselearn train`` process with one thread per job. A run with a summary.json is
finished and skipped; one with only a checkpoint is resumed.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..methods import METHODS
from .config import TrainConfig
from .runs import dump_yaml, load_yaml, write_atomic

_SPEC_KEYS = {"out", "base", "models", "methods", "densities", "seeds"}


@dataclass(frozen=True)
class Run:
    folder: Path
    config: dict[str, Any]
    cost: float  # relative, to start the longest runs first


def expand(spec: Mapping[str, Any], out: Path) -> list[Run]:
    """The runs a spec describes (validated: every config must build a TrainConfig)."""
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise ValueError(f"unknown study keys {sorted(unknown)}; expected {sorted(_SPEC_KEYS)}")
    for key in ("models", "methods", "seeds"):
        if not spec.get(key):
            raise ValueError(f"the study spec needs a non-empty {key!r}")
    base = dict(spec.get("base") or {})
    methods: Mapping[str, Any] = spec["methods"]
    if not isinstance(methods, Mapping):
        raise ValueError("methods must map method names to their settings ({} for none)")
    runs = []
    for model in spec["models"]:
        for key, extra in methods.items():
            extra = dict(extra or {})
            method = extra.pop("method", key)
            if key != method:
                extra.setdefault("label", key)
            dense = METHODS.get(method).defaults.get("schedule") == "dense"
            densities = [None] if dense else list(spec.get("densities") or [])
            if not densities:
                raise ValueError(f"method {method!r} needs densities in the spec")
            for density in densities:
                for seed in spec["seeds"]:
                    cfg = {**base, **extra, "model": model, "method": method, "seed": seed}
                    cfg["density"] = density
                    TrainConfig.from_dict(cfg)  # fail now, not two hours in
                    sub = Path(model) / key
                    sub = sub / (f"seed-{seed}" if dense else f"density-{density}/seed-{seed}")
                    cost = 10.0 if "lenet5" in model or "wrn" in model or "vgg" in model else 1.0
                    runs.append(Run(out / sub, cfg, cost))
    return sorted(runs, key=lambda r: -r.cost)


def _command(run: Run, threads: int, resume: bool) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "sparselearn",
        "train",
        "--config",
        str(run.folder / "study-config.yaml"),
        "--out",
        str(run.folder),
        "--threads",
        str(threads),
        "--no-progress",
    ]
    return [*cmd, "--resume"] if resume else cmd


def run_study(
    spec_path: Path,
    out: Path | None = None,
    jobs: int | None = None,
    dry_run: bool = False,
    echo: Callable[[str], None] | None = None,
) -> int:
    """Run the spec's missing runs, ``jobs`` at a time; 0 if all succeeded, else 1.

    Progress goes to ``echo`` (one line per call; ``sparselearn study`` prints it), or to the
    ``sparselearn`` logger at INFO level.
    """
    say = echo or logging.getLogger("sparselearn").info
    spec = load_yaml(spec_path)
    out = Path(out or spec.get("out") or "runs/study")
    runs = expand(spec, out)
    todo = [r for r in runs if not (r.folder / "summary.json").exists()]
    jobs = jobs or os.cpu_count() or 1
    threads = max(1, (os.cpu_count() or 1) // jobs)
    say(
        f"study {spec_path}: {len(runs)} runs, {len(runs) - len(todo)} finished, "
        f"{len(todo)} to run, {jobs} at a time, {threads} thread(s) each, in {out}"
    )
    if dry_run:
        for r in todo:
            say(f"  {r.folder}")
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    running: list[tuple[Run, subprocess.Popen[bytes], Any]] = []
    failed: list[Path] = []
    started, done = time.perf_counter(), 0
    queue = list(todo)
    while queue or running:
        while queue and len(running) < jobs:
            run = queue.pop(0)
            run.folder.mkdir(parents=True, exist_ok=True)
            write_atomic(run.folder / "study-config.yaml", dump_yaml(run.config))
            resume = (run.folder / "checkpoint.pt").exists()
            log = (run.folder / "train.log").open("ab")
            proc = subprocess.Popen(_command(run, threads, resume), stdout=log, stderr=log, env=env)
            running.append((run, proc, log))
        time.sleep(0.5)
        for item in list(running):
            run, proc, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            done += 1
            if proc.returncode != 0:
                failed.append(run.folder)
            elapsed = time.perf_counter() - started
            say(
                f"[{done}/{len(todo)}] {'FAILED ' if proc.returncode else ''}{run.folder} "
                f"({elapsed / 60:.1f} min)"
            )
    say(
        f"study done in {(time.perf_counter() - started) / 60:.1f} min; "
        f"{len(failed)} failed" + "".join(f"\n  see {f / 'train.log'}" for f in failed)
    )
    return 1 if failed else 0
