"""When the compiled kernels cannot be had, the library says why once and computes the same
results with the PyTorch backend; ``SPARSELEARN_BACKEND`` makes that an error or forces it."""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import sparselearn as sl
from sparselearn import kernels
from sparselearn.accel import SparseLinear
from sparselearn.kernels import build


@pytest.fixture
def fresh_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The extension not built yet in this process, with an empty cache."""
    monkeypatch.setattr(build, "_extension", None)
    monkeypatch.setattr(build, "_extension_error", None)
    monkeypatch.setenv("SPARSELEARN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SPARSELEARN_BACKEND", raising=False)


def _masked_pair() -> tuple[nn.Linear, SparseLinear, torch.Tensor]:
    torch.manual_seed(0)
    lin = nn.Linear(24, 16)
    mask = torch.rand(16, 24) < 0.3
    with torch.no_grad():
        lin.weight.mul_(mask)
    return lin, SparseLinear(copy.deepcopy(lin), mask), mask


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.usefixtures("fresh_build")
def test_missing_sources_warn_once_and_fall_back_with_the_same_results(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setattr(build, "_SOURCES", (tmp_path / "gone" / "linear.cpp",))
    with caplog.at_level(logging.WARNING, logger="sparselearn"):
        assert kernels.extension() is None
        assert kernels.extension() is None
        x = torch.randn(8, 24)
        assert kernels.kernels_for(x) == kernels.REFERENCE
    (message,) = _warnings(caplog)
    assert "kernel sources are not installed" in message
    assert str(tmp_path / "gone") in message
    assert "PyTorch backend" in message
    assert "Building the kernels" in message

    lin, sparse, _ = _masked_pair()
    x = torch.randn(8, 24, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    lin(x).square().sum().backward()
    sparse(x2).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)
    assert torch.allclose(sparse.weight_sparse.values.grad, lin.weight.grad[_masked_pair()[2]])


@pytest.mark.usefixtures("fresh_build")
def test_a_failing_compiler_warns_with_its_error_and_falls_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CXX", "/nonexistent/bin/c++")
    with caplog.at_level(logging.WARNING, logger="sparselearn"):
        assert kernels.extension() is None
    (message,) = [m for m in _warnings(caplog) if "sparse CPU kernels" in m]
    assert "the C++ build failed" in message
    assert "/nonexistent/bin/c++" in message
    assert kernels.kernels_for(torch.zeros(2, 2)) == kernels.REFERENCE


@pytest.mark.usefixtures("fresh_build")
def test_the_accelerate_report_names_the_backend_of_each_layer(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(build, "_SOURCES", (tmp_path / "gone.cpp",))
    model = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = sl.sparsify(model, optimizer, method="static", density=0.3)
    report = sl.accelerate(model, engine, mode="sparse")
    assert [c.backend for c in report.layers] == ["torch", "torch"]
    assert "backend" in str(report).splitlines()[0]
    assert "torch" in str(report).splitlines()[1]


@pytest.mark.usefixtures("fresh_build")
def test_backend_cpp_in_the_environment_turns_the_fallback_into_an_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setattr(build, "_SOURCES", (tmp_path / "gone.cpp",))
    monkeypatch.setenv("SPARSELEARN_BACKEND", "cpp")
    with (
        caplog.at_level(logging.WARNING, logger="sparselearn"),
        pytest.raises(RuntimeError, match=r"compiled kernels are unavailable .*sources"),
    ):
        kernels.kernels_for(torch.zeros(2, 2))
    assert not _warnings(caplog)  # an error instead of the warning


@pytest.mark.usefixtures("fresh_build")
def test_backend_torch_in_the_environment_forces_the_fallback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SPARSELEARN_BACKEND", "torch")
    assert kernels.kernels_for(torch.zeros(2, 2)) == kernels.REFERENCE
    assert kernels.extension() is None
    assert kernels.unavailable_reason() == "disabled by SPARSELEARN_BACKEND=torch"


@pytest.mark.usefixtures("fresh_build")
def test_an_unknown_backend_in_the_environment_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SPARSELEARN_BACKEND", "fast")
    with pytest.raises(ValueError, match="SPARSELEARN_BACKEND must be one of auto, cpp, torch"):
        kernels.kernels_for(torch.zeros(2, 2))


def test_backend_cpp_refuses_tensors_it_cannot_compute() -> None:
    if kernels.extension() is None:
        pytest.skip("needs the compiled kernels")
    with pytest.raises(RuntimeError, match=r"float32 and float64 on the CPU, not torch\.float16"):
        kernels.kernels_for(torch.zeros(2, 2, dtype=torch.float16), "cpp")


@pytest.mark.usefixtures("fresh_build")
def test_a_build_killed_midway_does_not_hold_later_builds_forever(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # PyTorch's build lock, left behind by a builder that was killed: the next build goes on
    # (a stand-in for the compiler records what it found)
    import torch.utils.cpp_extension

    directory = tmp_path / "cache" / f"ext-{build._build_key()}"
    directory.mkdir(parents=True)
    (directory / "lock").touch()
    found = []

    def fake_load(**kwargs: object) -> str:
        found.append((Path(str(kwargs["build_directory"])) / "lock").exists())
        return "built"

    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
    assert build.extension() == "built"
    assert found == [False]


def test_the_build_compiles_every_kernel_file_and_keys_on_all_of_them() -> None:
    # kernels_all.cpp includes each kernel file (a file it missed would leave its operators
    # unregistered), and every source and header changes the build key
    csrc = Path(build.__file__).parent / "csrc"
    included = re.findall(r'^#include "(\w+\.cpp)"', (csrc / "kernels_all.cpp").read_text(), re.M)
    units = {"bindings.cpp", "kernels_all.cpp"}
    assert sorted(included) == sorted(p.name for p in csrc.glob("*.cpp") if p.name not in units)
    assert {p.name for p in build._UNITS} == units
    assert set(build._SOURCES) | set(build._HEADERS) == set(csrc.glob("*.cpp")) | set(
        csrc.glob("*.h")
    )


@pytest.mark.skipif(build.extension() is None, reason="needs the compiled kernels")
def test_the_build_key_is_the_same_after_the_build() -> None:
    # the key names the folder a build is looked up in: one that changed once the extension was
    # built would send the next lookup (another process, the installed package) to a new build
    loaded = Path(build.extension().__file__).parent
    assert loaded.name == f"ext-{build._build_key()}"
