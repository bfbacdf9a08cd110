"""Publishing a job's metrics and traces through OpenTelemetry, from the driver.

The driver polls the coordinator every ``interval_s`` (one call returns the
operators' metrics, the checkpoint figures and the checkpoints and
recoveries that finished since the last poll). OpenTelemetry's observable
instruments read the latest poll; every finished checkpoint or recovery
becomes a span with a child span per phase, stamped with the times the
coordinator recorded, and its durations go into histograms. So exporting
costs the operators nothing beyond answering the poll, and everything goes
through the providers of the driver, where users configure them.

Names and units follow OpenTelemetry's semantic conventions: attributes
``rayflow.job``, ``rayflow.step``, ``rayflow.partition`` (never a bare
``job``, which Prometheus uses for its scrape job), durations as histograms
in seconds, shares of time as utilization with unit ``1``, counts with
annotations such as ``{record}``. :data:`INSTRUMENTS` is the list (the
README's table shows it; a unit test keeps the two the same).

Which providers are used is decided before the job starts, by
:func:`~rayflow._internal.telemetry_config.prepare_telemetry`; OpenTelemetry
is imported only when telemetry is on, so it is an optional dependency.
The same operator metrics also reach Ray's Prometheus export, from the
coordinator (``_internal/job/ray_metrics.py``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from rayflow._internal.telemetry_config import TelemetrySetup

log = logging.getLogger("rayflow")

Poll = Callable[[int], dict[str, Any]]
Read = Callable[[dict[str, Any]], Any]

#: Bucket boundaries (seconds) of the duration histograms: the semantic
#: conventions' advice for durations, extended to minutes for checkpoints.
DURATION_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    30.0, 60.0, 120.0, 300.0,
)  # fmt: skip


@dataclass(frozen=True)
class Instrument:
    """One published metric: its name, kind, unit, meaning and attributes."""

    name: str
    kind: str  # "counter", "gauge" (observed at each export) or "histogram" (recorded)
    unit: str
    description: str
    attributes: tuple[str, ...]


_PARTITION = ("rayflow.job", "rayflow.step", "rayflow.partition")
_JOB = ("rayflow.job",)


def utilization_of(field: str) -> Read:
    """A share of time, 0..1, from the operators' milliseconds per second."""
    return lambda e: min(1.0, max(0.0, float(e.get(field) or 0.0) / 1000.0))


def field_of(field: str) -> Read:
    return lambda e: e.get(field)


def watermark_lag(entry: dict[str, Any]) -> float | None:
    """How far event time is behind the wall clock at a window or process step."""
    watermark = entry.get("watermark")
    return None if watermark is None else time.time() - watermark


