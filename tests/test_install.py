"""sparselearn as a user outside the repository gets it: an sdist built from the checkout, a
wheel built from that sdist (as pip does), installed into a folder placed first on the path of
this environment's Python (which has the pinned torch), and used from a directory outside the
checkout, with an empty kernel cache so that the compiled kernels are built from the installed
sources."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SMOKE = """
import json, torch
from torch import nn
import sparselearn as sl

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
engine = sl.sparsify(model, optimizer, method="rigl", density=0.1, total_steps=10)
x = torch.randn(32, 64)
with torch.no_grad():
    before = model(x)
report = sl.accelerate(model, engine, mode="sparse", backend="cpp")
with torch.no_grad():
    after = model(x)
print(json.dumps({
    "file": sl.__file__,
    "version": sl.__version__,
    "backends": [c.backend for c in report.layers],
    "chosen": [c.chosen for c in report.layers],
    "max_diff": float((before - after).abs().max()),
    "density": engine.density(),
}))
"""


def _run(*cmd: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.stdout


PIP = (sys.executable, "-m", "pip", "--disable-pip-version-check", "-q")


def _clean_tree(dest: Path) -> Path:
    """What a fresh clone gives the build: the project files, without the build metadata an
    editable install leaves in the checkout (a stale SOURCES.txt would feed the sdist)."""
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy2(REPO / name, dest / name)
    ignore = shutil.ignore_patterns("*.egg-info", "__pycache__", "*.pyc")
    shutil.copytree(REPO / "src", dest / "src", ignore=ignore)
    return dest


def _wheel(source: Path, dist: Path) -> Path:
    dist.mkdir(exist_ok=True)
    before = set(dist.glob("*.whl"))
    _run(*PIP, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(source), cwd=dist)
    (wheel,) = set(dist.glob("*.whl")) - before
    return wheel


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An sdist of the checkout, a wheel built from it (``python -m build``'s way) and a wheel
    built from the tree (``pip install .``'s way)."""
    tmp = tmp_path_factory.mktemp("dist")
    tree = _clean_tree(tmp / "tree")
    out = tmp / "out"
    out.mkdir()
    hook = "import sys, setuptools.build_meta as b; print(b.build_sdist(sys.argv[1]))"
    sdist = out / _run(sys.executable, "-c", hook, str(out), cwd=tree).splitlines()[-1]
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "unpacked", filter="data")
    (unpacked,) = (tmp / "unpacked").iterdir()
    return {
        "sdist": sdist,
        "wheel": _wheel(unpacked, out),
        "tree_wheel": _wheel(_clean_tree(tmp / "tree2"), (out / "tree").resolve()),
    }


@pytest.fixture(scope="module")
def installed(dist: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the wheel built from the sdist was installed into."""
    site = tmp_path_factory.mktemp("site")
    _run(*PIP, "install", "--no-deps", "--target", str(site), str(dist["wheel"]), cwd=site)
    return site


def test_both_wheels_and_the_sdist_carry_the_kernel_sources(dist: dict[str, Path]) -> None:
    sources = sorted(
        f"sparselearn/kernels/csrc/{p.name}"
        for p in (REPO / "src/sparselearn/kernels/csrc").iterdir()
    )
    assert sources
    for kind in ("wheel", "tree_wheel"):
        with zipfile.ZipFile(dist[kind]) as whl:
            names = set(whl.namelist())
        assert set(sources) <= names, (kind, sorted(set(sources) - names))
        assert "sparselearn/py.typed" in names
    with tarfile.open(dist["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {f"src/{s}" for s in sources} <= names


def _env(site: Path, cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SPARSELEARN_BACKEND", "PYTHONPATH")}
    env.update(PYTHONPATH=str(site), SPARSELEARN_CACHE=str(cache), OMP_WAIT_POLICY="PASSIVE")
    return env


def test_the_installed_package_ships_the_kernel_sources(installed: Path) -> None:
    csrc = installed / "sparselearn" / "kernels" / "csrc"
    shipped = sorted(p.name for p in csrc.iterdir())
    in_repo = sorted(p.name for p in (REPO / "src/sparselearn/kernels/csrc").iterdir())
    assert shipped == in_repo
    assert (installed / "sparselearn" / "py.typed").exists()


def test_the_installed_package_sparsifies_and_accelerates_with_compiled_kernels(
    installed: Path, tmp_path: Path
) -> None:
    out = _run(sys.executable, "-c", SMOKE, cwd=tmp_path, env=_env(installed, tmp_path / "cache"))
    result = json.loads(out.splitlines()[-1])
    assert Path(result["file"]).is_relative_to(installed), result["file"]
    assert result["chosen"] == ["sparse", "sparse"]
    assert result["backends"] == ["cpp", "cpp"]
    assert result["max_diff"] < 1e-5
    assert abs(result["density"] - 0.1) < 0.01
    assert list((tmp_path / "cache").glob("ext-*/sparselearn_cpu*.so"))  # built here


def test_the_installed_command_lists_and_reports_its_version(
    installed: Path, tmp_path: Path
) -> None:
    import sparselearn

    env = _env(installed, tmp_path / "cache")
    listing = _run(str(installed / "bin" / "sparselearn"), "list", cwd=tmp_path, env=env)
    assert "lenet300-100" in listing
    assert "sparse_momentum" in listing
    version = _run(sys.executable, "-m", "sparselearn", "--version", cwd=tmp_path, env=env)
    assert version.strip() == f"sparselearn {sparselearn.__version__}"
