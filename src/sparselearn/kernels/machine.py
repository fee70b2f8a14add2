"""What a timing ran on: the CPU, its vector extensions and the kernel build's ``-march``.

Wall times taken on different CPUs cannot be compared (the sparse kernels' speed against dense
PyTorch differs several times between an AVX2 and an AVX-512 machine), so benchmarks print
:func:`describe` beside their figures and every training run records it in its summary; the
same-cost report compares a run's wall time only with dense runs recorded on the same machine.
"""

from __future__ import annotations

import functools
import platform
import re
from pathlib import Path

from .build import march

_EXTENSIONS = (
    ("avx512f", "AVX-512"),
    ("avx512_bf16", "AVX-512 BF16"),
    ("amx_bf16", "AMX BF16"),
    ("avx2", "AVX2"),
)


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_name() -> str:
    """The CPU's model name (``platform.processor()`` where ``/proc/cpuinfo`` has none)."""
    return _cpuinfo().get("model name") or platform.processor() or "unknown CPU"


def cpu_isa() -> str:
    """The CPU's family and model, and the vector extensions that decide the kernels' speed."""
    fields = _cpuinfo()
    if not fields:
        return f"{platform.machine() or 'ISA unknown'}"
    flags = set(fields.get("flags", "").split())
    isa = [name for flag, name in _EXTENSIONS if flag in flags]
    if not isa and "asimd" in set(fields.get("Features", "").split()):
        isa = ["NEON"]
    family = fields.get("cpu family", "?")
    return f"family {family} model {fields.get('model', '?')}; " + (", ".join(isa) or "no AVX2")


def describe() -> str:
    """The CPU, its ISA and the kernels' ``-march``: ``AMD EPYC (family 25 model 1; AVX2);
    kernels -march=native``. Runs with the same description ran on the same kind of machine
    with the same kernel build, and only their wall times are compared with each other."""
    return f"{cpu_name()} ({cpu_isa()}); kernels -march={march()}"


SEVERAL = "several: "  # the prefix of a wall time summed over more than one machine


def resumed_on(before: str, now: str) -> str:
    """The machine of a run resumed on ``now`` after epochs on ``before``: a wall time summed
    over two kinds of machine is recorded as such (``several: A | B``), so that it is compared
    with no single machine's."""
    if before == now:
        return now
    seen = before.removeprefix(SEVERAL).split(" | ")
    return SEVERAL + " | ".join([*seen, now] if now not in seen else seen)


def slug(description: str | None = None) -> str:
    """``describe()`` as a folder name: ``amd-epyc-family-25-model-1-avx2-kernels-march-native``."""
    text = (description or describe()).lower()
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")
