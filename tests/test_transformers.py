"""Transformers are covered by default: nn.MultiheadAttention's projections and Hugging Face's
Conv1D are sparsified with exact budgets, initial distributions and FLOPs as for Linear, and
sl.accelerate computes Conv1D sparsely with the dense layer's results; what stays dense
(embeddings, norms, biases, a tied head) stays dense."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import sparselearn as sl
from sparselearn.flops import count_flops


def _budget(engine: sl.SparseEngine, density: float) -> None:
    total = sum(m.numel() for m in engine.masks.values())
    active = sum(int(m.sum()) for m in engine.masks.values())
    assert active == round(density * total)


def test_encoder_attention_projections_are_sparsified_with_exact_budgets() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    opt = torch.optim.AdamW(model.parameters())
    engine = sl.sparsify(model, opt, "rigl", density=0.1, total_steps=100, update_every=10)
    names = set(engine.masks)
    for i in range(2):
        prefix = f"layers.{i}."
        assert {
            prefix + "self_attn.in_proj_weight",
            prefix + "self_attn.out_proj.weight",
            prefix + "linear1.weight",
            prefix + "linear2.weight",
        } <= names
    assert not any("norm" in n or n.endswith("bias") for n in names)
    _budget(engine, 0.1)
    x = torch.randn(4, 10, 32)
    for _ in range(12):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    assert engine.history
    _budget(engine, 0.1)
    in_proj = model.layers[0].self_attn.in_proj_weight
    mask = engine.masks["layers.0.self_attn.in_proj_weight"]
    assert torch.count_nonzero(in_proj.detach()[~mask]) == 0


def test_separate_query_key_value_weights() -> None:
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(16, 2, kdim=8, vdim=12, batch_first=True)
    model = nn.ModuleDict({"attn": attn})
    engine = sl.sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "static", 0.25)
    assert set(engine.masks) == {
        "attn.q_proj_weight",
        "attn.k_proj_weight",
        "attn.v_proj_weight",
        "attn.out_proj.weight",
    }
    _budget(engine, 0.25)


def test_include_naming_a_missing_attention_weight_lists_the_candidates() -> None:
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(16, 2)})
    with pytest.raises(ValueError, match=r"in_proj_weight") as err:
        sl.sparsify(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            "static",
            0.5,
            include=["attn.q_proj_weight"],
        )
    assert "attn.out_proj.weight" in str(err.value)


class GPT2Block(nn.Module):
    """The layout of Hugging Face's GPT-2 MLP: Conv1D layers with (in, out) weights."""

    def __init__(self, dim: int = 24, hidden: int = 96) -> None:
        super().__init__()
        self.c_fc = Conv1D(hidden, dim)
        self.c_proj = Conv1D(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(torch.relu(self.c_fc(x)))


class LinearBlock(nn.Module):
    def __init__(self, dim: int = 24, hidden: int = 96) -> None:
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden)
        self.c_proj = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(torch.relu(self.c_fc(x)))


@pytest.mark.parametrize("init", ["er", "erk", "uniform"])
def test_conv1d_gets_the_densities_of_the_same_linear_layer(init: str) -> None:
    conv, linear = GPT2Block(), LinearBlock()
    per_model = []
    for model in (conv, linear):
        engine = sl.sparsify(
            model, torch.optim.SGD(model.parameters(), lr=0.1), "static", 0.1, init=init
        )
        per_model.append(engine.layer_densities())
        _budget(engine, 0.1)
    assert per_model[0] == per_model[1]
    assert conv.c_fc.weight.shape == (24, 96)  # (in, out): the transpose of Linear's


def test_conv1d_flops_equal_linear_flops() -> None:
    conv, linear = GPT2Block(), LinearBlock()
    with torch.no_grad():
        linear.c_fc.weight.copy_(conv.c_fc.weight.T)
        linear.c_proj.weight.copy_(conv.c_proj.weight.T)
        conv.c_fc.weight[:, :10] = 0
        linear.c_fc.weight[:10] = 0
    a, b = count_flops(conv, (5, 24)), count_flops(linear, (5, 24))
    assert a.dense == b.dense == 5 * 2 * (24 * 96 + 96 * 24)
    assert a.sparse == b.sparse < a.dense


def test_attention_flops_count_every_projection() -> None:
    attn = nn.MultiheadAttention(16, 2, batch_first=True)

    class SelfAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = attn

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x, need_weights=False)[0]

    report = count_flops(SelfAttention(), (7, 16))
    # q, k, v and the output projection: four 16x16 products at each of 7 positions
    assert report.dense == 7 * 2 * 4 * 16 * 16


def test_accelerated_conv1d_computes_what_the_dense_layer_does() -> None:
    torch.manual_seed(0)
    model = GPT2Block()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = sl.sparsify(model, opt, "static", 0.2)
    x = torch.randn(3, 5, 24)
    want = model(x)
    want.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    x_grad = x.clone().requires_grad_()
    ref = model(x_grad)
    ref.sum().backward()
    want_input_grad = x_grad.grad.clone()
    opt.zero_grad()
    report = sl.accelerate(model, engine, mode="sparse")
    assert {c.kind for c in report.layers} == {"conv1d"}
    assert sorted(report.accelerated) == ["c_fc.weight", "c_proj.weight"]
    x_grad = x.clone().requires_grad_()
    got = model(x_grad)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    torch.testing.assert_close(x_grad.grad, want_input_grad, rtol=1e-5, atol=1e-5)
    for name in ("c_fc.bias", "c_proj.bias"):
        got_grad = dict(model.named_parameters())[name].grad
        assert got_grad is not None
        torch.testing.assert_close(got_grad, grads[name], rtol=1e-5, atol=1e-5)
    _budget(engine, 0.2)


def test_a_head_tied_to_the_embedding_stays_dense() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tokens = nn.Embedding(50, 16)
            self.hidden = nn.Linear(16, 16)
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.tokens.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.hidden(self.tokens(ids)))

    model = Tied()
    engine = sl.sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "static", 0.3)
    assert set(engine.masks) == {"hidden.weight"}


def test_accelerated_conv1d_trains_to_the_dense_layer_weights() -> None:
    torch.manual_seed(0)
    dense, fast = GPT2Block(), GPT2Block()
    fast.load_state_dict(dense.state_dict())
    engines, optimizers = [], []
    for model in (dense, fast):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        engines.append(sl.sparsify(model, opt, "static", 0.2, seed=3))
        optimizers.append(opt)
    sl.accelerate(fast, engines[1], mode="sparse")
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(4, 6, 24, generator=g)
        for model, opt in zip((dense, fast), optimizers, strict=True):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    x = torch.randn(2, 6, 24, generator=g)
    torch.testing.assert_close(fast(x), dense(x), rtol=1e-4, atol=1e-5)
