"""`import sparselearn` stays lean: torch and nothing heavy, no CUDA initialisation."""

from __future__ import annotations

import subprocess
import sys


def test_import_is_lean() -> None:
    code = (
        "import sys, sparselearn, torch\n"
        "heavy = [m for m in ('matplotlib', 'tqdm', 'scipy', 'pandas', 'yaml',"
        " 'sparselearn.compat') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_package_is_typed() -> None:
    import importlib.resources

    assert importlib.resources.files("sparselearn").joinpath("py.typed").is_file()
