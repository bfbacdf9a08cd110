"""Shared helpers of the benchmark scripts (not part of rayflow)."""

from __future__ import annotations

import os
import tempfile

import ray

from rayflow._internal.job.warm import preload_in_new_ray


def start_ray() -> None:
    """A private local Ray with every listener on loopback, as in the tests."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="rf-bench-", dir="/tmp"))
    preload_in_new_ray()  # as rayflow does when it starts a Ray itself
    ray.init(address="local", include_dashboard=False, log_to_driver=True)


def rate(n: float, seconds: float) -> str:
    return f"{n / seconds:,.0f}/s" if seconds > 0 else "inf"
