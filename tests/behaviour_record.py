"""Fingerprints of what sparselearn computes, to check that a change of its code keeps every
result bit for bit.

``python -m tests.behaviour_record --write`` computes the records with the code checked out and
writes ``tests/records/behaviour.json`` (and, with ``--legacy``, the interrupted run directories
of ``tests/records/legacy-runs.tar.gz``, which later code must still resume). ``test_behaviour.py``
recomputes them and compares.

What is recorded: short runs of every preset, with SGD and with Adam, on an MLP, a small CNN
with BatchNorm and a recurrent model (hashes of the masks, of every weight and of the update
history); the same with the layers accelerated on the PyTorch backend (CSR storage in the
engine); the 2019 API; one ``sparselearn train`` run (metrics, summary, checkpoint); and the
legacy runs resumed to their end.

Bits depend on the arithmetic of the machine as well as on sparselearn's code. The records are
computed in a subprocess that pins it as far as PyTorch allows on x86-64: one thread, MKL's
conditional numerical reproducibility (``MKL_CBWR``), ATen's scalar CPU kernels, no oneDNN,
the PyTorch backend of the sparse kernels. ``fingerprint()`` hashes the dense operations the
runs are made of: where it differs from the recorded one, the machine computes differently and
the records cannot be compared there (the test says so and skips).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

DATA = Path(__file__).parent / "records"
RECORDS = DATA / "behaviour.json"
LEGACY = DATA / "legacy-runs.tar.gz"
REPO = Path(__file__).resolve().parents[1]

# The arithmetic the records are computed with (set before torch is imported).
ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MKL_CBWR": "COMPATIBLE",
    "ATEN_CPU_CAPABILITY": "default",
    "SPARSELEARN_BACKEND": "torch",
    "PYTHONHASHSEED": "0",
}

PRESETS = ("dense", "static", "snip", "set", "dsr", "rigl", "sparse_momentum", "gmp")
MODELS = ("mlp", "conv_bn", "lstm")
OPTIMIZERS = ("sgd", "adam")
STEPS = 12

# the legacy runs: interrupted after their first epoch, resumed to the third
LEGACY_RUNS: dict[str, list[str]] = {
    "sm": ["--method", "sparse_momentum", "--density", "0.1", "--update-every", "epoch"],
    "rigl-accelerated": [
        "--method",
        "rigl",
        "--density",
        "0.1",
        "--update-every",
        "5",
        "--accelerate",
        "sparse",
    ],
}
TRAIN_FLAGS = [
    "--model",
    "lenet300-100",
    "--data",
    "mnist",
    "--data-dir",
    "data/mnist",
    "--no-download",
    "--epochs",
    "3",
    "--batch-size",
    "50",
    "--eval-batch-size",
    "200",
    "--threads",
    "1",
]


def tensor_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def _exact(value: Any) -> Any:
    """JSON-able with floats written exactly (hex)."""
    if isinstance(value, float):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _exact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_exact(v) for v in value]
    return value


def fingerprint() -> str:
    """A hash of the dense operations the recorded runs are made of, on this machine."""
    g = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    lin = nn.Linear(20, 32)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    lstm = nn.LSTM(6, 12, num_layers=2, batch_first=True)
    with torch.no_grad():
        for p in [*lin.parameters(), *conv.parameters(), *lstm.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(16, 20, generator=g)
    lin(x).square().sum().backward()
    xc = torch.randn(4, 3, 8, 8, generator=g)
    conv(xc).square().sum().backward()
    xs = torch.randn(4, 7, 6, generator=g)
    lstm(xs)[0].square().sum().backward()
    for name, module in (("lin", lin), ("conv", conv), ("lstm", lstm)):
        for pname, p in module.named_parameters():
            assert p.grad is not None
            out[f"{name}.{pname}.grad"] = p.grad
    for cls in (torch.optim.SGD, torch.optim.Adam):
        params = [p for m in (lin, conv, lstm) for p in m.parameters()]
        opt = (
            cls(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
            if cls is torch.optim.SGD
            else cls(params, lr=1e-3, weight_decay=5e-4)
        )
        opt.step()
        opt.step()
        for i, p in enumerate(params):
            out[f"{cls.__name__}.{i}"] = p.detach().clone()
    dense = torch.randn(24, 20, generator=g) * (torch.rand(24, 20, generator=g) < 0.2)
    csr = dense.to_sparse_csr()
    b = torch.randn(20, 9, generator=g)
    out["csr_mm"] = csr @ b
    pattern = torch.sparse_csr_tensor(
        csr.crow_indices(), csr.col_indices(), torch.zeros_like(csr.values()), (24, 20)
    )
    out["sampled"] = torch.sparse.sampled_addmm(
        pattern, torch.randn(24, 9, generator=g), torch.randn(9, 20, generator=g), beta=0.0
    ).values()
    out["ce"] = nn.functional.cross_entropy(torch.randn(8, 5, generator=g), torch.arange(8) % 5)
    return tensor_hash(out)


# ----------------------------------------------------------------------------- the runs


def _optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    return torch.optim.Adam(model.parameters(), lr=0.01)


def _history(engine: Any) -> list[Any]:
    return [
        [u.step, u.kind, u.prune_rate, dict(u.pruned), dict(u.grown), u.density]
        for u in engine.history
    ]


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


def engine_run(model_kind: str, opt_kind: str, method: str, accelerated: bool) -> dict[str, Any]:
    import sparselearn as sl
    from tests import helpers

    torch.manual_seed(0)
    model = helpers.MODELS[model_kind]()
    optimizer = _optimizer(opt_kind, model)
    options = {**helpers.method_options(method, STEPS), **helpers.model_options(model_kind)}
    if accelerated and method == "sparse_momentum":
        options["momentum_window"] = 2
    engine = sl.sparsify(model, optimizer, method=method, seed=0, **options)
    if accelerated:
        sl.accelerate(model, engine, mode="sparse", backend="torch")
    for x, y in helpers.batches(model_kind, STEPS):
        helpers.train_step(model, optimizer, x, y)
    if method in ("set", "sparse_momentum") and not accelerated:
        engine.update_masks(prune_rate=0.25)  # one update by hand, outside the schedule
    return {
        "masks": tensor_hash(dict(engine.masks)),
        "weights": tensor_hash(_weights(model)),
        "history": _exact(_history(engine)),
        "step": engine.step,
        "density": _exact(engine.density()),
    }


def compat_runs() -> dict[str, Any]:
    from sparselearn.compat import CosineDecay, Masking
    from tests import helpers

    out = {}
    for prune, growth, redistribution in (
        ("magnitude", "momentum", "momentum"),
        ("SET", "random", "none"),
        ("global_magnitude", "global_momentum_growth", "none"),
        ("magnitude", "momentum_neuron", "nonzero"),
    ):
        torch.manual_seed(0)
        model = helpers.MLP()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        decay = CosineDecay(0.5, STEPS)
        mask = Masking(
            optimizer,
            prune_rate_decay=decay,
            prune_mode=prune,
            growth_mode=growth,
            redistribution_mode=redistribution,
            prune_every_k_steps=4,
        )
        mask.add_module(model, density=0.2)
        for x, y in helpers.batches("mlp", STEPS):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            mask.step()
        mask.at_end_of_epoch()
        out[f"{prune}-{growth}-{redistribution}"] = {
            "masks": tensor_hash(dict(mask.masks)),
            "weights": tensor_hash(_weights(model)),
        }
    return out


@contextlib.contextmanager
def _chdir(path: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _write_data(root: Path) -> None:
    from tests.datafiles import write_mnist_like

    write_mnist_like(root / "data" / "mnist", n_train=600, n_test=200)


def run_record(run: Path) -> dict[str, Any]:
    """What a finished run directory holds, without its timings."""
    from sparselearn.experiments.runs import read_metrics

    timing = {"epoch_seconds", "wall_time"}
    rows = [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(run)]
    summary = json.loads((run / "summary.json").read_text())
    summary.pop("wall_time")
    summary.pop("machine")  # what the wall time was taken on
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    return {
        "metrics": _exact(rows),
        "summary": _exact(summary),
        "model": tensor_hash(state["model"]),
        "masks": tensor_hash(_bool_masks(state)),
        "accelerated": state.get("accelerated"),
    }


def _bool_masks(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The engine state's masks as bool masks: an accelerated layer's is saved as its active
    positions, which its CSR row pointers (and its transpose's) give the shape of."""
    out = {}
    for name, saved in state["engine"]["masks"].items():
        if saved.dtype == torch.bool:
            out[name] = saved
            continue
        prefix = name.rsplit(".", 1)[0] + ".weight_sparse."
        rows = state["model"][prefix + "crow"].numel() - 1
        cols = state["model"][prefix + "crow_t"].numel() - 1
        mask = torch.zeros(rows * cols, dtype=torch.bool)
        mask[saved] = True
        out[name] = mask.view(rows, cols)
    return out


