"""What the coordinator hands to ``ray.util.metrics`` (a fake factory; no Ray).

The real export to Prometheus is tested on a real head in
tests/clusters/test_ray_metrics.py.
"""

from __future__ import annotations

import re
from typing import Any

from rayflow._internal.job.ray_metrics import METRICS, RayMetrics


class FakeMetric:
    """Keeps what a Prometheus scrape would show: counters' totals, gauges' last values."""

    def __init__(self, kind: str, tag_keys: tuple[str, ...]):
        self.kind = kind
        self.tag_keys = tag_keys
        self.values: dict[tuple[tuple[str, str], ...], float] = {}
        self.observed: list[tuple[float, dict[str, str]]] = []

    def _key(self, tags: dict[str, str]) -> tuple[tuple[str, str], ...]:
        assert set(tags) == set(self.tag_keys), (tags, self.tag_keys)
        assert all(isinstance(v, str) for v in tags.values())
        return tuple(sorted(tags.items()))

    def inc(self, value: float, tags: dict[str, str]) -> None:
        assert value > 0  # ray.util.metrics.Counter refuses anything else
        key = self._key(tags)
        self.values[key] = self.values.get(key, 0.0) + value

    def set(self, value: float, tags: dict[str, str]) -> None:
        self.values[self._key(tags)] = value

    def observe(self, value: float, tags: dict[str, str]) -> None:
        self._key(tags)
        self.observed.append((value, tags))


class FakeFactory:
    def __init__(self) -> None:
        self.made: dict[str, FakeMetric] = {}

    def counter(self, name: str, description: str, tag_keys: tuple[str, ...]) -> FakeMetric:
        return self.made.setdefault(name, FakeMetric("counter", tag_keys))

    def gauge(self, name: str, description: str, tag_keys: tuple[str, ...]) -> FakeMetric:
        return self.made.setdefault(name, FakeMetric("gauge", tag_keys))

    def histogram(
        self, name: str, description: str, boundaries: list[float], tag_keys: tuple[str, ...]
    ) -> FakeMetric:
        assert boundaries == sorted(boundaries) and boundaries[0] > 0
        return self.made.setdefault(name, FakeMetric("histogram", tag_keys))


def _value(metric: FakeMetric, **tags: str) -> float:
    return metric.values[tuple(sorted(tags.items()))]


def _entry(partition: int, **fields: Any) -> dict[str, Any]:
    return {"partition": partition, **fields}


def test_names_and_tags_are_prometheus_safe() -> None:
    for metric in METRICS:
        assert re.fullmatch(r"rayflow_[a-z_]+", metric.name), metric.name
        assert "job" not in metric.tag_keys  # Prometheus' own label
        assert all(re.fullmatch(r"rayflow_[a-z_]+", k) for k in metric.tag_keys), metric.name


def test_counters_follow_the_operators_counts_across_a_reset() -> None:
    factory = FakeFactory()
    metrics = RayMetrics("wc", factory)
    metrics.update({"src": [_entry(0, records_out=100), _entry(1, records_out=50)]}, [])
    metrics.update({"src": [_entry(0, records_out=250), _entry(1, records_out=50)]}, [])
    out = factory.made["rayflow_records_out"]
    tags = {"rayflow_job": "wc", "rayflow_step": "src"}
    assert _value(out, **tags, rayflow_partition="0") == 250
    assert _value(out, **tags, rayflow_partition="1") == 50
    # Partition 0 was replaced in a recovery: its count starts again from 0.
    metrics.update({"src": [_entry(0, records_out=30), _entry(1, records_out=60)]}, [])
    assert _value(out, **tags, rayflow_partition="0") == 280  # a counter never goes down
    assert _value(out, **tags, rayflow_partition="1") == 60


