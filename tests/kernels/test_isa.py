"""The compiled kernels on every instruction set: ``SPARSELEARN_MARCH`` chooses the ``-march`` of
the build (a separate cached build per value), the kernel tests pass on an AVX2 build
(x86-64-v3) as on the machine's own where this CPU has AVX-512 (elsewhere the machine's own
build takes the AVX2 paths, and the whole suite tests them), and the kernel sources compile for
ARM64."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import sparselearn as sl
from sparselearn.kernels import build, extension

ROOT = Path(__file__).resolve().parents[2]
# what x86-64-v3 assumes of the CPU (GCC's level: AVX2, FMA, BMI1/2, F16C, LZCNT, MOVBE)
X86_64_V3 = {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "abm", "movbe"}


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_march_defaults_to_native_and_refuses_what_is_no_flag(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SPARSELEARN_MARCH", raising=False)
    assert build.march() == "native"
    monkeypatch.setenv("SPARSELEARN_MARCH", "x86-64-v3")
    assert build.march() == "x86-64-v3"
    monkeypatch.setenv("SPARSELEARN_MARCH", "native -O0")
    with pytest.raises(ValueError, match="SPARSELEARN_MARCH must be a -march value"):
        build.march()


def test_each_march_has_its_own_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSELEARN_MARCH", "native")
    native = build._build_key()
    monkeypatch.setenv("SPARSELEARN_MARCH", "x86-64-v3")
    assert build._build_key() != native


@pytest.mark.skipif(extension() is None, reason="needs the compiled kernels")
def test_the_accelerate_report_names_the_build() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    engine = sl.sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "static", 0.5)
    report = sl.accelerate(model, engine, mode="sparse")
    assert report.march == build.march()
    assert str(report).splitlines()[-1] == f"compiled kernels built with -march={build.march()}"


KERNEL_TESTS = [
    "tests/kernels/test_layers.py",
    "tests/accel/test_accelerate.py",
    "tests/accel/test_precision.py",
    "tests/accel/test_pooling.py",
    "tests/accel/test_norm.py",
    "tests/accel/test_dropout.py",
]


@pytest.mark.timeout(1200)
@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or not X86_64_V3.issubset(cpu_flags()),
    reason="this CPU cannot run an x86-64-v3 (AVX2) build",
)
@pytest.mark.skipif(
    "avx512f" not in cpu_flags(),
    reason="this CPU has no AVX-512: its own build is an AVX2 build, which the kernel tests test",
)
@pytest.mark.skipif(extension() is None, reason="needs the compiled kernels")
def test_the_kernel_tests_pass_on_an_avx2_build() -> None:
    # tolerance against PyTorch, gradient checks and bit-identity across thread counts, on the
    # kernels a CPU without AVX-512 runs (in another process: the extension loads once)
    env = {**os.environ, "SPARSELEARN_MARCH": "x86-64-v3", "SPARSELEARN_BACKEND": "cpp"}
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "from sparselearn.kernels import build, extension\n"
            "assert extension() is not None, build.unavailable_reason()\n"
            "print(build.march())",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.strip() == "x86-64-v3"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *KERNEL_TESTS],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1100,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-4000:]
    assert " passed" in run.stdout.splitlines()[-1]


ARM64_CXX = "aarch64-linux-gnu-g++"


@pytest.mark.timeout(600)
@pytest.mark.skipif(
    shutil.which(ARM64_CXX) is None,
    reason=f"needs {ARM64_CXX} (Debian's g++-aarch64-linux-gnu; make test installs it)",
)
def test_the_kernel_sources_compile_for_arm64(tmp_path: Path) -> None:
    # every x86 intrinsic sits under its guard: an Apple Silicon or Graviton user gets the
    # compiled kernels, on 16-byte NEON vectors (bindings.cpp holds no kernel code, and its
    # Python headers are this machine's)
    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{p}" for p in include_paths()]
    csrc = ROOT / "src" / "sparselearn" / "kernels" / "csrc"
    # the translation unit the build compiles, which includes every kernel file
    result = subprocess.run(
        [ARM64_CXX, "-std=c++17", "-O2", "-march=armv8-a", "-fopenmp", "-fPIC", *includes,
         "-c", str(csrc / "kernels_all.cpp"), "-o", str(tmp_path / "kernels_all.o")],
        capture_output=True, text=True, timeout=500, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    header = (tmp_path / "kernels_all.o").read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    assert int.from_bytes(header[18:20], "little") == 183  # e_machine: EM_AARCH64
