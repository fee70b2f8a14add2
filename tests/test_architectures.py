"""sparselearn on architectures nobody in this project wrote: transformers models built from
small configs (random weights, no download), each sparsified with another preset and taken
through what a user does with it: a few training steps, sl.accelerate, a bf16-autocast step,
export into a fresh model, and sl.save / sl.load."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from torch import nn

import sparselearn as sl
from sparselearn.accel import SparseConv2d, SparseLinear

VOCAB = 96
_LM = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # grouped-query attention
    "max_position_embeddings": 64,
}
_MOE = {"num_experts_per_tok": 2}
# (keyword arguments of every transformers config, which the typed configs do not declare)
LABELS: dict[str, Any] = {"num_labels": 3}
T5_START: dict[str, Any] = {"decoder_start_token_id": 0}


@dataclass(frozen=True)
class Case:
    """One architecture: how to build it, what it takes, the preset it is trained with."""

    build: Callable[[], nn.Module]
    inputs: str  # "tokens", "sequence-label", "seq2seq" or "image"
    method: str
    image_size: int = 32
    options: dict[str, Any] = field(default_factory=dict)


CASES: dict[str, Case] = {
    "gpt2": Case(
        lambda: tf.GPT2LMHeadModel(
            tf.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=1, n_head=2)
        ),
        "tokens",
        "rigl",
    ),
    "llama": Case(lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_LM)), "tokens", "set"),
    "qwen2": Case(lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_LM)), "tokens", "static"),
    "mistral": Case(lambda: tf.MistralForCausalLM(tf.MistralConfig(**_LM)), "tokens", "snip"),
    "mixtral": Case(
        lambda: tf.MixtralForCausalLM(tf.MixtralConfig(**_LM, **_MOE, num_local_experts=4)),
        "tokens",
        "sparse_momentum",
        options={"momentum_window": 1},
    ),
    "qwen2_moe": Case(
        lambda: tf.Qwen2MoeForCausalLM(
            tf.Qwen2MoeConfig(
                **_LM,
                **_MOE,
                num_experts=4,
                moe_intermediate_size=32,
                shared_expert_intermediate_size=32,
            )
        ),
        "tokens",
        "dsr",
    ),
    "opt": Case(
        lambda: tf.OPTForCausalLM(
            tf.OPTConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                ffn_dim=64,
                num_hidden_layers=1,
                num_attention_heads=4,
                max_position_embeddings=64,
                word_embed_proj_dim=32,
            )
        ),
        "tokens",
        "gmp",
    ),
    "bert": Case(
        lambda: tf.BertForSequenceClassification(
            tf.BertConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=4,
                max_position_embeddings=64,
                **LABELS,
            )
        ),
        "sequence-label",
        "rigl",
    ),
    "t5": Case(
        lambda: tf.T5ForConditionalGeneration(
            tf.T5Config(
                vocab_size=VOCAB,
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=1,
                num_decoder_layers=1,
                num_heads=4,
                **T5_START,
            )
        ),
        "seq2seq",
        "set",
    ),
    "vit": Case(
        lambda: tf.ViTForImageClassification(
            tf.ViTConfig(
                image_size=16,
                patch_size=4,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=4,
                **LABELS,
            )
        ),
        "image",
        "static",
        image_size=16,
    ),
    "swin": Case(
        lambda: tf.SwinForImageClassification(
            tf.SwinConfig(
                image_size=16,
                patch_size=2,
                embed_dim=16,
                depths=[1, 1],
                num_heads=[2, 2],
                window_size=4,
                **LABELS,
            )
        ),
        "image",
        "snip",
        image_size=16,
    ),
    "convnext": Case(  # depthwise 7x7 convolutions
        lambda: tf.ConvNextForImageClassification(
            tf.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], **LABELS)
        ),
        "image",
        "sparse_momentum",
        options={"momentum_window": 1},
    ),
    "resnet": Case(
        lambda: tf.ResNetForImageClassification(
            tf.ResNetConfig(
                embedding_size=16,
                hidden_sizes=[16, 32],
                depths=[1, 1],
                layer_type="bottleneck",
                **LABELS,
            )
        ),
        "image",
        "dsr",
    ),
    "mobilenet_v2": Case(  # depthwise separable convolutions
        lambda: tf.MobileNetV2ForImageClassification(
            tf.MobileNetV2Config(
                image_size=32, depth_multiplier=0.25, finegrained_output=False, **LABELS
            )
        ),
        "image",
        "gmp",
    ),
    "efficientnet": Case(  # its own depthwise Conv2d subclass
        lambda: tf.EfficientNetForImageClassification(
            tf.EfficientNetConfig(
                image_size=32,
                width_coefficient=0.25,
                depth_coefficient=0.25,
                hidden_dim=320,
                **LABELS,
            )
        ),
        "image",
        "rigl",
    ),
    "regnet": Case(  # grouped convolutions
        lambda: tf.RegNetForImageClassification(
            tf.RegNetConfig(
                embedding_size=16,
                hidden_sizes=[16, 32],
                depths=[1, 1],
                groups_width=8,
                **LABELS,
            )
        ),
        "image",
        "static",
    ),
}

DENSITY = 0.2
STEPS = 4


def batch(case: Case, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if case.inputs == "image":
        size = case.image_size
        return {
            "pixel_values": torch.randn(2, 3, size, size, generator=g),
            "labels": torch.randint(0, 3, (2,), generator=g),
        }
    tokens = torch.randint(0, VOCAB, (2, 8), generator=g)
    if case.inputs == "sequence-label":
        return {"input_ids": tokens, "labels": torch.randint(0, 3, (2,), generator=g)}
    return {"input_ids": tokens, "labels": torch.randint(0, VOCAB, (2, 8), generator=g)}


def build(case: Case) -> tuple[nn.Module, torch.optim.Optimizer, sl.SparseEngine]:
    torch.manual_seed(0)
    model = case.build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = sl.MASK_SCHEDULE.get(str(sl.METHODS.get(case.method).defaults["schedule"]))
    options = dict(case.options)
    if "update_every" in schedule.options:
        options["update_every"] = 2 if case.method != "gmp" else 1
    engine = sl.sparsify(model, opt, case.method, DENSITY, total_steps=STEPS, seed=0, **options)
    return model, opt, engine


def step(model: nn.Module, opt: torch.optim.Optimizer, inputs: dict[str, torch.Tensor]) -> float:
    opt.zero_grad()
    loss = model(**inputs).loss
    loss.backward()
    opt.step()
    return float(loss)


def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(**inputs).logits
    return out.float()


def check_masks(model: nn.Module, engine: sl.SparseEngine, budget: bool) -> None:
    """Zeros outside the masks (of the layers still masked; accelerated ones hold no
    inactive weights) and, where asked, exactly the budget of active weights."""
    params = dict(model.named_parameters())
    for name, mask in engine.masks.items():
        if name in params:
            assert torch.count_nonzero(params[name].detach()[~mask]) == 0, name
    if budget:
        total = sum(m.numel() for m in engine.masks.values())
        assert sum(int(m.sum()) for m in engine.masks.values()) == round(DENSITY * total)


def dense_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as the dense architecture holds them (an accelerated layer's
    weight built from its sparse values through ``.weight``)."""
    out = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if isinstance(module, (SparseLinear, SparseConv2d)):
            prefix = f"{name}."
            for key in [k for k in out if k.startswith(prefix + "weight_sparse.")]:
                del out[key]
            out[prefix + "weight"] = module.weight.detach().clone()
    return out


