"""FSDP2 (``fully_shard``): every rank keeps the masks of its own block of each weight, and the
selections across the blocks are the ones a single process makes.

Both ranks train on the same batches, so that the gradients FSDP averages are exactly the
one-process gradients ((g + g) / 2 = g in floating point): the sharded runs must then match a
one-process run bit for bit, masks and weights, for every preset and variant below.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.multiprocessing.spawn import spawn

import sparselearn as sl
from tests.helpers import MLP, batches, method_options

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")

WORLD = 2
STEPS = 12

# (name, method, extra options, optimizer): every preset, and the variants that take other
# paths through the selection (global criteria, a criterion that is not elementwise, an
# optimizer without momentum, Adam's momentum)
VARIANTS: list[tuple[str, str, dict[str, Any], str]] = [
    ("dense", "dense", {}, "sgd"),
    ("static", "static", {}, "sgd"),
    ("snip", "snip", {}, "sgd"),
    ("set", "set", {}, "sgd"),
    ("dsr", "dsr", {}, "sgd"),
    ("rigl", "rigl", {}, "sgd"),
    ("sparse_momentum", "sparse_momentum", {}, "sgd"),
    ("gmp", "gmp", {}, "sgd"),
    ("sm-adam", "sparse_momentum", {}, "adam"),
    ("sm-no-momentum", "sparse_momentum", {}, "sgd0"),
    ("sm-neuron", "sparse_momentum", {"growth": "momentum_neuron"}, "sgd"),
    (
        "sm-global",
        "sparse_momentum",
        {"growth": "global_momentum", "redistribution": "none"},
        "sgd",
    ),
    ("sm-window", "sparse_momentum", {"momentum_window": 2}, "sgd"),
    # scores with ties everywhere: the draw among them follows the global positions
    ("ties", "sparse_momentum", {"prune": "test-coarse", "growth": "test-constant"}, "sgd"),
    ("ties-global", "dsr", {"prune": "test-coarse-global"}, "sgd"),
    # a redistribution without sums over blocks: computed on the gathered weight
    ("whole-redistribution", "sparse_momentum", {"redistribution": "test-spread"}, "sgd"),
]


@sl.register_redistribution("test-spread")
def _spread(layer: sl.LayerView) -> float:
    """The standard deviation of the active weights (not a sum over positions)."""
    return float(layer.weight[layer.mask].std())


@sl.register_growth("test-constant", elementwise=True)
def _constant(layer: sl.LayerView) -> torch.Tensor:
    """Every missing weight scores the same: all of them are tied."""
    return torch.zeros_like(layer.weight)


@sl.register_prune("test-coarse", elementwise=True)
def _coarse(layer: sl.LayerView) -> torch.Tensor:
    """|w| in steps of 0.1: many ties among the active weights."""
    return (layer.weight.abs() * 10).floor()


@sl.register_prune("test-coarse-global", elementwise=True, scope="global")
def _coarse_global(layer: sl.LayerView) -> torch.Tensor:
    return (layer.weight.abs() * 10).floor()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return MLP(d_out=3)  # 3 output rows on 2 ranks: blocks of 2 and 1 rows


def _optimizer(model: nn.Module, kind: str) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=0.01)
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.0 if kind == "sgd0" else 0.9)


def _train(
    model: nn.Module, method: str, options: dict[str, Any], kind: str, start: int = 0
) -> tuple[sl.SparseEngine, torch.optim.Optimizer]:
    opt = _optimizer(model, kind)
    engine = sl.sparsify(model, opt, method=method, **method_options(method, STEPS), **options)
    _steps(model, opt, range(start, STEPS))
    return engine, opt


def _steps(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    data = list(batches("mlp", STEPS, seed=0))
    for i in steps:
        x, y = data[i]
        x = x[:, :20]
        y = y % 3
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (an all-gather)."""
    out: torch.Tensor = t.full_tensor()  # type: ignore[attr-defined]
    return out


def _init(rank: int, store: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)


def _finish() -> None:
    dist.barrier()
    dist.destroy_process_group()
    # leave without interpreter finalization (see tests/engine/test_distributed.py)
    os._exit(0)


