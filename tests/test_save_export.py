"""sl.save / sl.load (one checked file: model, optimizer, engine, your values) and sl.export /
sl.load_exported / sl.sparse_state_dict (a file whose size follows the active weights, read back
as the dense architecture's state_dict, by sparselearn or by torch and safetensors alone)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import sparselearn as sl
from sparselearn.checkpoint import DamagedFileError
from sparselearn.models import create_model
from tests.helpers import MLP, ConvBN, TiedLM, make_batch, train_step


def _trained(steps: int = 6) -> tuple[nn.Module, torch.optim.Optimizer, sl.SparseEngine]:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = sl.sparsify(model, opt, "sparse_momentum", 0.2, total_steps=40, update_every=3)
    for i in range(steps):
        train_step(model, opt, *make_batch("mlp", seed=i))
    return model, opt, engine


def _fresh() -> tuple[nn.Module, torch.optim.Optimizer, sl.SparseEngine]:
    torch.manual_seed(1)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return (
        model,
        opt,
        sl.sparsify(model, opt, "sparse_momentum", 0.2, total_steps=40, update_every=3),
    )


def test_save_and_load_continue_exactly(tmp_path: Path) -> None:
    model, opt, engine = _trained()
    path = tmp_path / "run.pt"
    sl.save(path, model, opt, engine, epoch=3, note="after warm-up", curve=[0.5, 0.25])
    model2, opt2, engine2 = _fresh()
    extra = sl.load(path, model2, opt2, engine2)
    assert extra == {"epoch": 3, "note": "after warm-up", "curve": [0.5, 0.25]}
    assert engine2.step == engine.step
    assert engine2.history == engine.history
    for i in range(6, 12):  # both continue the same way, bit for bit
        train_step(model, opt, *make_batch("mlp", seed=i))
        train_step(model2, opt2, *make_batch("mlp", seed=i))
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    content = torch.load(path, weights_only=True)  # plain values only
    assert content["format"] == "sparselearn.save/1"


def test_extra_values_a_weights_only_load_refuses_are_refused(tmp_path: Path) -> None:
    model, _, _ = _trained(0)
    with pytest.raises(TypeError, match=r"extra value 'when' holds a object"):
        sl.save(tmp_path / "x.pt", model, when=object())
    assert not (tmp_path / "x.pt").exists()


def test_loading_another_models_file_names_the_tensors_and_changes_nothing(
    tmp_path: Path,
) -> None:
    model, _, _ = _trained(0)
    sl.save(tmp_path / "mlp.pt", model)
    other = MLP(hidden=16)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"fc1\.weight \(32, 20\) \(the model's is \(16, 20\)\)"):
        sl.load(tmp_path / "mlp.pt", other)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    with pytest.raises(ValueError, match="lacks"):
        sl.load(tmp_path / "mlp.pt", ConvBN())
    with pytest.raises(ValueError, match="holds no optimizer state"):
        sl.load(tmp_path / "mlp.pt", MLP(), torch.optim.SGD(MLP().parameters(), lr=0.1))


def test_damaged_truncated_and_foreign_files_are_named(tmp_path: Path) -> None:
    model, opt, engine = _trained(2)
    path = tmp_path / "run.pt"
    sl.save(path, model, opt, engine)
    data = bytearray(path.read_bytes())
    flipped = tmp_path / "flipped.pt"
    # a byte in the middle of the tensor data: torch would load it as a wrong number
    offset = data.find(b"data/0") + 4096 if data.find(b"data/0") > 0 else len(data) // 2
    data[offset] ^= 0x10
    flipped.write_bytes(bytes(data))
    with pytest.raises(DamagedFileError, match=r"flipped\.pt is damaged"):
        sl.load(flipped, *_fresh())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DamagedFileError, match=r"truncated\.pt is damaged or truncated"):
        sl.load(truncated, MLP())
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": MLP().state_dict()}, foreign)
    with pytest.raises(DamagedFileError, match=r"not written by sparselearn\.save"):
        sl.load(foreign, MLP())


def test_a_killed_writer_leaves_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "big.pt"
    big = nn.Linear(2048, 2048)
    with torch.no_grad():
        big.weight.fill_(1.0)
    sl.save(path, big, version=1)
    script = textwrap.dedent(
        f"""
        import torch, sparselearn as sl
        from torch import nn
        big = nn.Linear(2048, 2048)
        print("ready", flush=True)
        for v in range(2, 1000):
            with torch.no_grad():
                big.weight.fill_(float(v))
            sl.save({str(path)!r}, big, version=v)
        """
    )
    for delay in (0.05, 0.2, 0.4):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.kill()
        proc.wait()
        model = nn.Linear(2048, 2048)
        version = sl.load(path, model)["version"]
        assert torch.all(model.weight == float(version))  # a whole file, old or new


def test_export_is_small_and_loads_into_a_plain_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("lenet300-100", (1, 28, 28), 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = sl.sparsify(model, opt, "static", density=0.05)
    sl.export(model, engine, tmp_path / "sparse.safetensors")
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "dense.safetensors"
    )
    ratio = (tmp_path / "sparse.safetensors").stat().st_size / (
        tmp_path / "dense.safetensors"
    ).stat().st_size
    assert ratio <= 0.12, ratio
    state = sl.load_exported(tmp_path / "sparse.safetensors")
    plain = create_model("lenet300-100", (1, 28, 28), 10)  # no engine: an ordinary model
    plain.load_state_dict(state)
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)


GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guide.md"


def _readme_block(marker: str) -> str:
    blocks = re.findall(r"```python notest\n(.*?)```", GUIDE.read_text(), flags=re.DOTALL)
    found = [b for b in blocks if b.startswith(marker)]
    assert len(found) == 1, f"docs/guide.md has no block starting {marker!r}"
    return found[0]


def test_the_readmes_plain_torch_loader_rebuilds_the_model(tmp_path: Path) -> None:
    model = ConvBN()
    engine = sl.sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "static", 0.3)
    path = sl.export(model, engine, tmp_path / "model.safetensors")
    # the guide's lines, in a process that never imports sparselearn
    script = _readme_block("# without sparselearn") + textwrap.dedent(
        """
        import sys
        assert "sparselearn" not in sys.modules
        torch.save(state, "plain.pt")
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    plain = torch.load(tmp_path / "plain.pt", weights_only=True)
    assert plain.keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(plain[name], value), name
    assert path.name == "model.safetensors"


