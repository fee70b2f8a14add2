"""Test-wide settings."""

from __future__ import annotations

from collections.abc import Iterator

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
def _restore_deterministic_algorithms() -> Iterator[None]:
    """Lightning's Trainer(deterministic=True) turns on PyTorch's global deterministic mode and
    leaves it on: each test starts with the mode the session started with."""
    was = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    yield
    torch.use_deterministic_algorithms(was[0], warn_only=was[1])
