"""Mixtures of experts: stacks of expert matrices (3-D parameters, as transformers keeps the
experts of Mixtral and Qwen-MoE) are sparsified by default as E matrices of (out, in); the
router stays dense; ER/ERK, FLOPs and the summary count the stacks as such."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers as tf
from torch import nn

import sparselearn as sl
from sparselearn.flops import count_flops

E, H, INTER, TOP_K = 4, 16, 24, 2


class ToyExperts(nn.Module):
    """transformers' layout: gate_up_proj (E, 2I, H) and down_proj (E, H, I), called with the
    routing (tokens, top_k)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * INTER, H) / H**0.5)
        self.down_proj = nn.Parameter(torch.randn(E, H, INTER) / INTER**0.5)

    def forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(x)
        for e in range(E):
            token, slot = torch.where(top_k_index == e)
            gate, up = nn.functional.linear(x[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = nn.functional.linear(nn.functional.silu(gate) * up, self.down_proj[e])
            out.index_add_(0, token, y * top_k_weights[token, slot, None])
        return out


class ToyMoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(H, H)
        self.gate = nn.Linear(H, E, bias=False)  # the router
        self.experts = ToyExperts()
        self.routing: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).reshape(-1, H)
        weights, index = torch.topk(self.gate(x).softmax(-1), TOP_K, dim=-1)
        self.routing.append(index)
        return self.experts(x, index, weights)


class SeparateExperts(nn.Module):
    """The same weights as ToyMoE with each expert's matrices as Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(H, H)
        self.gate_up = nn.ModuleList(nn.Linear(H, 2 * INTER, bias=False) for _ in range(E))
        self.down = nn.ModuleList(nn.Linear(INTER, H, bias=False) for _ in range(E))


def sparsify(model: nn.Module, **options: object) -> sl.SparseEngine:
    opt = torch.optim.AdamW(model.parameters())
    return sl.sparsify(model, opt, "rigl", 0.1, total_steps=10, update_every=5, **options)


def test_experts_are_sparsified_by_default_and_the_router_is_not() -> None:
    torch.manual_seed(0)
    model = ToyMoE()
    engine = sparsify(model)
    assert set(engine.masks) == {"proj.weight", "experts.gate_up_proj", "experts.down_proj"}
    assert engine.masks["experts.gate_up_proj"].shape == (E, 2 * INTER, H)
    total = sum(m.numel() for m in engine.masks.values())
    assert sum(int(m.sum()) for m in engine.masks.values()) == round(0.1 * total)
    x = torch.randn(6, H)
    opt = engine.optimizer
    for _ in range(6):  # an update at step 5: the budget holds, zeros outside the masks
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    assert engine.history
    assert sum(int(m.sum()) for m in engine.masks.values()) == round(0.1 * total)
    for name in ("gate_up_proj", "down_proj"):
        w = getattr(model.experts, name).detach()
        assert torch.count_nonzero(w[~engine.masks[f"experts.{name}"]]) == 0


@pytest.mark.parametrize("init", ["er", "erk"])
def test_er_and_erk_size_a_stack_by_one_experts_matrix(init: str) -> None:
    # a stack of E matrices gets the density E separate Linear layers of that shape would
    torch.manual_seed(0)
    stacked = sparsify(ToyMoE(), init=init).layer_densities()
    separate = sparsify(SeparateExperts(), init=init).layer_densities()
    assert stacked["experts.gate_up_proj"] == pytest.approx(separate["gate_up.0.weight"], abs=2e-3)
    assert stacked["experts.down_proj"] == pytest.approx(separate["down.0.weight"], abs=2e-3)
    assert stacked["proj.weight"] == pytest.approx(separate["proj.weight"], abs=2e-3)


def test_flops_count_each_expert_for_the_tokens_routed_to_it() -> None:
    torch.manual_seed(0)
    model = ToyMoE()
    engine = sparsify(model)
    report = count_flops(model, (5, H), engine.masks)
    (routing,) = model.routing  # (tokens, top_k), the forward count_flops ran
    tokens = torch.bincount(routing.flatten(), minlength=E)
    layers = {r.name: r for r in report.layers}
    for name, (rows, cols) in (("gate_up_proj", (2 * INTER, H)), ("down_proj", (H, INTER))):
        mask = engine.masks[f"experts.{name}"]
        dense = sum(2 * rows * cols * int(n) for n in tokens)
        sparse = sum(2 * int(mask[e].sum()) * int(n) for e, n in enumerate(tokens))
        assert (layers[f"experts.{name}"].dense, layers[f"experts.{name}"].sparse) == (
            dense,
            sparse,
        )
    assert int(tokens.sum()) == 5 * TOP_K


def test_summary_and_log_say_what_stays_dense_and_why(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict({"embed": nn.Embedding(50, H), "moe": ToyMoE(), "norm": nn.LayerNorm(H)})
    with caplog.at_level(logging.INFO, logger="sparselearn"):
        engine = sparsify(model)
    text = engine.summary()
    assert f"moe.experts.gate_up_proj  {E}x{2 * INTER}x{H}" in text
    dense = 50 * H + E * H + 2 * H + H  # embedding, router, norm, the projection's bias
    everything = dense + sum(m.numel() for m in engine.masks.values())
    assert f"dense: {dense:,} of the model's {everything:,} weights" in text
    lines = text.splitlines()
    assert any(line.split() == ["embeddings", "and", "positional", "tables", "800", "in",
                                "1", "tensor"] for line in lines)  # fmt: skip
    assert any(line.strip().startswith("routers of mixtures of experts") for line in lines)
    assert any(line.strip().startswith("norms") and "2 tensors" in line for line in lines)
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert f"{100 * dense / everything:.1f}% of the model's weights stay dense" in logged
    assert "routers of mixtures of experts" in logged


def test_accelerate_names_the_missing_kernel_for_a_stack() -> None:
    torch.manual_seed(0)
    model = ToyMoE()
    engine = sparsify(model)
    report = sl.accelerate(model, engine, mode="sparse")
    reasons = {c.name: c.reason for c in report.layers}
    assert reasons["experts.gate_up_proj"] == (
        f"stack of {E} expert matrices (ToyExperts.gate_up_proj): no sparse kernel"
    )
    assert report.accelerated == ["proj.weight"]


def test_mixtral_experts_are_sparse_and_its_routers_dense() -> None:
    torch.manual_seed(0)
    config = tf.MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    model = tf.MixtralForCausalLM(config)
    engine = sparsify(model)
    assert "model.layers.0.mlp.experts.gate_up_proj" in engine.masks
    assert "model.layers.0.mlp.experts.down_proj" in engine.masks
    assert not any(".gate." in name for name in engine.masks)
    # the density the engine reports is the model's, but for what stays dense by design
    weights = [
        p
        for n, p in model.named_parameters()
        if p.dim() >= 2 and "embed" not in n and ".gate." not in n
    ]
    nonzero = sum(int(torch.count_nonzero(p)) for p in weights)
    assert nonzero / sum(p.numel() for p in weights) == pytest.approx(engine.density(), abs=1e-6)
