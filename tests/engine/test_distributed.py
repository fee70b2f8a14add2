"""Data-parallel training: every rank holds identical masks, even when ranks seed differently."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.multiprocessing.spawn import spawn
from torch.nn.parallel import DistributedDataParallel

import sparselearn as sl
from tests.helpers import MLP, batches

WORLD = 2


def _worker(rank: int, store: str, out: str, method: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(100 + rank)  # ranks seeded differently, as data loading often is
        model = DistributedDataParallel(MLP())  # DDP copies rank 0's weights to every rank
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        method, _, structure = method.partition("/")  # "sparse_momentum/fan_in": structured
        options: dict[str, object] = {"update_every": 3} if method != "static" else {}
        if structure:
            options["structure"] = structure
        engine = sl.sparsify(model, opt, method=method, density=0.2, total_steps=12, **options)
        initial = {n: m.clone() for n, m in engine.masks.items()}
        for x, y in batches("mlp", 12, seed=rank):  # each rank sees different data
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        torch.save(
            {
                "initial": initial,
                "masks": dict(engine.masks),
                "weights": {n: p.detach() for n, p in model.named_parameters()},
                "history": [u.step for u in engine.history],
            },
            f"{out}/rank{rank}.pt",
        )
        dist.barrier()  # tearing gloo down while the peer still talks aborts the process
    finally:
        dist.destroy_process_group()
    # leave without interpreter finalization: gloo's threads can still hold objects then, and
    # tearing those down at exit aborted a rank now and then (SIGABRT, "terminate called
    # without an active exception", about 1 run in 40 here; cf. pytorch/pytorch#179291)
    os._exit(0)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
@pytest.mark.parametrize("method", ["sparse_momentum", "set", "static", "sparse_momentum/fan_in"])
def test_masks_identical_on_every_rank(tmp_path: Path, method: str) -> None:
    spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path), method), nprocs=WORLD)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    assert r0["history"] == r1["history"] == ([] if method == "static" else [3, 6, 9])
    for key in ("initial", "masks", "weights"):
        assert r0[key].keys() == r1[key].keys()
        for name, value in r0[key].items():
            assert name.startswith("module.")
            assert torch.equal(value, r1[key][name]), (key, name)


def _disagreeing_worker(rank: int, store: str, out: str) -> None:
    import warnings

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(MLP())
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        engine = sl.sparsify(model, opt, "set", density=0.2, total_steps=12, update_every=3)

        def diverge(name: str) -> None:
            """Rank 1 alone gets another mask for ``name`` (a rank gone wrong)."""
            if rank == 1:
                layer = next(layer for layer in engine.layers if layer.name == name)
                layer.load_mask(torch.roll(layer.mask, 1, dims=1))
                layer.zero_inactive_(layer.param)

        agreed = engine.verify_masks()
        diverge("module.fc2.weight")
        found = engine.verify_masks()
        after = engine.verify_masks()
        diverge("module.fc1.weight")  # and now one that an update's check finds
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for x, y in batches("mlp", 3, seed=rank):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        torch.save(
            {
                "agreed": agreed,
                "found": found,
                "after": after,
                "warnings": [str(w.message) for w in caught],
                "masks": dict(engine.masks),
            },
            f"{out}/rank{rank}.pt",
        )
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_a_disagreement_is_found_named_and_repaired_from_rank_0(tmp_path: Path) -> None:
    spawn(_disagreeing_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    for r in (r0, r1):
        assert r["agreed"] == []
        assert r["found"] == ["module.fc2.weight"]  # the same answer on every rank
        assert r["after"] == []  # repaired
        assert len(r["warnings"]) == 1
        assert "module.fc1.weight" in r["warnings"][0]
        assert "rank 0's masks were copied" in r["warnings"][0]
    for name, mask in r0["masks"].items():
        assert torch.equal(mask, r1["masks"][name]), name


def test_one_process_has_nothing_to_verify() -> None:
    model = MLP()
    engine = sl.sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "static", 0.3)
    assert engine.verify_masks() == []


@given(st.lists(st.booleans(), min_size=2, max_size=64), st.data())
@settings(max_examples=200, deadline=None)
def test_the_checksum_tells_masks_apart(bits: list[bool], data: st.DataObject) -> None:
    from sparselearn.engine.distributed import checksum

    mask = torch.tensor(bits)
    assert torch.equal(checksum(mask), checksum(mask.clone()))
    flip = data.draw(st.integers(0, len(bits) - 1))
    other = mask.clone()
    other[flip] = ~other[flip]
    assert not torch.equal(checksum(mask), checksum(other))
    # the same count and the same sum of positions: {0, 3} against {1, 2}
    a, b = torch.zeros(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)
    a[[0, 3]], b[[1, 2]] = True, True
    assert not torch.equal(checksum(a), checksum(b))