def test_tied_accelerated_and_compacted_models_export(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tied = TiedLM()
    engine = sl.sparsify(tied, torch.optim.SGD(tied.parameters(), lr=0.1), "static", 0.5)
    state = sl.load_exported(sl.export(tied, engine, tmp_path / "tied.safetensors"))
    fresh = TiedLM()
    fresh.load_state_dict(state)
    tokens = torch.randint(0, 30, (6,))
    torch.testing.assert_close(fresh(tokens), tied(tokens), rtol=0, atol=0)

    model = create_model("lenet300-100", (1, 28, 28), 10)
    engine = sl.sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "static", 0.1)
    x = torch.randn(3, 1, 28, 28)
    want = model(x).detach()
    sl.accelerate(model, engine, mode="sparse")
    state = sl.load_exported(sl.export(model, engine, tmp_path / "fast.safetensors"))
    plain = create_model("lenet300-100", (1, 28, 28), 10)
    plain.load_state_dict(state)
    torch.testing.assert_close(plain(x), want, rtol=1e-5, atol=1e-5)

    conv = ConvBN().eval()
    engine = sl.sparsify(conv, torch.optim.SGD(conv.parameters(), lr=0.1), "static", 0.2)
    x = make_batch("conv_bn")[0]
    small = sl.compact(conv, engine, example_input=x).model
    state = sl.load_exported(sl.export(small, None, tmp_path / "small.safetensors"))
    assert state.keys() == small.state_dict().keys()
    for name, value in small.state_dict().items():
        assert torch.equal(state[name], value), name


def test_sparse_state_dict_holds_csr_tensors(tmp_path: Path) -> None:
    model, _, engine = _trained(3)
    state = sl.sparse_state_dict(model, engine)
    for name, mask in engine.masks.items():
        assert state[name].layout == torch.sparse_csr
        assert state[name]._nnz() == int(mask.sum())
        assert torch.equal(state[name].to_dense(), model.state_dict()[name])
    torch.save(state, tmp_path / "csr.pt")
    back = torch.load(tmp_path / "csr.pt", weights_only=True)
    assert torch.equal(back["fc1.weight"].to_dense(), model.state_dict()["fc1.weight"])


