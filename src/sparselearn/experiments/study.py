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

A method's settings may hold its own ``density``: a number, or ``same-nnz`` / ``same-flops``
with the spec's ``reference`` (a model): the density at which the run's model keeps as many
non-zero parameters as the dense reference, or costs as many training FLOPs per step
(:mod:`sparselearn.experiments.same_cost`), resolved from the run's own settings.

Each run lives in ``<out>/<model>/<method>/density-<d>/seed-<s>`` (dense: ``.../dense/seed-<s>``)
and is one ``sparselearn train`` process with one thread per job. ``{machine}`` in ``out``
stands for the machine the study runs on (:func:`sparselearn.kernels.machine.slug`): runs whose
purpose is their wall time on it are kept apart from those of other machines. A run with a
summary.json is finished and skipped; one with only a checkpoint is resumed. A study stopped
by Ctrl-C or SIGTERM stops its running trainings too (each keeps its checkpoint of the last
finished epoch), so that the same command resumes them instead of finding their folders still
in use.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from ..methods import METHODS
from ..schedules import MASK_SCHEDULE
from .config import TrainConfig
from .runs import dump_yaml, load_yaml, write_atomic

_SPEC_KEYS = {"out", "base", "models", "methods", "densities", "seeds", "reference"}


@dataclass(frozen=True)
class Run:
    folder: Path
    config: dict[str, Any]
    cost: float  # relative, to start the longest runs first


def _names(source: str, key: str, value: object, registry: Any) -> list[str]:
    """A list of registered names, each once."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{source}: {key} must be a non-empty list, got {value!r}")
    for name in value:
        if not isinstance(name, str):
            raise ValueError(f"{source}: {key} entries must be names, got {name!r}")
        try:
            registry.get(name)
        except ValueError as err:
            raise ValueError(f"{source}: {key}: {err}") from None
    _unique(source, key, value)
    return list(value)


def _unique(source: str, key: str, values: list[Any]) -> None:
    repeated = sorted({repr(v) for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(
            f"{source}: {key} lists {', '.join(repeated)} more than once (each would run twice "
            "into one folder)"
        )


def expand(spec: Mapping[str, Any], out: Path, source: str = "the study spec") -> list[Run]:
    """The runs a spec describes, every field and every run's configuration checked first (a
    mistake is reported now, naming ``source`` and the key, not two hours in)."""
    from ..models import MODELS

    if not isinstance(spec, Mapping):
        raise ValueError(f"{source}: expected a mapping with keys {sorted(_SPEC_KEYS)}")
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise ValueError(
            f"{source}: unknown study keys {sorted(unknown)}; expected {sorted(_SPEC_KEYS)}"
        )
    models = _names(source, "models", spec.get("models"), MODELS)
    base = spec.get("base") or {}
    if not isinstance(base, Mapping):
        raise ValueError(f"{source}: base must map settings to values, got {base!r}")
    methods = spec.get("methods")
    if not isinstance(methods, Mapping) or not methods:
        raise ValueError(
            f"{source}: methods must map method names to their settings ({{}} for none)"
        )
    seeds = spec.get("seeds")
    if (
        not isinstance(seeds, list)
        or not seeds
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)
    ):
        raise ValueError(
            f"{source}: seeds must be a non-empty list of integers >= 0, got {seeds!r}"
        )
    _unique(source, "seeds", seeds)
    densities = spec.get("densities")
    if densities is not None:
        if not isinstance(densities, list) or not all(_is_density(d) for d in densities):
            raise ValueError(
                f"{source}: densities must be a list of numbers in (0, 1], got {densities!r}"
            )
        _unique(source, "densities", densities)
    reference = spec.get("reference")
    if reference is not None:
        _names(source, "reference", [reference], MODELS)
    runs = []
    resolved: dict[str, float] = {}  # same-cost densities, once per entry
    for model in models:
        for key, extra in methods.items():
            if extra is not None and not isinstance(extra, Mapping):
                raise ValueError(
                    f"{source}: methods.{key} must map settings to values, got {extra!r}"
                )
            extra = dict(extra or {})
            method = extra.pop("method", key)
            if key != method:
                extra.setdefault("label", key)
            try:
                preset = METHODS.get(method)
            except ValueError as err:
                raise ValueError(f"{source}: methods.{key}: {err}") from None
            dense = MASK_SCHEDULE.get(preset.defaults.get("schedule", "periodic")).masks is False
            own = extra.pop("density", None)
            if dense and own is not None:
                raise ValueError(f"{source}: methods.{key}: {method!r} takes no density")
            if not dense and own is None and not densities:
                raise ValueError(f"{source}: method {method!r} needs densities in the spec")
            listed = list(densities or []) if own is None else [own]
            for density in [None] if dense else listed:
                for seed in seeds:
                    cfg = {**base, **extra, "model": model, "method": method, "seed": seed}
                    cfg["density"] = _density(source, key, density, cfg, reference, model, resolved)
                    try:
                        TrainConfig.from_dict(cfg)  # fail now, not two hours in
                    except (TypeError, ValueError) as err:
                        raise ValueError(f"{source}: methods.{key} on {model}: {err}") from None
                    sub = Path(model) / key
                    where = f"density-{cfg['density']}/seed-{seed}"
                    sub = sub / (f"seed-{seed}" if dense else where)
                    cost = 10.0 if "lenet5" in model or "wrn" in model or "vgg" in model else 1.0
                    if isinstance(cfg.get("epochs"), int):  # longer runs of one model first
                        cost *= cfg["epochs"]
                    runs.append(Run(out / sub, cfg, cost))
    # the costly runs first (they bound the study's length), and each seed's runs before the
    # next seed's: a study stopped early holds every cell, with fewer seeds
    return sorted(runs, key=lambda r: (-r.cost, seeds.index(r.config["seed"])))


def _is_density(value: object) -> TypeGuard[float]:
    """A number in (0, 1] (not a bool)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value <= 1