def test_gauges_hold_the_latest_poll_and_utilization_is_a_share() -> None:
    factory = FakeFactory()
    metrics = RayMetrics("wc", factory)
    metrics.update(
        {
            "count": [
                _entry(0, busy_ms_per_s=400.0, idle_ms_per_s=600.0, backpressured_ms_per_s=0.0,
                       mailbox_depth=3, mailbox_bytes=4096, records_out_per_s=1200.0,
                       inflight_s=0.8),
            ]
        },
        [],
    )  # fmt: skip
    tags = {"rayflow_job": "wc", "rayflow_step": "count", "rayflow_partition": "0"}
    assert _value(factory.made["rayflow_busy_ratio"], **tags) == 0.4
    assert _value(factory.made["rayflow_idle_ratio"], **tags) == 0.6
    assert _value(factory.made["rayflow_mailbox_depth"], **tags) == 3
    assert _value(factory.made["rayflow_mailbox_bytes"], **tags) == 4096
    assert _value(factory.made["rayflow_records_out_per_second"], **tags) == 1200.0
    assert _value(factory.made["rayflow_inflight_seconds"], **tags) == 0.8
    # Not reported by this step: not published (rather than a made-up 0).
    assert factory.made["rayflow_records_uncommitted"].values == {}


def test_alerts_are_1_while_active_and_0_once_cleared() -> None:
    factory = FakeFactory()
    metrics = RayMetrics("wc", factory)
    stalled = {"kind": "stalled", "step": "count", "partition": 1}
    failing = {"kind": "checkpoint_failing", "step": None, "partition": None}
    metrics.update({}, [stalled, failing])
    alerts = factory.made["rayflow_alerts"]
    assert _value(
        alerts, rayflow_job="wc", rayflow_alert_kind="stalled", rayflow_step="count",
        rayflow_partition="1",
    ) == 1  # fmt: skip
    metrics.update({}, [failing])
    assert _value(
        alerts, rayflow_job="wc", rayflow_alert_kind="stalled", rayflow_step="count",
        rayflow_partition="1",
    ) == 0  # fmt: skip
    assert _value(
        alerts, rayflow_job="wc", rayflow_alert_kind="checkpoint_failing", rayflow_step="",
        rayflow_partition="",
    ) == 1  # fmt: skip


def test_finished_checkpoints_and_recoveries() -> None:
    factory = FakeFactory()
    metrics = RayMetrics("wc", factory)
    for outcome, seconds in (("completed", 0.4), ("completed", 1.2), ("failed", 30.0)):
        metrics.finished(
            {"type": "checkpoint", "kind": "checkpoint", "outcome": outcome,
             "started": 100.0, "ended": 100.0 + seconds}
        )  # fmt: skip
    metrics.finished({"type": "recovery", "started": 200.0, "ended": 202.5})
    assert _value(factory.made["rayflow_checkpoints_completed"], rayflow_job="wc") == 2
    assert _value(factory.made["rayflow_checkpoints_failed"], rayflow_job="wc") == 1
    durations = [
        (round(v, 3), t["rayflow_checkpoint_outcome"])
        for v, t in factory.made["rayflow_checkpoint_duration_seconds"].observed
    ]
    assert durations == [(0.4, "completed"), (1.2, "completed"), (30.0, "failed")]
    assert _value(factory.made["rayflow_restarts"], rayflow_job="wc") == 1
    assert [v for v, _ in factory.made["rayflow_recovery_duration_seconds"].observed] == [2.5]


def test_a_failing_metrics_backend_never_breaks_the_job() -> None:
    class Broken(FakeFactory):
        def gauge(self, name: str, description: str, tag_keys: tuple[str, ...]) -> FakeMetric:
            raise RuntimeError("no metrics here")

    metrics = RayMetrics("wc", Broken())
    metrics.update({"src": [_entry(0, records_out=1)]}, [])  # logged, not raised
    metrics.finished({"type": "recovery", "started": 0.0, "ended": 1.0})


def test_real_ray_metrics_are_harmless_without_a_ray_cluster() -> None:
    """ray.util.metrics outside any Ray (no metrics agent): the calls do nothing, no error."""
    metrics = RayMetrics("wc")
    metrics.update({"src": [_entry(0, records_out=5, busy_ms_per_s=100.0)]}, [])
    metrics.finished(
        {"type": "checkpoint", "kind": "checkpoint", "outcome": "completed",
         "started": 0.0, "ended": 0.5}
    )  # fmt: skip
    assert not metrics._broken
