"""Test-wide settings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "sparselearn",
    deadline=None,  # torch op timings vary too much on a shared 2-core VM
    derandomize=True,  # CI runs the same examples every time
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("sparselearn")


@pytest.fixture(autouse=True)
def _restore_torch_globals() -> Iterator[None]:
    """Each test starts with the session's thread count and deterministic mode, whatever the
    test before it set (Lightning's Trainer(deterministic=True) turns the mode on and leaves it
    on; the thread-count tests set 1 and 2 threads)."""
    threads = torch.get_num_threads()
    deterministic = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])


@pytest.fixture(scope="session")
def stdlib_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder holding the stdlib-text corpus (validation fraction 0.1, split seed 0),
    built once for the session: the tests that use it only read it."""
    from sparselearn.data import text

    folder = tmp_path_factory.mktemp("stdlib-text-data")
    text.load_text(folder, 0.1, 0)
    return folder