def test_a_damaged_export_is_named(tmp_path: Path) -> None:
    model, _, engine = _trained(1)
    path = sl.export(model, engine, tmp_path / "m.safetensors")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedFileError, match=r"m\.safetensors is damaged"):
        sl.load_exported(path)
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match=r"not written by sparselearn\.export"):
        sl.load_exported(other)


# ------------------------------------------------------------------ every layer kind


class _Experts(nn.Module):
    """A stack of expert matrices (E, out, in), each applied to the whole input."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.num_experts = 3
        self.weight_stack = nn.Parameter(torch.randn(3, n_out, n_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bi,eoi->bo", x, self.weight_stack)


class _Attention(nn.Module):
    def __init__(self, dim: int, kdim: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 2, kdim=kdim, vdim=kdim, batch_first=True)
        self.kdim = kdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = (
            x[..., : self.kdim] if self.kdim <= x.shape[-1] else x.repeat(1, 1, 2)[..., : self.kdim]
        )
        return self.attn(x, kv, kv, need_weights=False)[0]


class _Conv1DModel(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c_fc = Conv1D(n_out, n_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_fc(x)


def _layer_case(kind: str, square: bool) -> tuple[nn.Module, torch.Tensor, dict[str, object]]:
    """A model holding one layer of ``kind`` (its weight square or not), an input, and the
    options that sparsify it."""
    n_in, n_out = (12, 12) if square else (12, 20)
    if kind == "linear":
        return nn.Sequential(nn.Linear(n_in, n_out)), torch.randn(4, n_in), {}
    if kind == "conv1d":
        return _Conv1DModel(n_in, n_out), torch.randn(2, 3, n_in), {}
    if kind == "conv2d":
        return (
            nn.Sequential(nn.Conv2d(6, 6 if square else 10, 3, padding=1)),
            torch.randn(2, 6, 5, 5),
            {},
        )
    if kind == "attention":  # packed in_proj_weight, or separate q/k/v projections
        return _Attention(12, 12 if square else 8), torch.randn(2, 5, 12), {}
    if kind == "embedding":
        model = nn.Sequential(nn.Embedding(n_out, n_in))
        return model, torch.randint(0, n_out, (2, 5)), {"include": [nn.Embedding]}
    return _Experts(n_in, n_out), torch.randn(4, n_in), {}


KINDS = ["linear", "conv1d", "conv2d", "attention", "embedding", "experts"]


@pytest.mark.parametrize("accelerated", [False, True])
@pytest.mark.parametrize("square", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_export_and_sparse_state_dict_hold_the_masked_weights_of_every_layer_kind(
    kind: str, square: bool, accelerated: bool, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model, x, options = _layer_case(kind, square)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = sl.sparsify(model, opt, "static", 0.3, **options)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # non-zero where the mask is inactive
    engine.apply_masks()
    model.eval()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        out = model(x)
    if accelerated:
        report = sl.accelerate(model, engine, mode="sparse")
        assert bool(report.accelerated) == (kind in ("linear", "conv1d", "conv2d")), str(report)
    sl.export(model, engine, tmp_path / "m.safetensors")
    state = sl.load_exported(tmp_path / "m.safetensors")
    assert state.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(state[key], value), key
    for key, value in sl.sparse_state_dict(model, engine).items():
        if value.layout == torch.sparse_csr:
            assert value.shape == (want[key].shape[0], want[key][0].numel()), key
            value = value.to_dense().reshape(want[key].shape)
        assert torch.equal(value, want[key]), key
    if kind != "attention":  # (its control flow on shapes is not torch.fx-traceable)
        with torch.no_grad():
            small = sl.compact(model, engine, example_input=x).model
            torch.testing.assert_close(small(x), out, rtol=1e-5, atol=1e-5)


def test_compact_rebuilds_an_accelerated_conv1d_as_conv1d() -> None:
    from sparselearn.accel.compact import densified

    torch.manual_seed(0)
    model, x, _ = _layer_case("conv1d", square=False)
    engine = sl.sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "static", 0.3)
    model.eval()
    want = model(x)
    sl.accelerate(model, engine, mode="sparse")
    dense = densified(model)
    assert type(dense.c_fc).__name__ == "Conv1D"
    assert dense.c_fc.weight.shape == (12, 20)
    torch.testing.assert_close(dense(x), want)


def test_a_compiled_model_exports_under_the_plain_models_names(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP()
    compiled = torch.compile(model)
    engine = sl.sparsify(compiled, torch.optim.SGD(model.parameters(), lr=0.1), "static", 0.3)
    assert all(name.startswith("_orig_mod.") for name in engine.masks)
    sl.export(compiled, engine, tmp_path / "m.safetensors")
    plain = MLP()
    plain.load_state_dict(sl.load_exported(tmp_path / "m.safetensors"))  # strict: same names
    x = torch.randn(3, 20)
    assert torch.equal(plain(x), model(x))
    assert set(sl.sparse_state_dict(compiled, engine)) == set(model.state_dict())


def _accelerated_run(
    monkeypatch: pytest.MonkeyPatch, method: str = "rigl"
) -> tuple[nn.Module, torch.optim.Optimizer, sl.SparseEngine]:
    """An MLP accelerated with its dense gradients captured as factors (as a large layer's
    are), a few steps in."""
    from sparselearn.accel import layers as accel_layers

    monkeypatch.setattr(accel_layers, "CAPTURE_ABOVE", 0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    options: dict[str, object] = {"update_every": 4, "seed": 0}
    if method == "sparse_momentum":
        options["momentum_window"] = 3
    engine = sl.sparsify(model, opt, method, 0.2, total_steps=40, **options)
    sl.accelerate(model, engine, mode="sparse", live_rounds=0)
    return model, opt, engine


def _steps(model: nn.Module, opt: torch.optim.Optimizer, n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, y = torch.randn(16, 20, generator=gen), torch.randint(0, 5, (16,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_an_accelerated_model_saves_its_structure_as_positions_and_continues_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # sparse momentum saved in the middle of a window held as factors: the state holds the
    # layers' positions and the window's factors, never a tensor of a weight's size, and the
    # restored run continues as the uninterrupted one
    model, opt, engine = _accelerated_run(monkeypatch, "sparse_momentum")
    _steps(model, opt, 6, seed=1)  # an update at step 4; steps 5, 6 open the next window
    state = engine.state_dict()
    for layer in engine.layers:
        saved = state["masks"][layer.name]
        assert saved.dtype == torch.int64
        assert saved.numel() == layer.active
    assert state["window"] == {}
    assert set(state["window_factors"]) == {layer.name for layer in engine.layers}
    sl.save(tmp_path / "run.pt", model, opt, engine)

    model2, opt2, engine2 = _accelerated_run(monkeypatch, "sparse_momentum")
    _steps(model2, opt2, 1, seed=7)  # somewhere else: the load must put it back
    sl.load(tmp_path / "run.pt", model2, opt2, engine2)
    _steps(model, opt, 6, seed=2)
    _steps(model2, opt2, 6, seed=2)
    assert len(engine2.history) == len(engine.history) == 3
    for (name, a), b in zip(engine.masks.items(), engine2.masks.values(), strict=True):
        assert torch.equal(a, b), name
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)

    bad = dict(state)
    name = engine.layers[1].name
    bad["masks"] = {**state["masks"], name: state["masks"][name].flip(0)}
    with pytest.raises(ValueError, match=f"saved positions for {name} are not ascending"):
        engine2.load_state_dict(bad)


def test_export_of_an_accelerated_model_never_builds_a_dense_weight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    from sparselearn.accel import SparseWeight
    from sparselearn.accel.compact import densified

    model, opt, engine = _accelerated_run(monkeypatch)
    _steps(model, opt, 5, seed=1)
    want = densified(model).state_dict()

    def refuse(self: object) -> torch.Tensor:
        raise AssertionError("a dense weight was built")

    monkeypatch.setattr(SparseWeight, "dense", refuse)
    monkeypatch.setattr(SparseWeight, "mask", refuse)
    path = sl.export(model, engine, tmp_path / "model.safetensors")
    for use_engine in (engine, None):
        sl.export(model, use_engine, tmp_path / "again.safetensors")
    monkeypatch.undo()
    # read by safetensors itself, and back into the dense architecture
    raw = load_file(str(path))
    assert raw["2.weight.values"].numel() == engine.layers[1].active
    got = sl.load_exported(path)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    csr = sl.sparse_state_dict(model, engine)["2.weight"]
    assert torch.equal(csr.to_dense(), want["2.weight"])
