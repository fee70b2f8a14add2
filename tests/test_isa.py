"""The compiled kernels on every instruction set: ``SPARSELEARN_MARCH`` chooses the ``-march`` of
the build (a separate cached build per value), and the kernel tests pass on an AVX2 build
(x86-64-v3) as on the machine's own, where this CPU can run it."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import sparselearn as sl
from sparselearn.kernels import build, extension

ROOT = Path(__file__).resolve().parents[1]
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
    "tests/test_accel.py",
    "tests/test_accel_precision.py",
    "tests/test_pooling.py",
    "tests/test_norm.py",
    "tests/test_dropout.py",
]


@pytest.mark.timeout(1200)
@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or not X86_64_V3.issubset(cpu_flags()),
    reason="this CPU cannot run an x86-64-v3 (AVX2) build",
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
