"""Structured models for serving: a 2:4 model exports to compressed-tensors' sparse-24-bitmask
(checked by decompressing it with the compressed-tensors library itself), a constant fan-in
model to sparselearn's CSR file with its structure in the metadata, and on a GPU a 2:4 weight
converts to PyTorch's semi-structured layout with the product of the dense one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import sparselearn as sl
from tests.helpers import train_step

pytest.importorskip("safetensors")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 24)
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def trained(structure: str, accelerate: bool = False) -> tuple[MLP, sl.SparseEngine]:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    density = 0.5 if structure == "2:4" else 0.25
    engine = sl.sparsify(
        model, opt, method="rigl", density=density, structure=structure, total_steps=12,
        update_every=3, exclude=["head.weight"],
    )  # fmt: skip
    if accelerate:
        sl.accelerate(model, engine, mode="sparse")
    g = torch.Generator().manual_seed(1)
    for _ in range(12):
        train_step(model, opt, torch.randn(16, 16, generator=g), torch.randint(0, 5, (16,)))
    return model, engine


def dense_state(model: nn.Module, tmp: Path) -> dict[str, torch.Tensor]:
    """The model's weights as the dense architecture holds them."""
    return sl.load_exported(sl.export(model, None, tmp / "plain.safetensors"))


@pytest.mark.parametrize("accelerate", [False, True])
def test_2_4_model_decompresses_with_compressed_tensors_to_the_masked_model(
    tmp_path: Path, accelerate: bool
) -> None:
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors import ModelCompressor

    model, engine = trained("2:4", accelerate)
    folder = sl.export(model, engine, tmp_path / "ct", format="compressed-tensors")
    config = json.loads((folder / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors"
    assert q["sparsity_config"]["format"] == "sparse-24-bitmask"
    assert sorted(q["sparsity_config"]["targets"]) == ["fc1", "fc2"]

    fresh = MLP()  # other values everywhere: all must come from the folder
    compressor = ModelCompressor.from_compression_config(q)
    assert compressor is not None, f"compressed-tensors {ct.__version__} did not read the config"
    compressor.decompress(str(folder), fresh)
    want = dense_state(model, tmp_path)
    for name, t in fresh.state_dict().items():
        assert torch.equal(t, want[name]), name


def test_the_bitmask_decodes_to_the_engines_masks(tmp_path: Path) -> None:
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.sparse_compressors.sparse_24_bitmask import (
        sparse24_bitmask_decompress,
    )
    from compressed_tensors.utils import unpack_bitmasks
    from safetensors.torch import load_file

    model, engine = trained("2:4")
    folder = sl.export(model, engine, tmp_path / "ct", format="compressed-tensors")
    stored = load_file(str(folder / "model.safetensors"))
    for layer in ("fc1", "fc2"):
        mask = engine.masks[f"{layer}.weight"]
        shape = stored[f"{layer}.shape"].flatten().tolist()
        assert shape == list(mask.shape)
        # decoded by the library: the engine's mask (grown weights may still be exact zeros,
        # so the mask is not the weight's non-zeros) and the masked weight
        assert torch.equal(unpack_bitmasks(stored[f"{layer}.bitmask"], shape), mask)
        weight = sparse24_bitmask_decompress(
            stored[f"{layer}.compressed"], stored[f"{layer}.bitmask"], shape
        )
        assert torch.equal(weight, getattr(model, layer).weight.detach())
    assert torch.equal(stored["head.weight"], model.head.weight.detach())  # dense, as it is


def test_compressed_tensors_needs_a_2_4_engine_and_linear_weights(tmp_path: Path) -> None:
    model, engine = trained("fan_in")
    with pytest.raises(ValueError, match=r"structure='2:4' \(got structure 'fan_in'\)"):
        sl.export(model, engine, tmp_path / "x", format="compressed-tensors")
    with pytest.raises(ValueError, match="no engine"):
        sl.export(model, None, tmp_path / "x", format="compressed-tensors")
    with pytest.raises(ValueError, match="unknown export format 'onnx'"):
        sl.export(model, engine, tmp_path / "x", format="onnx")
    conv = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Flatten(), nn.Linear(8 * 4, 4))
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)
    e = sl.sparsify(conv, opt, method="static", structure="2:4")
    with pytest.raises(ValueError, match=r"0\.weight is not the weight of a Linear layer"):
        sl.export(conv, e, tmp_path / "c", format="compressed-tensors")
    assert not (tmp_path / "c" / "model.safetensors").exists()


def test_fan_in_model_exports_as_csr_with_its_structure(tmp_path: Path) -> None:
    from safetensors import safe_open

    model, engine = trained("fan_in")
    path = sl.export(model, engine, tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        crow = f.get_tensor("fc1.weight.crow_indices")
    assert meta["structure"] == "fan_in"
    assert len(set(crow.diff().tolist())) == 1  # every row holds the same count
    state = sl.load_exported(path)
    assert torch.equal(state["fc1.weight"], model.fc1.weight.detach())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_2_4_weight_runs_in_pytorchs_semi_structured_layout() -> None:
    from torch.sparse import to_sparse_semi_structured

    # the semi-structured kernels want half precision and sizes in multiples of 64
    torch.manual_seed(0)
    big = nn.Linear(128, 128).half().cuda()
    opt = torch.optim.SGD(big.parameters(), lr=0.01)
    e = sl.sparsify(big, opt, method="static", structure="2:4")
    x = torch.randn(64, 128, dtype=torch.half, device="cuda")
    want = nn.functional.linear(x, big.weight.detach())
    semi = to_sparse_semi_structured(big.weight.detach())
    got = nn.functional.linear(x, semi)
    assert torch.allclose(got, want, rtol=1e-2, atol=1e-2)
    assert e.masks["weight"].reshape(-1, 4).sum(dim=1).eq(2).all()
