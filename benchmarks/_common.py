"""Shared helpers of the benchmark scripts (not part of rayflow)."""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

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


def wait_for_workers(flow: Any, timeout_s: float = 30.0) -> float:
    """Wait until this node has an idle Ray worker for each of the job's actors (at most
    ``timeout_s``); returns the seconds waited.

    A running Ray, as a cluster or a notebook session has it, has them, and
    is otherwise quiet; one that ``ray.init`` started a moment ago is still
    starting its worker processes (~0.3 s of CPU each) and agents, beside
    the job, which is not the job's cost but Ray's start, timed apart
    (``runtime_started``).
    """
    import psutil

    from rayflow._internal.job import launcher, warm
    from rayflow._internal.plan import build_plan

    here, anywhere = launcher.actors_of(build_plan(flow.spec()))
    started = time.monotonic()
    warm.POOL.ensure(here, anywhere)
    raylet = warm.POOL._raylet
    while raylet is not None and time.monotonic() - started < timeout_s:
        idle, starting = raylet.count()
        if idle >= here + anywhere and not starting:
            break
        time.sleep(0.05)
    # Then until the machine is quiet: a Ray just started is busy for a few seconds
    # more (its agents, the workers' imports), which a running one is not.
    while time.monotonic() - started < timeout_s and psutil.cpu_percent(interval=0.25) > 25:
        pass
    return time.monotonic() - started
