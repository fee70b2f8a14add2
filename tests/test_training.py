"""The user's own loop keeps every tool it had: LR schedulers, clipping, gradient accumulation,
AMP, closures, any dtype and device."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sparselearn as sl
from tests.helpers import MLP, assert_inactive_zero, batches, method_options

METHODS = sl.methods()
MASKS_GRADIENTS = [m for m in METHODS if m not in ("dense", "sparse_momentum")]


def setup(
    method: str, total_steps: int = 12, dtype: torch.dtype = torch.float32, update_every: int = 3
):
    torch.manual_seed(0)
    model = MLP().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    options = {**method_options(method, total_steps, update_every), "seed": 0}
    return model, opt, sl.sparsify(model, opt, method=method, **options)


def scheduled(engine: sl.SparseEngine, steps: int, every: int) -> list[int]:
    """Update steps a periodic method should take in ``steps`` counted optimizer steps."""
    stop = engine.config.stop_at * engine.config.total_steps
    return [s for s in range(every, steps + 1, every) if s < stop]


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x.to(next(model.parameters()).dtype)), y)


@pytest.mark.parametrize("method", METHODS)
def test_lr_scheduler(method: str) -> None:
    model, opt, engine = setup(method)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=12)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for x, y in batches("mlp", 12):
            opt.zero_grad()
            loss_of(model, x, y).backward()
            opt.step()
            scheduler.step()
            lrs.append(opt.param_groups[0]["lr"])
            assert_inactive_zero(engine, model)
    assert len(set(lrs)) == 12
    assert engine.step == 12


@pytest.mark.parametrize("method", METHODS)
def test_gradient_clipping_sees_the_sparse_gradient(method: str) -> None:
    model, opt, engine = setup(method, update_every=5)
    params = dict(model.named_parameters())
    for step, (x, y) in enumerate(batches("mlp", 12), start=1):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        update_step = engine.config.schedule in ("periodic", "gradual") and step % 5 == 0
        if method in MASKS_GRADIENTS and not update_step and step > 1:
            for name, mask in engine.masks.items():
                assert torch.count_nonzero(params[name].grad[~mask]) == 0, name
        expected = torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in model.parameters()])
        )
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.1)
        assert torch.isclose(norm, expected)
        clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
        assert clipped <= 0.1 + 1e-6
        opt.step()
        assert_inactive_zero(engine, model)


@pytest.mark.parametrize("method", METHODS)
def test_gradient_accumulation_counts_optimizer_steps(method: str) -> None:
    model, opt, engine = setup(method, total_steps=6, update_every=2)
    micro = list(batches("mlp", 18))
    for step in range(6):
        opt.zero_grad()
        for x, y in micro[3 * step : 3 * step + 3]:
            (loss_of(model, x, y) / 3).backward()
        opt.step()
        assert_inactive_zero(engine, model)
    assert engine.step == 6
    if engine.config.schedule == "periodic":
        assert [u.step for u in engine.history] == scheduled(engine, 6, 2)


@pytest.mark.parametrize("method", METHODS)
def test_amp_autocast_and_grad_scaler_skipped_step_does_not_count(method: str) -> None:
    model, opt, engine = setup(method, total_steps=10, update_every=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for i, (x, y) in enumerate(batches("mlp", 10)):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of(model, x, y)
        scaler.scale(loss).backward()
        if i == 2:
            model.fc2.weight.grad[0, 0] = float("inf")  # an overflow: the scaler skips this step
        scaler.step(opt)
        scaler.update()
        assert_inactive_zero(engine, model)
    assert engine.step == 9  # the skipped step does not count
    if engine.config.schedule == "periodic":
        assert [u.step for u in engine.history] == scheduled(engine, 9, 3)
        assert all(u.kind == "regrow" for u in engine.history)


@pytest.mark.parametrize("method", METHODS)
def test_step_with_a_closure(method: str) -> None:
    model, opt, engine = setup(method)
    for x, y in batches("mlp", 6):

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            opt.zero_grad()
            loss = loss_of(model, x, y)
            loss.backward()
            return loss

        opt.step(closure)
        assert_inactive_zero(engine, model)
    assert engine.step == 6
    if method == "snip":
        assert engine.density() == pytest.approx(0.2, abs=1e-3)


def test_lbfgs_with_a_closure_stays_sparse() -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    engine = sl.sparsify(model, opt, method="static", density=0.3)
    x, y = next(batches("mlp", 1))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
        assert_inactive_zero(engine, model)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["sparse_momentum", "rigl", "snip", "gmp"])
def test_other_dtypes(method: str, dtype: torch.dtype) -> None:
    model, opt, engine = setup(method, dtype=dtype)
    for x, y in batches("mlp", 12):
        opt.zero_grad()
        loss_of(model, x, y).float().backward()
        opt.step()
        assert_inactive_zero(engine, model)
    for name, mask in engine.masks.items():
        assert mask.dtype == torch.bool, name
    if engine.config.schedule != "dense":
        assert engine.density() == pytest.approx(0.2, abs=1e-3)


def test_casting_the_model_after_sparsify_is_followed() -> None:
    model, opt, engine = setup("sparse_momentum")
    model.double()
    for x, y in batches("mlp", 6):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
        assert_inactive_zero(engine, model)
    assert engine.density() == pytest.approx(0.2, abs=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", METHODS)
def test_on_cuda(method: str) -> None:
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = MLP().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine = sl.sparsify(model, opt, method=method, seed=0, **method_options(method, 12))
    budget = sum(int(m.sum()) for m in engine.masks.values())
    scaler = torch.amp.GradScaler("cuda")
    for x, y in batches("mlp", 12):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        assert_inactive_zero(engine, model)
    for mask in engine.masks.values():
        assert mask.device.type == "cuda"
    if engine.config.schedule in ("fixed", "periodic"):
        assert sum(int(m.sum()) for m in engine.masks.values()) == budget
    state = engine.state_dict()
    engine.load_state_dict(state)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_moving_the_model_to_cuda_after_sparsify_is_followed() -> None:
    model, opt, engine = setup("sparse_momentum")
    model.cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine.remove()
    engine = sl.sparsify(model, opt, density=0.2, total_steps=12, update_every=3)
    for x, y in batches("mlp", 6):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.cuda()), y.cuda()).backward()
        opt.step()
        assert_inactive_zero(engine, model)