# Per step partition, observed from the latest poll: (instrument, how to read an entry).
_OPERATOR: list[tuple[Instrument, Read]] = [
    (Instrument("rayflow.records_in", "counter", "{record}",
                "Records taken in by a step partition", _PARTITION), field_of("records_in")),
    (Instrument("rayflow.records_out", "counter", "{record}",
                "Records put out by a step partition", _PARTITION), field_of("records_out")),
    (Instrument("rayflow.records_in_rate", "gauge", "{record}/s",
                "Records taken in per second", _PARTITION), field_of("records_in_per_s")),
    (Instrument("rayflow.records_out_rate", "gauge", "{record}/s",
                "Records put out per second", _PARTITION), field_of("records_out_per_s")),
    (Instrument("rayflow.mailbox.depth", "gauge", "{batch}",
                "Batches waiting in the mailbox (of a chain's first step)", _PARTITION),
     field_of("mailbox_depth")),
    (Instrument("rayflow.mailbox.size", "gauge", "By",
                "Bytes waiting in the mailbox (of a chain's first step)", _PARTITION),
     field_of("mailbox_bytes")),
    (Instrument("rayflow.busy.utilization", "gauge", "1",
                "Share of time spent working (0..1)", _PARTITION),
     utilization_of("busy_ms_per_s")),
    (Instrument("rayflow.idle.utilization", "gauge", "1",
                "Share of time spent waiting for input (0..1)", _PARTITION),
     utilization_of("idle_ms_per_s")),
    (Instrument("rayflow.backpressured.utilization", "gauge", "1",
                "Share of time spent waiting for downstream credits (0..1)", _PARTITION),
     utilization_of("backpressured_ms_per_s")),
    (Instrument("rayflow.inflight", "gauge", "s",
                "Seconds of work queued for a chain's first step (in-flight data by time)",
                _PARTITION), field_of("inflight_s")),
    (Instrument("rayflow.records_uncommitted", "gauge", "{record}",
                "Records a source emitted or a sink took in since the last committed "
                "checkpoint", _PARTITION), field_of("uncommitted_records")),
    (Instrument("rayflow.records_failed", "counter", "{record}",
                "Records a step's function failed on, skipped or dead-lettered", _PARTITION),
     field_of("records_failed")),
    (Instrument("rayflow.records_late", "counter", "{record}",
                "Records a window got after their window closed", _PARTITION),
     field_of("records_late")),
    (Instrument("rayflow.watermark.lag", "gauge", "s",
                "Wall-clock time minus the event-time watermark of a window or process step",
                _PARTITION), watermark_lag),
]  # fmt: skip


def _last(key: str) -> Read:
    return lambda c: (c.get("last") or {}).get(key)


def _age(stats: dict[str, Any]) -> float | None:
    last = stats.get("last")
    return time.time() - last["time"] if last else None


# Per job, observed from the latest checkpoint statistics.
_CHECKPOINTS: list[tuple[Instrument, Read]] = [
    (Instrument("rayflow.checkpoints.completed", "counter", "{checkpoint}",
                "Checkpoints (and savepoints) completed", _JOB), field_of("completed")),
    (Instrument("rayflow.checkpoints.failed", "counter", "{checkpoint}",
                "Checkpoints (and savepoints) that failed", _JOB), field_of("failed")),
    (Instrument("rayflow.checkpoint.size", "gauge", "By",
                "Bytes the last completed checkpoint wrote", _JOB), _last("written_bytes")),
    (Instrument("rayflow.checkpoint.state.size", "gauge", "By",
                "Bytes of state the last completed checkpoint needs", _JOB),
     _last("state_bytes")),
    (Instrument("rayflow.checkpoint.age", "gauge", "s",
                "Seconds since the last completed checkpoint", _JOB), _age),
    (Instrument("rayflow.checkpoint.interval", "gauge", "s",
                "The checkpoint interval in force", _JOB), field_of("interval_s")),
]  # fmt: skip

RESTARTS = Instrument(
    "rayflow.restarts", "counter", "{restart}", "Times the job restarted from a checkpoint", _JOB
)
ALERTS = Instrument(
    "rayflow.alerts", "gauge", "{alert}",
    "Active alerts, 1 each (rayflow.step and rayflow.partition when the alert has them)",
    ("rayflow.job", "rayflow.alert.kind", "rayflow.step", "rayflow.partition"),
)  # fmt: skip
CHECKPOINT_DURATION = Instrument(
    "rayflow.checkpoint.duration", "histogram", "s",
    "Duration of a checkpoint, from the trigger to the sinks notified (or the failure)",
    ("rayflow.job", "rayflow.checkpoint.kind", "rayflow.checkpoint.outcome"),
)  # fmt: skip
PHASE_DURATION = Instrument(
    "rayflow.checkpoint.phase.duration", "histogram", "s",
    "Duration of one phase of a checkpoint (trigger, acknowledge, manifest, notify)",
    ("rayflow.job", "rayflow.checkpoint.phase"),
)  # fmt: skip
ALIGNMENT_DURATION = Instrument(
    "rayflow.checkpoint.alignment.duration", "histogram", "s",
    "Time a step partition waited for the barrier on all its inputs (one value per "
    "checkpoint seen at a poll)", _PARTITION,
)  # fmt: skip
RECOVERY_DURATION = Instrument(
    "rayflow.recovery.duration", "histogram", "s",
    "Duration of a recovery, from the failure to the first record processed again", _JOB,
)  # fmt: skip

