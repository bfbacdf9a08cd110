"""The job's metrics through ``ray.util.metrics``: where Ray users look (Prometheus, Grafana).

Ray's metrics agent serves every process's ``ray.util.metrics`` on each
node's metrics export port, where Ray's Prometheus (KubeRay's
PodMonitor, the dashboard's Grafana) scrapes them; Ray prefixes the names
with ``ray_`` and counters get ``_total``, so ``rayflow_records_out`` is
scraped as ``ray_rayflow_records_out_total``.

They are published by the job's coordinator actor, which reads the
operators' metrics once a second anyway (for the alerts): one update per
poll, never per record, with no OpenTelemetry set up in the driver (under
``ray job submit`` too). Tag keys are ``rayflow_job``,
``rayflow_step``, ``rayflow_partition`` (a bare ``job`` would collide with
Prometheus' own label). Without Ray's metrics agent (base ``ray``, or
``include_dashboard=False``) the values go nowhere and cost next to nothing.

Counters must only grow, but an operator's counts start again when it is
replaced in a recovery: each counter adds what its partition's count grew
by since the last poll (all of it after a reset). So ``records_out``
counts records put out, replays included.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from rayflow._internal.telemetry import (
    DURATION_BUCKETS_S,
    field_of,
    utilization_of,
    watermark_lag,
)

log = logging.getLogger("rayflow")

PARTITION_TAGS = ("rayflow_job", "rayflow_step", "rayflow_partition")
JOB_TAGS = ("rayflow_job",)
ALERT_TAGS = ("rayflow_job", "rayflow_alert_kind", "rayflow_step", "rayflow_partition")
CHECKPOINT_TAGS = ("rayflow_job", "rayflow_checkpoint_kind", "rayflow_checkpoint_outcome")


class MetricFactory(Protocol):
    """What ``ray.util.metrics`` offers (a fake one in unit tests)."""

    def counter(self, name: str, description: str, tag_keys: tuple[str, ...]) -> Any: ...

    def gauge(self, name: str, description: str, tag_keys: tuple[str, ...]) -> Any: ...

    def histogram(
        self, name: str, description: str, boundaries: list[float], tag_keys: tuple[str, ...]
    ) -> Any: ...


class RayUtilMetrics:
    """The real factory: ``ray.util.metrics`` (imported when the first metric is made)."""

    def counter(self, name: str, description: str, tag_keys: tuple[str, ...]) -> Any:
        from ray.util.metrics import Counter

        return Counter(name, description, tag_keys=tag_keys)

    def gauge(self, name: str, description: str, tag_keys: tuple[str, ...]) -> Any:
        from ray.util.metrics import Gauge

        return Gauge(name, description, tag_keys=tag_keys)

    def histogram(
        self, name: str, description: str, boundaries: list[float], tag_keys: tuple[str, ...]
    ) -> Any:
        from ray.util.metrics import Histogram

        return Histogram(name, description, boundaries=boundaries, tag_keys=tag_keys)


Read = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True)
class RayMetric:
    """One metric as Prometheus names it (before Ray's ``ray_`` prefix)."""

    name: str
    kind: str  # "counter", "gauge" or "histogram"
    description: str
    tag_keys: tuple[str, ...]


# Per step partition, read from one poll of the operators' metrics.
OPERATOR: list[tuple[RayMetric, Read]] = [
    (RayMetric("rayflow_records_in", "counter", "Records taken in by a step partition",
               PARTITION_TAGS), field_of("records_in")),
    (RayMetric("rayflow_records_out", "counter", "Records put out by a step partition",
               PARTITION_TAGS), field_of("records_out")),
    (RayMetric("rayflow_records_in_per_second", "gauge", "Records taken in per second",
               PARTITION_TAGS), field_of("records_in_per_s")),
    (RayMetric("rayflow_records_out_per_second", "gauge", "Records put out per second",
               PARTITION_TAGS), field_of("records_out_per_s")),
    (RayMetric("rayflow_mailbox_depth", "gauge",
               "Batches waiting in the mailbox (of a chain's first step)", PARTITION_TAGS),
     field_of("mailbox_depth")),
    (RayMetric("rayflow_mailbox_bytes", "gauge",
               "Bytes waiting in the mailbox (of a chain's first step)", PARTITION_TAGS),
     field_of("mailbox_bytes")),
    (RayMetric("rayflow_busy_ratio", "gauge", "Share of time spent working (0..1)",
               PARTITION_TAGS), utilization_of("busy_ms_per_s")),
    (RayMetric("rayflow_idle_ratio", "gauge", "Share of time spent waiting for input (0..1)",
               PARTITION_TAGS), utilization_of("idle_ms_per_s")),
    (RayMetric("rayflow_backpressured_ratio", "gauge",
               "Share of time spent waiting for downstream credits (0..1)", PARTITION_TAGS),
     utilization_of("backpressured_ms_per_s")),
    (RayMetric("rayflow_inflight_seconds", "gauge",
               "Seconds of work queued for a chain's first step", PARTITION_TAGS),
     field_of("inflight_s")),
    (RayMetric("rayflow_records_uncommitted", "gauge",
               "Records a source emitted or a sink took in since the last committed checkpoint",
               PARTITION_TAGS), field_of("uncommitted_records")),
    (RayMetric("rayflow_records_failed", "counter",
               "Records a step's function failed on, skipped or dead-lettered", PARTITION_TAGS),
     field_of("records_failed")),
    (RayMetric("rayflow_records_late", "counter",
               "Records a window got after their window closed", PARTITION_TAGS),
     field_of("records_late")),
    (RayMetric("rayflow_watermark_lag_seconds", "gauge",
               "Wall-clock time minus the event-time watermark of a window or process step",
               PARTITION_TAGS), watermark_lag),
]  # fmt: skip

CHECKPOINTS_COMPLETED = RayMetric(
    "rayflow_checkpoints_completed", "counter", "Checkpoints (and savepoints) completed", JOB_TAGS
)
CHECKPOINTS_FAILED = RayMetric(
    "rayflow_checkpoints_failed", "counter", "Checkpoints (and savepoints) that failed", JOB_TAGS
)
CHECKPOINT_DURATION = RayMetric(
    "rayflow_checkpoint_duration_seconds", "histogram",
    "Duration of a checkpoint, from the trigger to the sinks notified (or the failure)",
    CHECKPOINT_TAGS,
)  # fmt: skip
RESTARTS = RayMetric(
    "rayflow_restarts", "counter", "Times the job restarted from a checkpoint", JOB_TAGS
)
RECOVERY_DURATION = RayMetric(
    "rayflow_recovery_duration_seconds", "histogram",
    "Duration of a recovery, from the failure to the first record processed again", JOB_TAGS,
)  # fmt: skip
ALERTS = RayMetric(
    "rayflow_alerts", "gauge",
    "1 while an alert is active, 0 once it cleared (rayflow_step and rayflow_partition empty "
    "when the alert has none)", ALERT_TAGS,
)  # fmt: skip

#: Every metric published (the README's table shows them; a unit test checks it).
METRICS: tuple[RayMetric, ...] = (
    *(m for m, _ in OPERATOR),
    CHECKPOINTS_COMPLETED,
    CHECKPOINTS_FAILED,
    CHECKPOINT_DURATION,
    RESTARTS,
    RECOVERY_DURATION,
    ALERTS,
)


class RayMetrics:
    """Publishes one job's metrics through ``ray.util.metrics`` (from the coordinator).

    Never raises: metrics must not break a job. A failure is logged once
    and publishing stops.
    """

    def __init__(self, job: str, factory: MetricFactory | None = None):
        self.job = job
        self._factory: MetricFactory = factory or RayUtilMetrics()
        self._metrics: dict[str, Any] | None = None  # made at the first update
        self._counted: dict[tuple[str, str, str], float] = {}  # (metric, step, partition)
        self._alerts: set[tuple[str, str, str]] = set()  # active at the last update
        self._broken = False

    def update(
        self, metrics: dict[str, list[dict[str, Any]]], alerts: list[dict[str, Any]]
    ) -> None:
        """One poll of the operators' metrics and the active alerts."""
        self._safely(self._update, metrics, alerts)

    def finished(self, event: dict[str, Any]) -> None:
        """A checkpoint or a recovery finished (the coordinator's event record)."""
        self._safely(self._finished, event)

    # -- inside ---------------------------------------------------------------

    def _safely(self, fn: Callable[..., None], *args: Any) -> None:
        if self._broken:
            return
        try:
            if self._metrics is None:
                self._metrics = self._create()
            fn(*args)
        except Exception as exc:
            self._broken = True
            log.warning(
                "job %s: publishing metrics through ray.util.metrics failed, stopped: %s: %s",
                self.job,
                type(exc).__name__,
                exc,
            )

    def _create(self) -> dict[str, Any]:
        made: dict[str, Any] = {}
        for metric in METRICS:
            if metric.kind == "counter":
                made[metric.name] = self._factory.counter(
                    metric.name, metric.description, metric.tag_keys
                )
            elif metric.kind == "gauge":
                made[metric.name] = self._factory.gauge(
                    metric.name, metric.description, metric.tag_keys
                )
            else:
                made[metric.name] = self._factory.histogram(
                    metric.name, metric.description, list(DURATION_BUCKETS_S), metric.tag_keys
                )
        return made

    def _update(
        self, metrics: dict[str, list[dict[str, Any]]], alerts: list[dict[str, Any]]
    ) -> None:
        assert self._metrics is not None
        for step, entries in metrics.items():
            for entry in entries:
                partition = str(entry["partition"])
                tags = {
                    "rayflow_job": self.job,
                    "rayflow_step": step,
                    "rayflow_partition": partition,
                }
                for metric, read in OPERATOR:
                    value = read(entry)
                    if value is None:
                        continue
                    if metric.kind == "counter":
                        self._count(metric.name, (step, partition), float(value), tags)
                    else:
                        self._metrics[metric.name].set(float(value), tags)
        active = set()
        for alert in alerts:
            key = (
                str(alert["kind"]),
                "" if alert.get("step") is None else str(alert["step"]),
                "" if alert.get("partition") is None else str(alert["partition"]),
            )
            active.add(key)
        # A gauge keeps its last value: an alert that cleared is set to 0.
        for key in active | self._alerts:
            tags = {
                "rayflow_job": self.job,
                "rayflow_alert_kind": key[0],
                "rayflow_step": key[1],
                "rayflow_partition": key[2],
            }
            self._metrics[ALERTS.name].set(1.0 if key in active else 0.0, tags)
        self._alerts = active

    def _count(self, name: str, where: tuple[str, str], total: float, tags: dict[str, str]) -> None:
        """Add to a counter what a cumulative count grew by (all of it after a reset)."""
        assert self._metrics is not None
        key = (name, *where)
        last = self._counted.get(key, 0.0)
        grown = total - last if total >= last else total
        self._counted[key] = total
        if grown > 0:
            self._metrics[name].inc(grown, tags)

    def _finished(self, event: dict[str, Any]) -> None:
        assert self._metrics is not None
        seconds = max(0.0, float(event["ended"]) - float(event["started"]))
        job = {"rayflow_job": self.job}
        if event["type"] == "recovery":
            self._metrics[RESTARTS.name].inc(1, job)
            self._metrics[RECOVERY_DURATION.name].observe(seconds, job)
            return
        completed = event["outcome"] == "completed"
        counter = CHECKPOINTS_COMPLETED if completed else CHECKPOINTS_FAILED
        self._metrics[counter.name].inc(1, job)
        tags = {
            **job,
            "rayflow_checkpoint_kind": str(event["kind"]),
            "rayflow_checkpoint_outcome": str(event["outcome"]),
        }
        self._metrics[CHECKPOINT_DURATION.name].observe(seconds, tags)
