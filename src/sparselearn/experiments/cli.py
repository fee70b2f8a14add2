"""The ``sparselearn`` command: train, report, list, analyze, study, demo."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .. import __version__
from ..config import SparsityConfig
from .config import SPARSITY_OPTIONS, TrainConfig


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one ``sparselearn <command>: error: ...`` line, and where to look."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _float_or_none(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or none, got {text!r}") from None


def _update_every(text: str) -> int | str:
    """``--update-every``: optimizer steps (an integer >= 0) or ``epoch``."""
    if text == "epoch":
        return text
    try:
        steps = int(text)
    except ValueError:
        steps = -1
    if steps < 0:
        raise argparse.ArgumentTypeError(
            f"expected an integer >= 0 (optimizer steps between mask updates) or 'epoch', "
            f"got {text!r}"
        )
    return steps


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field and engine option, all defaulting to 'not given'."""
    for f in dataclasses.fields(TrainConfig):
        if f.name == "sparsity":
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        text = f.metadata["help"]
        if "(default" not in text:
            text = f"{text} (default: {_shown(default)})"
        kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": text}
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
    floats = ("start_at", "stop_at", "prune_rate", "prune_rate_min", "ema_decay", "neuron_ablation")
    engine_help = {f.name: f.metadata["help"] for f in dataclasses.fields(SparsityConfig)}
    for name in SPARSITY_OPTIONS:
        kw = {"default": argparse.SUPPRESS, "help": f"{engine_help[name]} (default: the method's)"}
        if name in floats:
            kw["type"] = float
        elif name in ("include", "exclude", "layer_density"):
            kw["nargs"] = "+"
        elif name in ("dense_first", "dense_last"):
            kw["action"] = argparse.BooleanOptionalAction
        elif name == "momentum_window":
            kw["type"] = int
        elif name == "update_every":
            kw["type"] = _update_every
        engine.add_argument(_flag(name), **kw)


def _options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    given = {k: v for k, v in vars(args).items() if k in _CONFIG_KEYS}
    if "layer_density" in given:
        pairs = {}
        for item in given["layer_density"]:
            name, sep, value = item.rpartition("=")
            try:
                if not sep:
                    raise ValueError
                pairs[name] = float(value)
            except ValueError:
                raise ValueError(
                    f"--layer-density expects NAME=DENSITY pairs, got {item!r}"
                ) from None
        given["layer_density"] = pairs
    return given


_CONFIG_KEYS = {f.name for f in dataclasses.fields(TrainConfig)} - {"sparsity"} | set(
    SPARSITY_OPTIONS
)


def _given(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """The settings the command line gave (the --config file, then the flags over it), and
    where each came from (for messages)."""
    from .runs import load_yaml

    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    if getattr(args, "config", None):
        for key, value in load_yaml(args.config).items():
            values[key], where[key] = value, f"{key} in {args.config}"
    for key, value in _options_from_args(args).items():
        values[key], where[key] = value, _flag(key)
    return values, where


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the --config file, then the flags given on the command line."""
    return TrainConfig.from_dict(_given(args)[0])


def cmd_train(args: argparse.Namespace) -> int:
    from .runs import load_yaml
    from .train import train

    values, where = _given(args)
    if args.resume:
        # a resumed run keeps its own settings: the flags given must agree with them
        out = args.out or default_run_dir(TrainConfig.from_dict(values))
        if not (out / "config.yaml").exists():
            raise FileNotFoundError(f"--resume: no run in {out} (it has no config.yaml)")
        cfg = resume_config(load_yaml(out / "config.yaml"), values, where, out)
    else:
        cfg = TrainConfig.from_dict(values)
        out = args.out or default_run_dir(cfg)
    shows_bar = sys.stderr.isatty() if args.progress is None else args.progress
    summary = train(
        cfg, out, resume=args.resume, progress=shows_bar, on_epoch=None if shows_bar else _epoch
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 reports
    if summary.get("metric") == "test_ppl":
        score = (
            f"test perplexity {summary['test_ppl']:.3f} ({summary['test_bpc']:.3f} bits per char)"
        )
    else:
        score = f"test accuracy {100 * summary['test_acc']:.2f}%"
    print(
        f"{cfg.model} {cfg.data} {cfg.method} density {summary['density']}: {score} after "
        f"{cfg.epochs} epochs ({summary['wall_time']:.0f} s); run in {out}"
    )
    return 0


def resume_config(
    saved: dict[str, Any], given: dict[str, Any], where: dict[str, str], out: Path
) -> TrainConfig:
    """The run's own configuration, with the machine settings given (threads, workers, where
    the data is); any other setting given must equal the run's, else an error names it."""
    from .config import MACHINE_SETTINGS, jsonable

    try:
        own = TrainConfig.from_dict(saved)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{out / 'config.yaml'} does not describe a run: {err}") from None
    values = own.to_dict()
    changed = []
    for key, value in given.items():
        if key in MACHINE_SETTINGS:
            values[key] = value
        elif jsonable({key: value}) != jsonable({key: values.get(key)}):
            changed.append(f"{where[key]} {_shown(value)} (the run has {_shown(values.get(key))})")
    if changed:
        allowed = ", ".join(_flag(k) for k in MACHINE_SETTINGS)
        raise ValueError(
            f"--resume continues {out} with its own settings, and {'; '.join(changed)}; drop "
            f"{'it' if len(changed) == 1 else 'them'} (only {allowed} may change on resume)"
        )
    return TrainConfig.from_dict(values)


