"""The compiled CPU kernels: built on first use from the sources shipped in ``csrc/``, cached.

The extension (C++ with OpenMP, through ``torch.utils.cpp_extension``) is cached in
``$SPARSELEARN_CACHE`` (default ``~/.cache/sparselearn``), keyed by everything that changes the
binary: its sources, flags and compiler, the CPU, the Python environment (torch, interpreter,
location) and the sources' folder, so that two environments, or two copies of the package, never
rebuild each other's build. Where it cannot be had (sources missing, no compiler, a failed
build), one warning says why and how to get it, and the PyTorch backend computes the same
results.
``SPARSELEARN_BACKEND`` chooses: ``auto`` (the default), ``cpp`` (the compiled kernels or an
error) or ``torch`` (always the fallback). ``SPARSELEARN_MARCH`` sets the instruction set the
kernels are compiled for (``-march``; default ``native``): ``x86-64-v3`` builds the AVX2 kernels
on an AVX-512 machine, so that both can be tested and timed on one CPU.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("sparselearn")

_CSRC = Path(__file__).parent / "csrc"
# the two translation units compiled (built in parallel, bindings.cpp parsing torch/extension.h)
# and the kernel files kernels_all.cpp includes, one per kernel family, with the headers they
# share: all of them change the binary
_UNITS = tuple(_CSRC / f for f in ("bindings.cpp", "kernels_all.cpp"))
_SOURCES = (
    *_UNITS,
    *(
        _CSRC / f
        for f in ("conv.cpp", "dropout.cpp", "layouts.cpp", "linear.cpp", "norm.cpp", "pool.cpp")
    ),
)
_HEADERS = tuple(_CSRC / f for f in ("common.h", "kernels.h"))
_lock = threading.Lock()
_extension: Any = None
_extension_error: str | None = None

BACKENDS = ("auto", "cpp", "torch")
HOW_TO_BUILD = (
    "the compiled kernels need the package's C++ sources, a C++ compiler with OpenMP (g++) and "
    "ninja (e.g. `apt install g++ ninja-build` or `pip install ninja`); see docs/speed.md, "
    '"Building the kernels"'
)


def backend_setting() -> str:
    """``$SPARSELEARN_BACKEND``: ``auto`` (unset or empty), ``cpp`` or ``torch``."""
    value = os.environ.get("SPARSELEARN_BACKEND", "").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(
            f"SPARSELEARN_BACKEND must be one of {', '.join(BACKENDS)} (or unset), got "
            f"{os.environ['SPARSELEARN_BACKEND']!r}"
        )
    return value


_LDFLAGS = ("-fopenmp",)


def march() -> str:
    """``$SPARSELEARN_MARCH``: the ``-march`` of the kernel build (``native`` where unset)."""
    value = os.environ.get("SPARSELEARN_MARCH", "").strip() or "native"
    if not all(c.isalnum() or c in "-_.+" for c in value):
        raise ValueError(
            f"SPARSELEARN_MARCH must be a -march value of the compiler (native, x86-64-v3, "
            f"x86-64-v4, armv8.2-a, ...), got {value!r}"
        )
    return value


def _cflags() -> list[str]:
    return ["-O3", f"-march={march()}", "-fopenmp"]


def _compiler() -> str:
    """The C++ compiler torch's builder will call (``$CXX``, else ``c++``) and its version."""
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run(
            [cxx, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    return f"{cxx}: {out.splitlines()[0] if out else 'unknown'}"


def _build_key() -> str:
    """Everything that changes the binary: the sources and headers, the flags (``-march``
    among them), the compiler, the CPU (for ``-march=native``), and the Python environment the
    extension is built against (its torch, its interpreter, its location), and where the
    sources are."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        flags = platform.processor()
    h = hashlib.sha256()
    for source in (*_SOURCES, *_HEADERS):
        h.update(source.read_bytes())
    for part in (
        " ".join((*_cflags(), *_LDFLAGS)),
        _compiler(),
        flags,
        torch.__version__,
        str(torch.version.git_version),
        str(Path(torch.__file__).parent),
        # the sources' folder: the builder's files name it, and two copies of the package (a
        # checkout and an installed wheel) sharing one folder would rebuild over each other
        str(_CSRC),
        sys.version,
        sys.prefix,
    ):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def _ninja_on_path() -> dict[str, str]:
    """The environment for the build: PATH extended by the ``ninja`` package's binary where no
    ninja is on PATH (torch's builder calls ``ninja`` by name)."""
    env = dict(os.environ)
    if shutil.which("ninja") is None:
        try:
            import ninja  # type: ignore[import-not-found, unused-ignore]

            env["PATH"] = os.pathsep.join([str(ninja.BIN_DIR), env.get("PATH", "")])
        except ImportError:
            pass
    return env


def _build() -> Any:
    missing = [str(s) for s in (*_SOURCES, *_HEADERS) if not s.is_file()]
    if missing:
        raise FileNotFoundError(
            "the kernel sources are not installed with sparselearn (missing "
            f"{', '.join(missing)}); reinstall it from a wheel or sdist that ships them"
        )
    if shutil.which("ninja", path=_ninja_on_path().get("PATH")) is None:
        raise RuntimeError("ninja is not installed")
    cache = Path(os.environ.get("SPARSELEARN_CACHE", Path.home() / ".cache" / "sparselearn"))
    build = cache / f"ext-{_build_key()}"
    build.mkdir(parents=True, exist_ok=True)
    from torch.utils.cpp_extension import load

    logger.info("building the sparse CPU kernels in %s (once)", build)
    saved = {k: os.environ.get(k) for k in ("PATH", "MAX_JOBS")}
    os.environ["PATH"] = _ninja_on_path()["PATH"]
    # one compile per core (ninja's default runs more, and the builds then slow each other)
    os.environ.setdefault("MAX_JOBS", str(len(os.sched_getaffinity(0))))
    try:
        # one builder at a time, under a lock the system releases when its holder dies:
        # PyTorch's own (a file named "lock" that its builder deletes when done) outlives a
        # builder that is killed, and every later build would then wait for it forever
        with open(build / "sparselearn.lock", "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            (build / "lock").unlink(missing_ok=True)  # only a dead builder's can be there
            return load(
                name="sparselearn_cpu",
                sources=[str(s) for s in _UNITS],
                extra_cflags=_cflags(),
                # (a copy: the builder appends its own flags to the list it is given)
                extra_ldflags=list(_LDFLAGS),
                build_directory=str(build),
                verbose=False,
            )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _summary(err: BaseException) -> str:
    """One line for a build failure: a compiler's own error where the log holds one (the log
    of a failed build starts with the compile command, which says little)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    for line in lines:
        if not line.startswith("Error building extension") and any(
            k in line for k in ("error:", "Error:", "not found", "No such file")
        ):
            return f"the C++ build failed: {line[:300]}"
    return f"{type(err).__name__}: {(lines[0] if lines else '')[:300]}"


def extension() -> Any:
    """The compiled extension, built on first call; None if it cannot be had here (the reason
    is in :func:`unavailable_reason`, and logged once as a warning)."""
    global _extension, _extension_error
    with _lock:
        if _extension is not None or _extension_error is not None:
            return _extension
        setting = backend_setting()
        if setting == "torch":
            _extension_error = "disabled by SPARSELEARN_BACKEND=torch"
            return None
        try:
            _extension = _build()
        except Exception as err:  # sources missing, no compiler, a failed build: say why
            _extension_error = _summary(err)
            logger.debug("building the sparse CPU kernels failed", exc_info=True)
            if setting == "auto":  # with "cpp", kernels_for raises instead
                logger.warning(
                    "sparse CPU kernels unavailable (%s); using the PyTorch backend, which gives "
                    "the same results more slowly. To get them: %s",
                    _extension_error,
                    HOW_TO_BUILD,
                )
    return _extension


def loaded() -> Any:
    """The compiled extension if it is loaded (None otherwise: nothing is built)."""
    return _extension


def unavailable_reason() -> str | None:
    """Why the compiled kernels are not available (None: they are, or were not tried yet)."""
    return _extension_error
