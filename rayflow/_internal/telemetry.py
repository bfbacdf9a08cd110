"""Publishing a job's metrics through OpenTelemetry.

The driver polls the coordinator for metrics every ``interval_s`` and
OpenTelemetry's observable instruments read the latest poll, so exporting
costs the operators nothing beyond answering that poll.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry import metrics as otel_metrics
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

log = logging.getLogger("rayflow")

Snapshot = dict[str, list[dict[str, Any]]]

# (instrument name, kind, unit, description, field in the metrics dict)
_INSTRUMENTS = [
    (
        "rayflow.records_in",
        "counter",
        "{record}",
        "Records taken in by a step partition",
        "records_in",
    ),
    (
        "rayflow.records_out",
        "counter",
        "{record}",
        "Records put out by a step partition",
        "records_out",
    ),
    (
        "rayflow.records_in_rate",
        "gauge",
        "{record}/s",
        "Records taken in per second",
        "records_in_per_s",
    ),
    (
        "rayflow.records_out_rate",
        "gauge",
        "{record}/s",
        "Records put out per second",
        "records_out_per_s",
    ),
    (
        "rayflow.mailbox.depth",
        "gauge",
        "{batch}",
        "Batches waiting in the mailbox",
        "mailbox_depth",
    ),
    ("rayflow.mailbox.bytes", "gauge", "By", "Bytes waiting in the mailbox", "mailbox_bytes"),
    (
        "rayflow.busy_time",
        "gauge",
        "ms/s",
        "Milliseconds per second spent working",
        "busy_ms_per_s",
    ),
    (
        "rayflow.idle_time",
        "gauge",
        "ms/s",
        "Milliseconds per second spent waiting for input",
        "idle_ms_per_s",
    ),
    (
        "rayflow.backpressured_time",
        "gauge",
        "ms/s",
        "Milliseconds per second spent waiting for downstream credits",
        "backpressured_ms_per_s",
    ),
]


class MetricsPublisher:
    def __init__(
        self,
        job: str,
        fetch: Callable[[], Snapshot],
        *,
        meter_provider: MeterProvider | None,
        interval_s: float,
    ):
        self.job = job
        self._fetch = fetch
        self._interval_s = interval_s
        self._latest: Snapshot = {}
        self._stop = threading.Event()
        provider = meter_provider or otel_metrics.get_meter_provider()
        meter = provider.get_meter("rayflow")
        for name, kind, unit, description, key in _INSTRUMENTS:
            callback = self._callback(key)
            if kind == "counter":
                meter.create_observable_counter(
                    name, [callback], unit=unit, description=description
                )
            else:
                meter.create_observable_gauge(name, [callback], unit=unit, description=description)
        self._thread = threading.Thread(
            target=self._poll, name=f"rayflow-metrics-{job}", daemon=True
        )
        self._thread.start()

    @property
    def latest(self) -> Snapshot:
        return self._latest

    def _callback(self, key: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            for step, partitions in self._latest.items():
                for entry in partitions:
                    attributes = {"job": self.job, "step": step, "partition": entry["partition"]}
                    yield Observation(entry.get(key, 0), attributes)

        return observe

    def _poll(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._latest = self._fetch()
            except Exception as exc:  # the job may be ending; keep the last values
                log.debug("metrics poll of %s failed: %s", self.job, exc)

    def close(self, final: Snapshot | None = None) -> None:
        self._stop.set()
        if final:
            self._latest = final
