"""Publishing a job's metrics and traces through OpenTelemetry, from the driver.

The driver polls the coordinator every ``interval_s`` (one call returns the
operators' metrics, the checkpoint figures and the checkpoints and
recoveries that finished since the last poll). OpenTelemetry's observable
instruments read the latest poll, and every finished checkpoint or recovery
becomes a span with a child span per phase, stamped with the times the
coordinator recorded. So exporting costs the operators nothing beyond
answering the poll, and everything goes through the providers of the
driver, where users configure them.

Providers, in order: the ones passed to ``rf.start``; else the global ones
if an SDK provider was installed; else, if ``OTEL_METRICS_EXPORTER`` /
``OTEL_TRACES_EXPORTER`` is set (``console``, ``otlp``), providers built
from the environment as the OpenTelemetry SDK documents it (the OTLP
exporter needs ``pip install opentelemetry-exporter-otlp``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry import metrics as otel_metrics
from opentelemetry import trace as otel_trace
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
from opentelemetry.trace import Status, StatusCode, TracerProvider

from rayflow.errors import ConfigError

log = logging.getLogger("rayflow")

Poll = Callable[[int], dict[str, Any]]

# (instrument name, kind, unit, description, field in the per-partition metrics)
_OPERATOR_INSTRUMENTS = [
    ("rayflow.records_in", "counter", "{record}", "Records taken in by a step partition",
     "records_in"),
    ("rayflow.records_out", "counter", "{record}", "Records put out by a step partition",
     "records_out"),
    ("rayflow.records_in_rate", "gauge", "{record}/s", "Records taken in per second",
     "records_in_per_s"),
    ("rayflow.records_out_rate", "gauge", "{record}/s", "Records put out per second",
     "records_out_per_s"),
    ("rayflow.mailbox.depth", "gauge", "{batch}", "Batches waiting in the mailbox",
     "mailbox_depth"),
    ("rayflow.mailbox.bytes", "gauge", "By", "Bytes waiting in the mailbox", "mailbox_bytes"),
    ("rayflow.busy_time", "gauge", "ms/s", "Milliseconds per second spent working",
     "busy_ms_per_s"),
    ("rayflow.idle_time", "gauge", "ms/s", "Milliseconds per second spent waiting for input",
     "idle_ms_per_s"),
    ("rayflow.backpressured_time", "gauge", "ms/s",
     "Milliseconds per second spent waiting for downstream credits", "backpressured_ms_per_s"),
]  # fmt: skip

_PHASES = {
    "checkpoint": [
        ("triggered", "trigger the sources"),
        ("acknowledged", "snapshot and acknowledge"),
        ("manifest_written", "write the manifest"),
        ("sinks_notified", "notify the sinks"),
    ],
    "recovery": [
        ("backoff", "back off"),
        ("reset_living", "reset the living operators"),
        ("replaced_dead", "replace the dead operators"),
        ("restored_and_running", "restore the checkpoint and start"),
        ("first_record", "until the first record"),
    ],
}


def _exporter_names(variable: str) -> list[str]:
    value = os.environ.get(variable, "").strip().lower()
    return [n.strip() for n in value.split(",") if n.strip() and n.strip() != "none"]


def meter_provider_from_env() -> MeterProvider | None:
    names = _exporter_names("OTEL_METRICS_EXPORTER")
    if not names:
        return None
    from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
    from opentelemetry.sdk.metrics.export import (
        ConsoleMetricExporter,
        PeriodicExportingMetricReader,
    )
    from opentelemetry.sdk.resources import Resource

    readers = []
    for name in names:
        if name == "console":
            exporter: Any = ConsoleMetricExporter()
        elif name == "otlp":
            exporter = _otlp("metric_exporter", "OTLPMetricExporter")
        else:
            raise ConfigError(
                f"OTEL_METRICS_EXPORTER={name!r} is not supported: use console or otlp"
            )
        readers.append(PeriodicExportingMetricReader(exporter))
    return SdkMeterProvider(metric_readers=readers, resource=Resource.create())


def tracer_provider_from_env() -> TracerProvider | None:
    names = _exporter_names("OTEL_TRACES_EXPORTER")
    if not names:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = SdkTracerProvider(resource=Resource.create())
    for name in names:
        if name == "console":
            exporter: Any = ConsoleSpanExporter()
        elif name == "otlp":
            exporter = _otlp("trace_exporter", "OTLPSpanExporter")
        else:
            raise ConfigError(
                f"OTEL_TRACES_EXPORTER={name!r} is not supported: use console or otlp"
            )
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _otlp(module: str, cls: str) -> Any:
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    package = "grpc" if protocol == "grpc" else "http"
    try:
        mod = __import__(f"opentelemetry.exporter.otlp.proto.{package}.{module}", fromlist=[cls])
    except ImportError:
        raise ConfigError(
            "the OTLP exporter is not installed: pip install opentelemetry-exporter-otlp"
        ) from None
    return getattr(mod, cls)()


def _sdk_global(provider: Any, sdk_type: str) -> bool:
    return type(provider).__module__.startswith("opentelemetry.sdk") and (
        type(provider).__name__ == sdk_type
    )


class Telemetry:
    def __init__(
        self,
        job: str,
        poll: Poll,
        *,
        meter_provider: MeterProvider | None,
        tracer_provider: TracerProvider | None,
        interval_s: float,
    ):
        self.job = job
        self._poll = poll
        self._interval_s = interval_s
        self._latest: dict[str, Any] = {}
        self._seen = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._owned: list[Any] = []  # providers built here from the environment
        self.on_poll: Callable[[dict[str, Any]], None] | None = None

        if meter_provider is None:
            meter_provider = otel_metrics.get_meter_provider()
            if not _sdk_global(meter_provider, "MeterProvider"):
                meter_provider = meter_provider_from_env() or meter_provider
                if meter_provider is not otel_metrics.get_meter_provider():
                    self._owned.append(meter_provider)
        if tracer_provider is None:
            tracer_provider = otel_trace.get_tracer_provider()
            if not _sdk_global(tracer_provider, "TracerProvider"):
                tracer_provider = tracer_provider_from_env() or tracer_provider
                if tracer_provider is not otel_trace.get_tracer_provider():
                    self._owned.append(tracer_provider)
        self._tracer = tracer_provider.get_tracer("rayflow")
        meter = meter_provider.get_meter("rayflow")
        for name, kind, unit, description, key in _OPERATOR_INSTRUMENTS:
            self._instrument(meter, name, kind, unit, description, self._per_partition(key))
        for name, kind, unit, description, read in [
            ("rayflow.checkpoints.completed", "counter", "{checkpoint}",
             "Checkpoints completed", lambda c: c.get("completed")),
            ("rayflow.checkpoints.failed", "counter", "{checkpoint}",
             "Checkpoints that failed", lambda c: c.get("failed")),
            ("rayflow.checkpoint.duration", "gauge", "ms",
             "Duration of the last completed checkpoint", lambda c: _last(c, "duration_ms")),
            ("rayflow.checkpoint.size", "gauge", "By",
             "Bytes the last completed checkpoint wrote", lambda c: _last(c, "written_bytes")),
            ("rayflow.checkpoint.state_size", "gauge", "By",
             "Bytes of state the last completed checkpoint needs",
             lambda c: _last(c, "state_bytes")),
            ("rayflow.checkpoint.age", "gauge", "s", "Seconds since the last completed checkpoint",
             lambda c: time.time() - c["last"]["time"] if c.get("last") else None),
        ]:  # fmt: skip
            self._instrument(meter, name, kind, unit, description, self._job_level(read))
        self._instrument(
            meter, "rayflow.restarts", "counter", "{restart}",
            "Times the job restarted from a checkpoint",
            self._job_level(lambda _: self._latest.get("restarts")),
        )  # fmt: skip
        self._instrument(
            meter, "rayflow.alerts", "gauge", "{alert}",
            "Active alerts (1 per alert; attributes kind, step, partition)", self._alerts,
        )  # fmt: skip
        self._instrument(
            meter, "rayflow.checkpoint.interval", "gauge", "s",
            "The checkpoint interval in force",
            self._job_level(lambda c: c.get("interval_s")),
        )  # fmt: skip
        self._instrument(
            meter, "rayflow.inflight", "gauge", "s",
            "Seconds of a partition's work queued for it (in-flight data by time)",
            self._per_partition("inflight_s"),
        )  # fmt: skip
        self._alerted: set[tuple[str, str, str]] = set()
        self._thread = threading.Thread(
            target=self._run, name=f"rayflow-telemetry-{job}", daemon=True
        )
        self._thread.start()

    # -- metrics -------------------------------------------------------------

    @staticmethod
    def _instrument(meter: Any, name: str, kind: str, unit: str, description: str,
                    callback: Any) -> None:  # fmt: skip
        if kind == "counter":
            meter.create_observable_counter(name, [callback], unit=unit, description=description)
        else:
            meter.create_observable_gauge(name, [callback], unit=unit, description=description)

    def _per_partition(self, key: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            for step, partitions in (self._latest.get("metrics") or {}).items():
                for entry in partitions:
                    attributes = {"job": self.job, "step": step, "partition": entry["partition"]}
                    yield Observation(entry.get(key, 0), attributes)

        return observe

    def _job_level(self, read: Callable[[dict[str, Any]], Any]) -> Any:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            stats = self._latest.get("checkpoints")
            if stats is None:
                return
            value = read(stats)
            if value is not None:
                yield Observation(value, {"job": self.job})

        return observe

    def _alerts(self, options: CallbackOptions) -> Iterable[Observation]:
        for alert in self._latest.get("alerts") or []:
            attributes = {
                "job": self.job,
                "kind": alert["kind"],
                "step": alert["step"] or "",
                "partition": -1 if alert["partition"] is None else alert["partition"],
            }
            yield Observation(1, attributes)

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
            self._emit_spans(data.get("events", []))
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

    def _emit_spans(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            if event["seq"] <= self._seen:
                continue
            self._seen = event["seq"]
            self._span(event)

    def _span(self, event: dict[str, Any]) -> None:
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
        for phase, label in _PHASES[kind]:
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


def _last(stats: dict[str, Any], key: str) -> Any:
    last = stats.get("last")
    return last.get(key) if last else None


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)
