"""Test-wide settings."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "sparselearn",
    deadline=None,  # torch op timings vary too much on a shared 2-core VM
    derandomize=True,  # CI runs the same examples every time
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("sparselearn")