def _sharded_worker(rank: int, store: str, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    _init(rank, store)
    results = {}
    for name, method, options, kind in VARIANTS:
        model = _model()
        fully_shard(model)
        engine, _ = _train(model, method, options, kind)
        full = {n: _whole(m) for n, m in engine.masks.items()}
        local = {layer.name: layer.mask for layer in engine.layers}
        results[name] = {
            "masks": full,
            "is_dtensor": all(type(m).__name__ == "DTensor" for m in engine.masks.values()),
            "local_rows": {n: m.shape[0] for n, m in local.items()},
            "weights": {n: _whole(p).detach() for n, p in model.named_parameters()},
            "active": {layer.name: layer.active for layer in engine.layers},
            "history": [(u.step, u.kind, u.pruned, u.grown) for u in engine.history],
            "verify": engine.verify_masks(),
        }
    torch.save(results, f"{out}/rank{rank}.pt")
    _finish()


def _reference(name: str, method: str, options: dict[str, Any], kind: str) -> dict[str, Any]:
    model = _model()
    engine, _ = _train(model, method, options, kind)
    return {
        "masks": {n: m.clone() for n, m in engine.masks.items()},
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
        "history": [(u.step, u.kind, u.pruned, u.grown) for u in engine.history],
    }


def test_sharded_runs_match_one_process_for_every_preset(tmp_path: Path) -> None:
    spawn(_sharded_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for name, method, options, kind in VARIANTS:
        want = _reference(name, method, options, kind)
        for r, got in enumerate(rank[name] for rank in ranks):
            where = (name, r)
            assert got["is_dtensor"], where
            # every rank holds its own block only: 32 rows split 16 + 16, 3 rows 2 + 1
            assert got["local_rows"] == {
                "fc1.weight": 16,
                "fc2.weight": 16,
                "fc3.weight": 2 - r,
            }, where
            assert got["verify"] == [], where
            assert got["history"] == want["history"], where
            for n, mask in want["masks"].items():
                assert torch.equal(got["masks"][n], mask), (*where, n)
                # the budget is exact: each layer's blocks add up to its count
                assert int(got["masks"][n].sum()) == got["active"][n], (*where, n)
                # inactive weights are exactly zero
                assert not got["weights"][n][~mask].any(), (*where, n)
            for n, w in want["weights"].items():
                assert torch.equal(got["weights"][n], w), (*where, n)
        if method != "dense" and method != "static":
            assert want["history"], name  # the variant did update its masks


def _resume_worker(rank: int, store: str, out: str) -> None:
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
    from torch.distributed.fsdp import fully_shard

    _init(rank, store)
    half = STEPS // 2
    # the first half, then a checkpoint: the model and optimizer with torch.distributed.checkpoint,
    # the engine's state (this rank's blocks of the masks) in a file of its own
    model = _model()
    fully_shard(model)
    opt = _optimizer(model, "sgd")
    engine = sl.sparsify(model, opt, **method_options("sparse_momentum", STEPS))
    _steps(model, opt, range(half))
    model_state, opt_state = get_state_dict(model, opt)
    dcp_save({"model": model_state, "optimizer": opt_state}, checkpoint_id=f"{out}/ckpt")
    torch.save(engine.state_dict(), f"{out}/engine-rank{rank}.pt")
    dist.barrier()

    # a fresh process's view: a new model and optimizer, restored, then the engine from its state
    model = _model()
    fully_shard(model)
    opt = _optimizer(model, "sgd")
    model_state, opt_state = get_state_dict(model, opt)
    loaded = {"model": model_state, "optimizer": opt_state}
    dcp_load(loaded, checkpoint_id=f"{out}/ckpt")
    set_state_dict(
        model, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"]
    )
    state = torch.load(f"{out}/engine-rank{rank}.pt", weights_only=True)
    engine = sl.sparsify(model, opt, **method_options("sparse_momentum", STEPS), state=state)
    _steps(model, opt, range(half, STEPS))
    wrong_rank = torch.load(f"{out}/engine-rank{1 - rank}.pt", weights_only=True)
    try:
        engine.load_state_dict(wrong_rank)
        refused = ""
    except ValueError as err:
        refused = str(err)
    torch.save(
        {
            "masks": {n: _whole(m) for n, m in engine.masks.items()},
            "weights": {n: _whole(p).detach() for n, p in model.named_parameters()},
            "history": [(u.step, u.kind, u.pruned, u.grown) for u in engine.history],
            "refused": refused,
        },
        f"{out}/rank{rank}.pt",
    )
    _finish()


def test_a_sharded_run_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    spawn(_resume_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD)
    want = _reference("sparse_momentum", "sparse_momentum", {}, "sgd")
    for r in range(WORLD):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert got["history"] == want["history"]
        for n, mask in want["masks"].items():
            assert torch.equal(got["masks"][n], mask), (r, n)
        for n, w in want["weights"].items():
            assert torch.equal(got["weights"][n], w), (r, n)
        # rank 1's blocks are not rank 0's: refused, saying what to do
        assert "over 2 ranks" in got["refused"], got["refused"]
        assert "per-rank files" in got["refused"]


def _run_script(tmp_path: Path, body: str) -> str:
    script = f"""
import torch, torch.distributed as dist
from torch import nn
dist.init_process_group("gloo", init_method="file://{tmp_path / "store"}", rank=0, world_size=1)
from torch.distributed.fsdp import fully_shard
import sparselearn as sl
{body}
dist.destroy_process_group()
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    return out.stdout


def test_layouts_the_engine_cannot_handle_are_refused_clearly(tmp_path: Path) -> None:
    out = _run_script(
        tmp_path,
        """
from torch.distributed.device_mesh import init_device_mesh

def attempt(label, call):
    try:
        call()
    except (TypeError, ValueError) as err:
        print(label + ":", err)

def sgd(m):
    return torch.optim.SGD(m.parameters(), lr=0.1)

model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
fully_shard(model[0])  # the root is not sharded: the last layer stays whole
attempt("mixed", lambda: sl.sparsify(model, sgd(model), "static", 0.5))
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("replicate", "shard"))
fully_shard(model, mesh=mesh)  # HSDP: a replicate dimension
attempt("hsdp", lambda: sl.sparsify(model, sgd(model), "static", 0.5))
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
fully_shard(model)
engine = sl.sparsify(model, sgd(model), "static", 0.5)
attempt("accelerate", lambda: sl.accelerate(model, engine))
attempt("export", lambda: sl.export(model, engine, "x.safetensors"))
attempt("save", lambda: sl.save("x.pt", model, engine=engine))
attempt("compact", lambda: sl.compact(model, engine, torch.randn(2, 8)))
state = engine.state_dict()
engine.remove()
plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
attempt("whole", lambda: sl.sparsify(plain, sgd(plain), "static", 0.5, state=state))
""",
    )
    said = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    assert said["mixed"].startswith("0.weight are sharded by fully_shard but 2.weight are not")
    assert "apply fully_shard to the root module" in said["mixed"]
    assert "on a 2-D mesh with placements ['Replicate()', 'Shard(dim=0)']" in said["hsdp"]
    assert "1-D device mesh" in said["hsdp"]
    for label in ("accelerate", "export", "save", "compact"):
        assert "this model is sharded by fully_shard" in said[label], label
    assert "get_model_state_dict" in said["accelerate"]
    assert "engine=None" in said["export"]
    assert "torch.distributed.checkpoint" in said["save"]
    assert said["whole"].startswith("this engine state was saved by one rank")


def test_the_fsdp_example_trains_and_resumes_under_torchrun(tmp_path: Path) -> None:
    from tests.datafiles import write_mnist_like

    data = write_mnist_like(tmp_path / "data", n_train=400, n_test=100)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPARSELEARN_DATA": str(data)}
    script = Path(__file__).resolve().parents[2] / "examples" / "fsdp_train.py"

    def run(*flags: str) -> list[str]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(script), "--epochs", "2", "--density", "0.1",
               *flags]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        return [line for line in out.stdout.splitlines() if line.startswith("epoch ")]

    whole = run("--out", str(tmp_path / "a"))
    assert len(whole) == 2
    assert "density 0.1000" in whole[1]
    assert sorted(p.name for p in (tmp_path / "a").glob("engine-rank*.pt")) == [
        "engine-rank0.pt",
        "engine-rank1.pt",
    ]
    first = run("--out", str(tmp_path / "b"), "--stop-after", "1")
    resumed = run("--out", str(tmp_path / "b"), "--resume")
    assert first == whole[:1]
    assert resumed == whole[1:]  # the same accuracy and counts as the uninterrupted run