#: Every instrument published (the README's table shows them).
INSTRUMENTS: tuple[Instrument, ...] = (
    *(i for i, _ in _OPERATOR),
    ALIGNMENT_DURATION,
    *(i for i, _ in _CHECKPOINTS),
    CHECKPOINT_DURATION,
    PHASE_DURATION,
    RESTARTS,
    RECOVERY_DURATION,
    ALERTS,
)

# Phases of the spans: (time stamp that ends the phase, span name, histogram label).
_PHASES = {
    "checkpoint": [
        ("triggered", "trigger the sources", "trigger"),
        ("acknowledged", "snapshot and acknowledge", "acknowledge"),
        ("manifest_written", "write the manifest", "manifest"),
        ("sinks_notified", "notify the sinks", "notify"),
    ],
    "recovery": [
        ("backoff", "back off", "backoff"),
        ("reset_living", "reset the living operators", "reset"),
        ("replaced_dead", "replace the dead operators", "replace"),
        ("restored_and_running", "restore the checkpoint and start", "restore"),
        ("first_record", "until the first record", "first_record"),
    ],
}


class Telemetry:
    """Polls the job's coordinator and publishes what it says through OpenTelemetry.

    With ``setup.enabled`` False it still polls (the notebook display and
    the driver's alert log read the polls) but publishes nothing.
    """

    def __init__(self, job: str, poll: Poll, setup: TelemetrySetup, *, interval_s: float):
        self.job = job
        self._poll = poll
        self._interval_s = interval_s
        self._latest: dict[str, Any] = {}
        self._seen = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._owned: list[Any] = []  # providers built here from the environment
        self._tracer: Any = None
        self._histograms: dict[str, Any] = {}
        self._aligned: dict[tuple[str, int], Any] = {}  # last checkpoint id seen per partition
        self._alerted: set[tuple[str, str, str]] = set()
        self.on_poll: Callable[[dict[str, Any]], None] | None = None
        if setup.enabled:
            self._publish_through(setup)
        self._thread = threading.Thread(
            target=self._run, name=f"rayflow-telemetry-{job}", daemon=True
        )
        self._thread.start()

    def _publish_through(self, setup: TelemetrySetup) -> None:
        """Build the providers the setup asks for; create every instrument."""
        meter_provider, tracer_provider = setup.meter_provider, setup.tracer_provider
        if setup.metric_exporters:
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

            readers = [PeriodicExportingMetricReader(e) for e in setup.metric_exporters]
            meter_provider = MeterProvider(metric_readers=readers, resource=setup.resource)
            self._owned.append(meter_provider)
        if setup.span_exporters:
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            tracer_provider = TracerProvider(resource=setup.resource)
            for exporter in setup.span_exporters:
                tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
            self._owned.append(tracer_provider)
        self._tracer = tracer_provider.get_tracer("rayflow")
        meter = meter_provider.get_meter("rayflow")
        for instrument, read in _OPERATOR:
            self._observe(meter, instrument, self._per_partition(read))
        for instrument, read in _CHECKPOINTS:
            self._observe(meter, instrument, self._job_level(read))
        self._observe(meter, RESTARTS, self._restarts)
        self._observe(meter, ALERTS, self._alerts)
        for instrument in INSTRUMENTS:
            if instrument.kind == "histogram":
                self._histograms[instrument.name] = meter.create_histogram(
                    instrument.name,
                    unit=instrument.unit,
                    description=instrument.description,
                    explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS_S),
                )

    # -- metrics -------------------------------------------------------------

    @staticmethod
    def _observe(meter: Any, instrument: Instrument, callback: Any) -> None:
        create = (
            meter.create_observable_counter
            if instrument.kind == "counter"
            else meter.create_observable_gauge
        )
        create(
            instrument.name, [callback], unit=instrument.unit, description=instrument.description
        )

    def _per_partition(self, read: Read) -> Callable[[Any], Iterable[Any]]:
        from opentelemetry.metrics import Observation

        def observe(options: Any) -> Iterable[Any]:
            for step, partitions in (self._latest.get("metrics") or {}).items():
                for entry in partitions:
                    value = read(entry)
                    if value is not None:
                        yield Observation(value, self._attributes(step, entry["partition"]))

        return observe

    def _job_level(self, read: Read) -> Callable[[Any], Iterable[Any]]:
        from opentelemetry.metrics import Observation

        def observe(options: Any) -> Iterable[Any]:
            stats = self._latest.get("checkpoints")
            value = read(stats) if stats is not None else None
            if value is not None:
                yield Observation(value, {"rayflow.job": self.job})

        return observe

    def _restarts(self, options: Any) -> Iterable[Any]:
        from opentelemetry.metrics import Observation

        if self._latest.get("restarts") is not None:
            yield Observation(self._latest["restarts"], {"rayflow.job": self.job})

    def _alerts(self, options: Any) -> Iterable[Any]:
        from opentelemetry.metrics import Observation

        for alert in self._latest.get("alerts") or []:
            attributes: dict[str, Any] = {
                "rayflow.job": self.job,
                "rayflow.alert.kind": alert["kind"],
            }
            if alert["step"] is not None:
                attributes["rayflow.step"] = alert["step"]
            if alert["partition"] is not None:
                attributes["rayflow.partition"] = alert["partition"]
            yield Observation(1, attributes)

    def _attributes(self, step: str, partition: int) -> dict[str, Any]:
        return {"rayflow.job": self.job, "rayflow.step": step, "rayflow.partition": partition}

    def _record(self, instrument: Instrument, seconds: float, attributes: dict[str, Any]) -> None:
        histogram = self._histograms.get(instrument.name)
        if histogram is not None and seconds >= 0:
            histogram.record(seconds, attributes)

    def _record_alignments(self, metrics: dict[str, list[dict[str, Any]]]) -> None:
        """Each partition's alignment, once per checkpoint it snapshotted (seen at a poll)."""
        for step, entries in metrics.items():
            for entry in entries:
                snapshot = entry.get("last_snapshot") or {}
                checkpoint_id = snapshot.get("checkpoint_id")
                key = (step, entry["partition"])
                if checkpoint_id is None or self._aligned.get(key) == checkpoint_id:
                    continue
                self._aligned[key] = checkpoint_id
                self._record(
                    ALIGNMENT_DURATION,
                    (entry.get("alignment_ms") or 0.0) / 1000.0,
                    self._attributes(step, entry["partition"]),
                )

    @property
    def latest(self) -> dict[str, Any]:
        return self._latest

    # -- the poll and the spans ----------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.refresh()

    def refresh(self) -> None:
        try:
            data = self._poll(self._seen)
        except Exception as exc:  # the job may be ending or restarting; keep the last values
            log.debug("telemetry poll of %s failed: %s", self.job, exc)
            return
        self.update(data)

    def update(self, data: dict[str, Any]) -> None:
        with self._lock:
            self._latest = data
            self._finished(data.get("events", []))
            self._record_alignments(data.get("metrics") or {})
            self._log_alerts(data.get("alerts") or [])
        if self.on_poll is not None:
            try:
                self.on_poll(data)
            except Exception as exc:
                log.debug("telemetry display of %s failed: %s", self.job, exc)

    def _log_alerts(self, alerts: list[dict[str, Any]]) -> None:
        """The driver's log says when an alert fires and clears (so do the coordinator's)."""
        current = {(a["kind"], str(a["step"]), str(a["partition"])): a for a in alerts}
        for key in current.keys() - self._alerted:
            log.warning("job %s: alert %s: %s", self.job, key[0], current[key]["message"])
        for key in self._alerted - current.keys():
            log.info("job %s: alert %s cleared (step %s)", self.job, key[0], key[1])
        self._alerted = set(current)

    def restarted(self) -> None:
        """A new coordinator took over: its events are numbered from 1 again."""
        with self._lock:
            self._seen = 0

    def _finished(self, events: list[dict[str, Any]]) -> None:
        """Each checkpoint or recovery that finished since the last poll: histograms, a span."""
        for event in events:
            if event["seq"] <= self._seen:
                continue
            self._seen = event["seq"]
            self._durations(event)
            if self._tracer is not None:
                self._span(event)

    def _durations(self, event: dict[str, Any]) -> None:
        total = event["ended"] - event["started"]
        if event["type"] == "recovery":
            self._record(RECOVERY_DURATION, total, {"rayflow.job": self.job})
            return
        self._record(
            CHECKPOINT_DURATION,
            total,
            {
                "rayflow.job": self.job,
                "rayflow.checkpoint.kind": event["kind"],
                "rayflow.checkpoint.outcome": event["outcome"],
            },
        )
        begin = event["started"]
        for phase, _, label in _PHASES["checkpoint"]:
            end = event["phases"].get(phase)
            if end is None:
                continue
            attributes = {"rayflow.job": self.job, "rayflow.checkpoint.phase": label}
            self._record(PHASE_DURATION, end - begin, attributes)
            begin = end

    def _span(self, event: dict[str, Any]) -> None:
        from opentelemetry import trace as otel_trace
        from opentelemetry.trace import Status, StatusCode

        kind = event["type"]
        if kind == "checkpoint":
            name = f"{event['kind']} {event['id']}"
            attributes = {
                "rayflow.job": self.job,
                "rayflow.checkpoint.id": event["id"],
                "rayflow.checkpoint.kind": event["kind"],
                "rayflow.checkpoint.outcome": event["outcome"],
            }
            if event.get("written_bytes") is not None:
                attributes["rayflow.checkpoint.written_bytes"] = event["written_bytes"]
                attributes["rayflow.checkpoint.state_bytes"] = event["state_bytes"]
        else:
            name = "recovery"
            attributes = {
                "rayflow.job": self.job,
                "rayflow.recovery.cause": str(event["cause"])[:500],
                "rayflow.recovery.records_replayed": int(event["records_replayed"] or 0),
                "rayflow.recovery.replaced": ", ".join(event["replaced"]),
            }
            if event.get("restored_checkpoint") is not None:
                attributes["rayflow.recovery.restored_checkpoint"] = event["restored_checkpoint"]
        span = self._tracer.start_span(
            name, start_time=_ns(event["started"]), attributes=attributes
        )
        context = otel_trace.set_span_in_context(span)
        begin = event["started"]
        for phase, label, _ in _PHASES[kind]:
            end = event["phases"].get(phase)
            if end is None:
                continue
            child = self._tracer.start_span(label, context=context, start_time=_ns(begin))
            child.end(end_time=_ns(end))
            begin = end
        if event.get("outcome") == "failed":
            span.set_status(Status(StatusCode.ERROR, str(event.get("reason"))))
        span.end(end_time=_ns(event["ended"]))

    def close(self, final: dict[str, Any] | None = None) -> None:
        """Stop polling; export what the final report holds; flush providers built here."""
        self._stop.set()
        if final is not None:
            self.update(final)
        for provider in self._owned:
            try:
                provider.force_flush()
                provider.shutdown()
            except Exception as exc:
                log.debug("flushing telemetry of %s failed: %s", self.job, exc)


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)