@pytest.mark.parametrize("arch", list(CASES))
def test_trains_accelerates_exports_and_reloads(arch: str, tmp_path: Path) -> None:
    case = CASES[arch]
    model, opt, engine = build(case)
    for i in range(STEPS):
        assert torch.isfinite(torch.tensor(step(model, opt, batch(case, i))))
        # (gradual pruning reaches its budget at the end)
        check_masks(model, engine, budget=case.method != "gmp" or i == STEPS - 1)
    assert engine.history or case.method in ("static", "snip")

    # the accelerated model computes what the masked one does, bf16 autocast included
    probe = batch(case, 100)
    model.eval()
    masked = logits(model, probe)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        masked_bf16 = logits(model, probe)
    report = sl.accelerate(model, engine, mode="sparse")
    assert report.accelerated, str(report)
    torch.testing.assert_close(logits(model, probe), masked, rtol=1e-4, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        accelerated_bf16 = logits(model, probe)
    # bf16 costs the accelerated model no more accuracy than it costs the dense one: what
    # autocast costs depends on the depth (MobileNetV2's 50 layers) and on the CPU's bf16
    # arithmetic, so the dense model's own bf16 error on this machine sets the bound
    scale = float(masked.abs().max())
    bf16_error = float((masked_bf16 - masked).abs().max())
    accelerated_error = float((accelerated_bf16 - masked).abs().max())
    assert accelerated_error <= max(0.05 * scale + 0.02, 1.5 * bf16_error), (
        accelerated_error,
        bf16_error,
    )

    # a bf16-autocast training step on the accelerated model
    model.train()
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch(case, STEPS)).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    check_masks(model, engine, budget=True)

    # export, then load_exported into a fresh model of the architecture
    model.eval()
    expected = dense_weights(model)
    sl.export(model, engine, tmp_path / "model.safetensors")
    torch.manual_seed(1)
    fresh = case.build().eval()
    fresh.load_state_dict(sl.load_exported(tmp_path / "model.safetensors"))
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, expected[key]), key
    torch.testing.assert_close(logits(fresh, probe), logits(model, probe), rtol=1e-4, atol=1e-5)

    # sl.save, then sl.load into the same architecture sparsified and accelerated alike
    sl.save(tmp_path / "run.pt", model, opt, engine)
    model2, opt2, engine2 = build(case)
    sl.accelerate(model2, engine2, mode="sparse", layers=report.accelerated)
    sl.load(tmp_path / "run.pt", model2, opt2, engine2)
    model2.eval()
    assert torch.equal(logits(model2, probe), logits(model, probe))
    for (key, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    assert all(torch.equal(engine.masks[k], engine2.masks[k]) for k in engine.masks)
    assert engine2.step == engine.step
