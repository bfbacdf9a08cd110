"""Start-up: the driver creates a fresh start's operators beside the coordinator,
and keeps worker processes ready for the next job (rayflow/_internal/job/warm.py)."""

from __future__ import annotations

import time
from typing import Any

import psutil
import pytest
import ray

import rayflow as rf
from rayflow._internal.job import warm


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def _gone(name: str) -> bool:
    try:
        ray.get_actor(name, namespace="rayflow")
    except ValueError:
        return True
    return False


def _shuffle(name: str) -> rf.Dataflow:
    """Sources that send to keyed partitions: operators that each know others."""
    flow = rf.Dataflow(name, parallelism=2)
    numbers = flow.source(
        "numbers", rf.sources.Generator(lambda p, i: (i % 13, 1), partitions=2, rate=2000)
    )
    sums = numbers.key_by("by_key", lambda r: r[0]).reduce(
        "sum", lambda acc, r: acc + r[1], initial=0
    )
    sums.sink("out", rf.testing.Discard())
    return flow


def test_the_operators_of_a_fresh_start_die_with_the_coordinator() -> None:
    """The driver created them, but only the coordinator held them: no orphans."""
    handle = rf.start(_shuffle("orphans"))
    names = [f"rayflow/orphans/{a}/{p}" for a in ("numbers", "sum") for p in (0, 1)]
    assert not any(_gone(n) for n in names)
    ray.kill(ray.get_actor("rayflow/orphans/coordinator", namespace="rayflow"))
    with pytest.raises(rf.JobFailedError, match="coordinator died"):
        handle.wait(timeout=30)
    # ~0.3 s here; a handle the coordinator had passed on to another operator kept one
    # alive for ~7 s, and past a restarted coordinator's wait for the names (10 s).
    _wait_for(lambda: all(_gone(n) for n in names), 4, "the operators' end")


def test_a_job_on_a_warm_ray_takes_workers_started_before_it() -> None:
    rf.run(_tiny("warm-up"))  # leaves the pool filled for a job like it
    raylet = warm.POOL._raylet
    assert raylet is not None, "the driver found no local raylet to prestart workers on"
    # Its coordinator and three operators (the keyed step at parallelism 2 has actors
    # of its own): four workers.
    _wait_for(lambda: raylet.count()[0] >= 4, 15, "4 idle workers")
    submitted = time.time()
    handle = rf.start(_tiny("warm", limit=None))
    try:
        born: list[float] = []
        for name in ("numbers/0", "sum/0", "sum/1"):
            actor = ray.get_actor(f"rayflow/warm/{name}", namespace="rayflow")
            where: Any = ray.get(actor.where.remote())
            born.append(psutil.Process(where["pid"]).create_time())
        assert all(b < submitted for b in born), (submitted, born)
    finally:
        handle.stop()


def test_a_job_that_finds_its_workers_idle_starts_no_processes_beside_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pool asks for what it lacks when asked, once: it does not keep a level up
    while the job's own actors (or the next job's) take the idle workers, which
    started new processes beside the running job (measured: each job after the
    first of a row ran at a third of its rate, its CPU going to 5 worker starts)."""
    monkeypatch.setenv("RAYFLOW_WARM_DURING_S", "-1")  # the suite's refill while jobs run: off
    rf.run(_tiny("refill-a"))  # leaves the pool filled for a job like it
    raylet = warm.POOL._raylet
    assert raylet is not None, "the driver found no local raylet to prestart workers on"
    _wait_for(lambda: raylet.count()[0] >= 4, 15, "4 idle workers")
    _wait_for(lambda: raylet.count()[1] == 0, 15, "no worker starting")
    before = {p.pid for p in psutil.Process(raylet.pid).children()}
    handle = rf.start(_tiny("refill-b", limit=None))
    try:
        time.sleep(1.0)  # the old refill thread looked every 0.05 s for 10 s
        started = [
            " ".join(p.cmdline()[:1])
            for p in psutil.Process(raylet.pid).children()
            if p.pid not in before
        ]
        assert started == [], f"worker processes started beside the running job: {started}"
    finally:
        handle.stop()


def _tiny(name: str, limit: int | None = 100) -> rf.Dataflow:
    flow = rf.Dataflow(name)
    numbers = flow.source(
        "numbers", rf.sources.Generator(lambda p, i: (i % 3, 1), limit=limit, rate=1000)
    )
    sums = numbers.key_by("by_key", lambda r: r[0]).reduce(
        "sum", lambda acc, r: acc + r[1], initial=0, parallelism=2
    )
    sums.sink("out", rf.testing.Discard(), parallelism=2)
    return flow


def test_rays_workers_import_rayflow_before_they_take_work() -> None:
    """A Ray that rayflow starts (here: the tests', the same way) has its workers import
    rayflow's actor modules, and what Ray's serialization context imports for a job
    (pyarrow), when they start, not when an actor needs them (a job's actors and a
    replacement actor then start sooner: benchmarks/startup.py, benchmarks/recovery.py)."""

    @ray.remote(num_cpus=0)
    def worker() -> tuple[list[str], dict[str, bool]]:
        import sys

        # sys.argv: the worker's command line as Ray started it (its process title
        # is rewritten to ray::...).
        wanted = ("rayflow._internal.runtime.actor", "rayflow._internal.job.coordinator")
        return list(sys.argv), {m: m in sys.modules for m in (*wanted, "pyarrow")}

    cmdline, imported = ray.get(worker.remote(), timeout=60)
    assert any(
        a.startswith("--worker-preload-modules=") and "rayflow._internal.preload" in a
        for a in cmdline
    ), cmdline
    assert all(imported.values()), imported
