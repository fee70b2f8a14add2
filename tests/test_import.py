"""`import sparselearn` stays lean: torch and nothing heavy, no CUDA initialisation."""

from __future__ import annotations

import subprocess
import sys


def test_import_is_lean() -> None:
    # measured against what `import torch` alone loads (torch imports tqdm when it is installed)
    code = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "import sparselearn\n"
        "heavy = [m for m in ('matplotlib', 'tqdm', 'scipy', 'pandas', 'yaml', 'transformers',"
        " 'lightning', 'pytorch_lightning', 'tensorboard', 'safetensors', 'accelerate',"
        " 'compressed_tensors', 'pydantic',"
        " 'sparselearn.compat', 'sparselearn.experiments', 'sparselearn.integrations',"
        " 'sparselearn_cpu', 'torch.utils.cpp_extension')"
        " if m in sys.modules and m not in before]\n"
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