def _density(
    source: str,
    key: str,
    density: Any,
    cfg: dict[str, Any],
    reference: str | None,
    model: str,
    resolved: dict[str, float],
) -> float | None:
    """A run's density: the number given, or a same-cost view resolved for its settings (the
    same for every seed: resolved once, at the first seed's, and kept in ``resolved``)."""
    from . import same_cost

    if density is None or _is_density(density):
        return density
    if density not in same_cost.VIEWS:
        raise ValueError(
            f"{source}: methods.{key}: density must be a number in (0, 1] or one of "
            f"{', '.join(same_cost.VIEWS)}, got {density!r}"
        )
    if reference is None:
        raise ValueError(
            f"{source}: methods.{key}: density {density} needs the spec's reference (the dense "
            "model whose cost it matches)"
        )
    settings = {k: v for k, v in cfg.items() if k != "seed"}
    memo = repr((sorted(settings.items(), key=repr), reference, density))
    if memo not in resolved:
        try:
            resolved[memo] = same_cost.resolve({**cfg, "density": 0.5}, reference, density)
        except ValueError as err:
            raise ValueError(f"{source}: methods.{key} on {model}: {err}") from None
    return resolved[memo]


def _threads(run: Run, default: int) -> int:
    """The run's own thread count where its settings give one, else the study's share."""
    threads = run.config.get("threads")
    return int(threads) if threads is not None else default


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
        str(_threads(run, threads)),
        "--no-progress",
    ]
    return [*cmd, "--resume"] if resume else cmd


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so that the study can
    stop its runs; a signal handler can only be set from the main thread, elsewhere this does
    nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop(running: list[tuple[Run, subprocess.Popen[bytes], Any]], grace: float = 10.0) -> None:
    """Terminate the running trainings, then kill those still there after ``grace`` seconds.
    A training killed mid-epoch loses that epoch only: its checkpoint is written atomically at
    the end of each one."""
    for _, proc, _ in running:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + grace
    for _, proc, log in running:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


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
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ValueError(f"--jobs must be a positive integer (runs at a time), got {jobs!r}")
    spec = load_yaml(spec_path)
    where = spec.get("out")
    if where is not None and (not isinstance(where, str) or not where):
        raise ValueError(f"{spec_path}: out must be a folder name, got {where!r}")
    out = Path(out or where or "runs/study")
    if "{machine}" in str(out):  # runs kept per machine (the same-cost study's dense timings)
        from ..kernels.machine import slug

        out = Path(str(out).replace("{machine}", slug()))
    runs = expand(spec, out, str(spec_path))
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
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    running: list[tuple[Run, subprocess.Popen[bytes], Any]] = []
    failed: list[Path] = []
    started, done = time.perf_counter(), 0
    queue = list(todo)
    with _sigterm_as_interrupt():
        try:
            while queue or running:
                while queue and len(running) < jobs:
                    run = queue.pop(0)
                    run.folder.mkdir(parents=True, exist_ok=True)
                    write_atomic(run.folder / "study-config.yaml", dump_yaml(run.config))
                    resume = (run.folder / "checkpoint.pt").exists()
                    log = (run.folder / "train.log").open("ab")
                    run_env = {**env, "OMP_NUM_THREADS": str(_threads(run, threads))}
                    proc = subprocess.Popen(
                        _command(run, threads, resume), stdout=log, stderr=log, env=run_env
                    )
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
                        f"[{done}/{len(todo)}] {'FAILED ' if proc.returncode else ''}"
                        f"{run.folder} ({elapsed / 60:.1f} min)"
                    )
        except KeyboardInterrupt:
            _stop(running)
            say(
                f"study stopped: {len(running)} running training(s) stopped at their last "
                f"finished epoch, {len(queue)} not started; run the same command to resume"
            )
            raise
    say(
        f"study done in {(time.perf_counter() - started) / 60:.1f} min; "
        f"{len(failed)} failed" + "".join(f"\n  see {f / 'train.log'}" for f in failed)
    )
    return 1 if failed else 0