def train_run(root: Path) -> dict[str, Any]:
    from sparselearn.experiments.cli import main

    with _chdir(root):
        flags = [*TRAIN_FLAGS, "--method", "rigl", "--density", "0.1", "--update-every", "7"]
        assert main(["train", *flags, "--out", "runs/cli"]) == 0
        return run_record(root / "runs" / "cli")


class _InterruptedError(Exception):
    pass


def write_legacy_runs(root: Path, archive: Path) -> None:
    """Interrupted runs (checkpoint after epoch 1 of 3), packed into ``archive``."""
    from sparselearn.experiments.cli import build_parser, resolve_config
    from sparselearn.experiments.train import train

    def stop(row: dict[str, Any]) -> None:
        if row["epoch"] == 1:
            raise _InterruptedError

    with _chdir(root):
        for name, flags in LEGACY_RUNS.items():
            args = build_parser().parse_args(["train", *TRAIN_FLAGS, *flags])
            with contextlib.suppress(_InterruptedError):
                train(resolve_config(args), Path("runs") / name, progress=False, on_epoch=stop)
        with tarfile.open(archive, "w:gz") as tar:
            for name in LEGACY_RUNS:
                tar.add(Path("runs") / name, arcname=name)


def resume_legacy_runs(root: Path, archive: Path) -> dict[str, Any]:
    """Resume each legacy run to its end with the code checked out."""
    from sparselearn.experiments.config import TrainConfig
    from sparselearn.experiments.runs import load_yaml
    from sparselearn.experiments.train import train

    out = {}
    with _chdir(root):
        runs = Path("legacy")
        with tarfile.open(archive) as tar:
            tar.extractall(runs, filter="data")
        for name in LEGACY_RUNS:
            cfg = TrainConfig.from_dict(load_yaml(runs / name / "config.yaml"))
            train(cfg, runs / name, resume=True, progress=False)
            out[name] = run_record(runs / name)
    return out


