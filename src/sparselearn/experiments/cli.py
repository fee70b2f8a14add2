"""The ``sparselearn`` command: train, report, list, analyze, study, demo."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import SparsityConfig
from .config import SPARSITY_OPTIONS, TrainConfig


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _float_or_none(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field and engine option, all defaulting to 'not given'."""
    for f in dataclasses.fields(TrainConfig):
        if f.name == "sparsity":
            continue
        kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f.metadata["help"]}
        if f.type in ("bool", "bool | None"):
            kw["action"] = argparse.BooleanOptionalAction
        elif f.name == "lr_milestones":
            kw.update(nargs="+", type=float)
        elif f.type in ("int", "int | None"):
            kw["type"] = int
        elif f.type in ("float", "float | None"):
            kw["type"] = _float_or_none if "None" in str(f.type) else float
        p.add_argument(_flag(f.name), **kw)
    engine = p.add_argument_group("sparse training (engine options)")
    floats = ("start_at", "stop_at", "prune_rate", "prune_rate_min", "ema_decay")
    engine_help = {f.name: f.metadata["help"] for f in dataclasses.fields(SparsityConfig)}
    for name in SPARSITY_OPTIONS:
        kw = {"default": argparse.SUPPRESS, "help": engine_help[name]}
        if name in floats:
            kw["type"] = float
        elif name in ("include", "exclude", "layer_density"):
            kw["nargs"] = "+"
        elif name in ("dense_first", "dense_last"):
            kw["action"] = argparse.BooleanOptionalAction
        elif name == "momentum_window":
            kw["type"] = int
        engine.add_argument(_flag(name), **kw)


def _options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    given = {k: v for k, v in vars(args).items() if k in _CONFIG_KEYS}
    if "layer_density" in given:
        pairs = {}
        for item in given["layer_density"]:
            name, sep, value = item.rpartition("=")
            if not sep:
                raise SystemExit(f"--layer-density expects NAME=DENSITY pairs, got {item!r}")
            pairs[name] = float(value)
        given["layer_density"] = pairs
    return given


_CONFIG_KEYS = {f.name for f in dataclasses.fields(TrainConfig)} - {"sparsity"} | set(
    SPARSITY_OPTIONS
)


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the --config file, then the flags given on the command line."""
    from .runs import load_yaml

    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_yaml(args.config))
    values.update(_options_from_args(args))
    return TrainConfig.from_dict(values)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    cfg = resolve_config(args)
    out = args.out or default_run_dir(cfg)
    summary = train(
        cfg, out, resume=args.resume, progress=None if args.progress is None else args.progress
    )
    print(
        f"{cfg.model} {cfg.data} {cfg.method} density {summary['density']}: test accuracy "
        f"{100 * summary['test_acc']:.2f}% after {cfg.epochs} epochs "
        f"({summary['wall_time']:.0f} s); run in {out}"
    )
    return 0


def default_run_dir(cfg: TrainConfig) -> Path:
    density = "dense" if cfg.method == "dense" else f"d{cfg.density}"
    return Path("runs") / f"{cfg.model}-{cfg.data}-{cfg.method}-{density}-s{cfg.seed}"


def cmd_list(args: argparse.Namespace) -> int:
    import sparselearn as sl

    from ..data.datasets import DATASETS
    from ..models import list_models

    rows = {"models": list_models(), "datasets": DATASETS.names(), "methods": sl.methods()}
    for kind in ("prune", "growth", "redistribution", "init", "schedule", "prune_rate_schedule"):
        rows[kind] = sl.choices(kind)
    width = max(map(len, rows)) + 2
    for kind, names in rows.items():
        print(f"{kind + ':':{width}s}" + ", ".join(names))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import report

    text = report(args.runs, markdown=args.markdown, plots=args.plots, section=args.section)
    print(text)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analyze import analyze

    print(analyze(args.runs, out=args.out, markdown=args.markdown))
    return 0


def _echo(line: str) -> None:
    """Progress of a long command, shown as it happens (the library logs it otherwise)."""
    print(line, flush=True)


def cmd_study(args: argparse.Namespace) -> int:
    from .study import run_study

    return run_study(args.spec, out=args.out, jobs=args.jobs, dry_run=args.dry_run, echo=_echo)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import demo

    return demo(out=args.out, epochs=args.epochs, data_dir=args.data_dir, echo=_echo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparselearn", description="Sparse training from scratch: experiments and reports."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log mask updates")
    parser.add_argument("--version", action="version", version=f"sparselearn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one model", description="Train one model sparse.")
    p.add_argument("--config", help="YAML file with the same keys as the flags")
    p.add_argument("--out", type=Path, help="run directory (default: runs/<model>-<data>-...)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: when stderr is a terminal)",
    )
    _add_train_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("report", help="aggregate runs over seeds: table and plots")
    p.add_argument("runs", nargs="+", help="run directories or folders holding them")
    p.add_argument("--markdown", type=Path, help="write the table into this markdown file")
    p.add_argument("--plots", type=Path, help="folder for accuracy-versus-density plots")
    p.add_argument(
        "--section", default="report", help="name of the marked section of --markdown to (re)write"
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("list", help="registered models, datasets and methods")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("analyze", help="class specialisation of channels and neurons")
    p.add_argument("runs", nargs="+", help="run directories or folders holding them")
    p.add_argument("--out", type=Path, default=Path("runs/analysis"), help="histogram folder")
    p.add_argument("--markdown", type=Path, help="write the summary into this markdown file")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("study", help="run a grid of trainings in parallel, skipping finished runs")
    p.add_argument("spec", type=Path, help="study YAML (models, methods, densities, seeds, base)")
    p.add_argument("--out", type=Path, help="study folder (default: the spec's `out`)")
    p.add_argument("--jobs", type=int, help="runs at a time (default: the number of cores)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("demo", help="dense vs sparse momentum on Fashion-MNIST, side by side")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--data-dir", help="where Fashion-MNIST lives")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as err:
        print(f"sparselearn {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