def _epoch(row: dict[str, Any]) -> None:
    """One line per epoch, for logs (shown where no progress bar is)."""
    if "test_ppl" in row:
        val = "" if row["val_ppl"] is None else f", val perplexity {row['val_ppl']:.3f}"
        scores = f"{val}, test perplexity {row['test_ppl']:.3f}"
    else:
        val = "" if row["val_acc"] is None else f", val {100 * row['val_acc']:.2f}%"
        scores = f"{val}, test {100 * row['test_acc']:.2f}%"
    print(
        f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}, acc "
        f"{100 * row['train_acc']:.2f}%{scores}, density {row['density']:.4f}, "
        f"{row['mask_updates']} mask updates ({row['epoch_seconds']:.1f} s)",
        flush=True,
    )


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

    text = report(
        args.runs,
        markdown=args.markdown,
        plots=args.plots,
        section=args.section,
        wall_time=args.wall_time,
        claims=args.claims,
        structure_costs=args.structure_costs,
        learning_curves=args.curves,
        same_cost=args.same_cost,
    )
    print(text)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analyze import analyze

    print(analyze(args.runs, out=args.out, markdown=args.markdown, section=args.section))
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
    parser = _Parser(
        prog="sparselearn", description="Sparse training from scratch: experiments and reports."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log mask updates")
    parser.add_argument("--version", action="version", version=f"sparselearn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train one model", description="Train one model sparse.")
    p.add_argument("--config", help="YAML file with the same keys as the flags (default: none)")
    p.add_argument(
        "--out", type=Path, help="run directory (default: runs/<model>-<data>-<method>-...)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out with its own settings (flags given must agree with "
        "them, except --threads, --workers, --data-dir, --download, --data-mirror) "
        "(default: off, a new run)",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: when stderr is a terminal; without it, a line per epoch)",
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
    p.add_argument(
        "--wall-time",
        action="store_true",
        help="add a table of training wall time (default: the metric's table only)",
    )
    p.add_argument(
        "--claims",
        action="store_true",
        help="add the verdict on each of the paper's claims the runs can speak to",
    )
    p.add_argument(
        "--structure-costs",
        action="store_true",
        help="add what each structured variant (a row named METHOD-fan_in, METHOD-2_4) costs "
        "against the same method unstructured",
    )
    p.add_argument(
        "--curves",
        nargs="+",
        default=[],
        metavar="ROW@DENSITY",
        help="learning-curve figure of these rows, e.g. dense sparse_momentum@0.05 (with --plots)",
    )
    p.add_argument(
        "--same-cost",
        metavar="MODEL",
        help="instead, wider sparse models (rows METHOD-same-nnz, METHOD-same-flops) against "
        "dense MODEL (rows dense, dense-2x, ...) at the same steps and the same wall time, "
        "with a figure of quality against wall time (with --plots)",
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("list", help="registered models, datasets and methods")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("analyze", help="class specialisation of channels and neurons")
    p.add_argument("runs", nargs="+", help="run directories or folders holding them")
    p.add_argument("--out", type=Path, default=Path("runs/analysis"), help="histogram folder")
    p.add_argument("--markdown", type=Path, help="write the summary into this markdown file")
    p.add_argument(
        "--section",
        default="analysis",
        help="name of the marked section of --markdown to (re)write",
    )
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("study", help="run a grid of trainings in parallel, skipping finished runs")
    p.add_argument("spec", type=Path, help="study YAML (models, methods, densities, seeds, base)")
    p.add_argument("--out", type=Path, help="study folder (default: the spec's `out`)")
    p.add_argument("--jobs", type=int, help="runs at a time (default: the number of cores)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser(
        "demo",
        help="dense vs sparse momentum (masks, and sparse kernels) on Fashion-MNIST, side by side",
    )
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
    except KeyboardInterrupt:
        print(f"sparselearn {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # a full disk, a read-only folder, a missing file
        text = err.strerror if err.errno is not None and err.strerror else str(err)
        if err.filename is not None and str(err.filename) not in text:
            text = f"{err.filename}: {text}"
        print(f"sparselearn {args.command}: error: {text}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as err:
        print(f"sparselearn {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