def compute(root: Path, legacy: Path) -> dict[str, Any]:
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False  # type: ignore[assignment]
    records: dict[str, Any] = {"fingerprint": fingerprint(), "engine": {}, "accelerated": {}}
    for model_kind in MODELS:
        for opt_kind in OPTIMIZERS:
            for method in PRESETS:
                key = f"{model_kind}/{opt_kind}/{method}"
                records["engine"][key] = engine_run(model_kind, opt_kind, method, False)
    for model_kind in ("mlp", "conv_bn"):
        for method in PRESETS:
            if method in ("dense", "snip", "gmp"):
                continue  # start dense: nothing to accelerate before their pruning
            key = f"{model_kind}/sgd/{method}"
            records["accelerated"][key] = engine_run(model_kind, "sgd", method, True)
    records["compat"] = compat_runs()
    _write_data(root)
    records["train"] = train_run(root)
    records["legacy"] = resume_legacy_runs(root, legacy)
    return records


def compute_in_subprocess(tmp: Path, legacy: Path = LEGACY) -> dict[str, Any]:
    """:func:`compute` in a fresh interpreter with the pinned arithmetic (:data:`ENV`)."""
    env = {**os.environ, **ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    code = (
        "import json, sys\nfrom pathlib import Path\nfrom tests.behaviour_record import compute\n"
        "print(json.dumps(compute(Path(sys.argv[1]), Path(sys.argv[2]))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp), str(legacy)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"computing the records failed:\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="write tests/records/behaviour.json")
    parser.add_argument("--legacy", action="store_true", help="(re)write the legacy run archive")
    args = parser.parse_args()
    DATA.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.legacy:
            env = {**os.environ, **ENV, "PYTHONPATH": str(REPO)}
            code = (
                "import sys\nfrom pathlib import Path\nimport torch\n"
                "from tests.behaviour_record import _write_data, write_legacy_runs\n"
                "torch.set_num_threads(1); torch.backends.mkldnn.enabled = False\n"
                "_write_data(Path(sys.argv[1]))\n"
                "write_legacy_runs(Path(sys.argv[1]), Path(sys.argv[2]))"
            )
            subprocess.run(
                [sys.executable, "-c", code, str(Path(tmp) / "legacy"), str(LEGACY)],
                env=env,
                cwd=REPO,
                check=True,
            )
        records = compute_in_subprocess(Path(tmp) / "records")
    text = json.dumps(records, indent=1, sort_keys=True) + "\n"
    if args.write:
        RECORDS.write_text(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
