"""An unbounded job: started, observed through metrics(), found by name, stopped."""

from __future__ import annotations

import time
from typing import Any

import ray
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import rayflow as rf

METRIC_KEYS = {
    "partition",
    "records_in",
    "records_out",
    "mailbox_depth",
    "mailbox_bytes",
    "busy_ms_per_s",
    "idle_ms_per_s",
    "backpressured_ms_per_s",
    "records_out_per_s",
}


def _wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def test_unbounded_generator_job_runs_until_stopped() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    flow = rf.Dataflow("endless", parallelism=2)
    events = flow.source(
        "events",
        rf.sources.Generator(
            lambda p, i: {"user": f"u{i % 97}", "n": i}, partitions=2, rate=20_000
        ),
    )
    per_user = events.key_by("by_user", lambda e: e["user"]).reduce(
        "count", lambda acc, e: acc + 1, initial=0
    )
    per_user.sink("out", rf.testing.Collect())
    handle = rf.start(
        flow, meter_provider=provider, runtime=rf.RuntimeConfig(metrics_interval_s=0.2)
    )
    try:
        assert handle.status() is rf.JobStatus.RUNNING
        # Operator actors are named actors in namespace "rayflow"; a fused
        # chain is named after its first step.
        for name in ("events/0", "events/1", "count/0", "count/1"):
            ray.get_actor(f"rayflow/endless/{name}", namespace="rayflow")
        ray.get_actor("rayflow/endless/coordinator", namespace="rayflow")

        _wait_for(lambda: sum(e["records_in"] for e in handle.metrics()["count"]) > 20_000)
        metrics = handle.metrics()
        assert set(metrics) == {"events", "by_user", "count", "out"}
        for step, partitions in metrics.items():
            assert [e["partition"] for e in partitions] == [0, 1], step
            for entry in partitions:
                assert METRIC_KEYS <= set(entry), step
                total = (
                    entry["busy_ms_per_s"]
                    + entry["idle_ms_per_s"]
                    + entry["backpressured_ms_per_s"]
                )
                assert 800 < total < 1200, (step, entry)  # the three add up to a second
        # The source runs at its configured rate (20,000/s for both partitions).
        rate = sum(e["records_out_per_s"] for e in metrics["events"])
        assert 14_000 < rate < 26_000, rate
    finally:
        result = handle.stop()
    assert result.status is rf.JobStatus.STOPPED
    assert handle.status() is rf.JobStatus.STOPPED
    # Stopping drains: everything the sources emitted reached the sink, once.
    emitted = result.records_out("events")
    assert emitted > 20_000
    assert len(result.output("out")) == emitted == result.records_in("out")

    # The metrics went to the OpenTelemetry MeterProvider we passed in.
    data = reader.get_metrics_data()
    names = {
        m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
    }
    assert {
        "rayflow.records_in",
        "rayflow.busy.utilization",
        "rayflow.mailbox.depth",
        "rayflow.backpressured.utilization",
    } <= set(names)
    points = {
        (p.attributes["rayflow.step"], p.attributes["rayflow.partition"]): p.value
        for p in names["rayflow.records_out"].data.data_points
    }
    assert points[("events", 0)] > 0 and points[("events", 1)] > 0
