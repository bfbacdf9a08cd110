"""OpenTelemetry set-up before a job starts, and what the driver publishes (no Ray).

``prepare_telemetry`` is what ``rf.start`` calls before it creates any actor;
``Telemetry`` is fed here by hand with what a coordinator poll returns.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import rayflow as rf
from rayflow._internal.telemetry import INSTRUMENTS, Telemetry
from rayflow._internal.telemetry_config import prepare_telemetry

OTEL_VARIABLES = (
    "OTEL_SDK_DISABLED",
    "OTEL_METRICS_EXPORTER",
    "OTEL_TRACES_EXPORTER",
    "OTEL_METRIC_EXPORT_INTERVAL",
    "OTEL_METRIC_EXPORT_TIMEOUT",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_EXPORT_TIMEOUT",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def _without_opentelemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if OpenTelemetry were not installed: every import of it fails."""
    for name in [n for n in sys.modules if n == "opentelemetry" or n.startswith("opentelemetry.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)


def _poll(now: float) -> dict[str, Any]:
    """What one coordinator poll returns, for a job with a source and a sink."""
    return {
        "metrics": {
            "src": [
                {
                    "partition": 0,
                    "records_in": 0,
                    "records_out": 1000,
                    "records_out_per_s": 250.0,
                    "mailbox_depth": 0,
                    "mailbox_bytes": 0,
                    "busy_ms_per_s": 250.0,
                    "idle_ms_per_s": 700.0,
                    "backpressured_ms_per_s": 50.0,
                    "inflight_s": 0.0,
                    "uncommitted_records": 40,
                    "alignment_ms": 0.0,
                    "last_snapshot": {"checkpoint_id": 1},
                }
            ],
            "out": [
                {
                    "partition": 0,
                    "records_in": 960,
                    "records_out": 0,
                    "busy_ms_per_s": 1003.0,  # measured a little over: still a share <= 1
                    "alignment_ms": 30.0,
                    "last_snapshot": {"checkpoint_id": 1},
                }
            ],
        },
        "checkpoints": {
            "completed": 1,
            "failed": 0,
            "interval_s": 1.0,
            "last": {"written_bytes": 2048, "state_bytes": 4096, "time": now},
        },
        "restarts": 0,
        "alerts": [
            {"kind": "checkpoint_failing", "step": None, "partition": None, "since": now,
             "message": "storage down"},
        ],
        "events": [
            {"seq": 1, "type": "checkpoint", "id": 1, "kind": "checkpoint",
             "started": now - 1.5, "ended": now,
             "phases": {"triggered": now - 1.4, "acknowledged": now - 0.4,
                        "manifest_written": now - 0.1, "sinks_notified": now},
             "outcome": "completed", "reason": None, "written_bytes": 2048,
             "state_bytes": 4096},
        ],
    }  # fmt: skip


def _exported(reader: InMemoryMetricReader) -> dict[str, Any]:
    data = reader.get_metrics_data()
    if data is None:
        return {}
    return {
        m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
    }


@pytest.fixture
def published() -> Iterator[tuple[dict[str, Any], InMemorySpanExporter]]:
    """One poll published through in-memory providers passed as rf.start would."""
    reader, spans = InMemoryMetricReader(), InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    setup = prepare_telemetry(MeterProvider(metric_readers=[reader]), tracer_provider)
    telemetry = Telemetry("wc", lambda since: {}, setup, interval_s=3600)
    try:
        telemetry.update(_poll(time.time()))
        yield _exported(reader), spans
    finally:
        telemetry.close()


# -- names, units, attributes -----------------------------------------------------


def test_attributes_are_namespaced_never_a_bare_job(
    published: tuple[dict[str, Any], InMemorySpanExporter],
) -> None:
    metrics, _ = published
    records = {
        (p.attributes["rayflow.step"], p.attributes["rayflow.partition"]): p.value
        for p in metrics["rayflow.records_out"].data.data_points
    }
    assert records == {("src", 0): 1000, ("out", 0): 0}
    for metric in metrics.values():
        for point in metric.data.data_points:
            assert point.attributes["rayflow.job"] == "wc", metric.name
            assert not {"job", "step", "partition"} & set(point.attributes), metric.name


def test_time_shares_are_utilization_with_unit_1(
    published: tuple[dict[str, Any], InMemorySpanExporter],
) -> None:
    metrics, _ = published
    for name in ("rayflow.busy.utilization", "rayflow.idle.utilization"):
        assert metrics[name].unit == "1"
    busy = {
        p.attributes["rayflow.step"]: p.value
        for p in metrics["rayflow.busy.utilization"].data.data_points
    }
    assert busy == {"src": 0.25, "out": 1.0}
    (idle,) = [
        p.value
        for p in metrics["rayflow.idle.utilization"].data.data_points
        if p.attributes["rayflow.step"] == "src"
    ]
    assert idle == pytest.approx(0.7)


def test_durations_are_histograms_in_seconds(
    published: tuple[dict[str, Any], InMemorySpanExporter],
) -> None:
    metrics, spans = published
    duration = metrics["rayflow.checkpoint.duration"]
    assert duration.unit == "s"
    (point,) = duration.data.data_points
    assert point.count == 1 and point.sum == pytest.approx(1.5, abs=0.01)
    assert dict(point.attributes) == {
        "rayflow.job": "wc",
        "rayflow.checkpoint.kind": "checkpoint",
        "rayflow.checkpoint.outcome": "completed",
    }
    # Bucket bounds are seconds: 1.5 s falls between 1 and 2.5, not in the first ms bucket.
    bounds = list(point.explicit_bounds)
    assert bounds[0] < 0.1 and 1.0 in bounds and 2.5 in bounds
    assert point.bucket_counts[bounds.index(2.5)] == 1
    phases = {
        p.attributes["rayflow.checkpoint.phase"]: p.sum
        for p in metrics["rayflow.checkpoint.phase.duration"].data.data_points
    }
    assert phases == pytest.approx(
        {"trigger": 0.1, "acknowledge": 1.0, "manifest": 0.3, "notify": 0.1}, abs=0.01
    )
    alignment = {
        p.attributes["rayflow.step"]: p.sum
        for p in metrics["rayflow.checkpoint.alignment.duration"].data.data_points
    }
    assert alignment == pytest.approx({"src": 0.0, "out": 0.03})
    # The span of the same checkpoint is still there, with its phases.
    names = [s.name for s in spans.get_finished_spans()]
    assert "checkpoint 1" in names and "write the manifest" in names


def test_counts_sizes_and_alerts(
    published: tuple[dict[str, Any], InMemorySpanExporter],
) -> None:
    metrics, _ = published
    assert metrics["rayflow.records_out"].unit == "{record}"
    assert metrics["rayflow.checkpoints.completed"].unit == "{checkpoint}"
    assert metrics["rayflow.checkpoint.size"].unit == "By"
    uncommitted = {
        p.attributes["rayflow.step"]: p.value
        for p in metrics["rayflow.records_uncommitted"].data.data_points
    }
    assert uncommitted == {"src": 40}  # only sources and sinks report it
    (alert,) = metrics["rayflow.alerts"].data.data_points
    assert dict(alert.attributes) == {
        "rayflow.job": "wc",
        "rayflow.alert.kind": "checkpoint_failing",
    }


def test_every_instrument_has_a_unit_and_namespaced_attributes() -> None:
    for instrument in INSTRUMENTS:
        assert instrument.name.startswith("rayflow.")
        assert instrument.unit, instrument.name
        assert all(a.startswith("rayflow.") for a in instrument.attributes), instrument.name
        if instrument.unit == "s" and instrument.kind != "gauge":
            assert instrument.kind == "histogram", instrument.name
        assert "ms" not in instrument.unit, instrument.name


# -- OTEL_SDK_DISABLED ------------------------------------------------------------


@pytest.mark.parametrize("value", ["true", "TRUE", " True "])
def test_sdk_disabled_builds_and_publishes_nothing(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])  # made before the variable is set
    monkeypatch.setenv("OTEL_SDK_DISABLED", value)
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "console")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    # Disabled wins: even a value that would be refused is not looked at.
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "soon")
    setup = prepare_telemetry(meter_provider=provider)
    assert not setup.enabled
    assert setup.metric_exporters == () and setup.span_exporters == ()
    telemetry = Telemetry("wc", lambda since: {}, setup, interval_s=3600)
    telemetry.update(_poll(time.time()))
    telemetry.close()
    assert _exported(reader) == {}
    assert telemetry._owned == []  # no provider was built


@pytest.mark.parametrize("value", ["false", "", "0"])
def test_sdk_not_disabled_by_other_values(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", value)
    assert prepare_telemetry().enabled


# -- exporters built from the environment ---------------------------------------------


def test_console_exporters_and_resource_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "console")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console,none")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "clicks")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "500")
    setup = prepare_telemetry()
    assert [type(e) for e in setup.metric_exporters] == [ConsoleMetricExporter]
    assert [type(e) for e in setup.span_exporters] == [ConsoleSpanExporter]
    assert setup.resource.attributes["service.name"] == "clicks"


def test_a_provider_passed_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "console")
    provider = MeterProvider()
    setup = prepare_telemetry(meter_provider=provider)
    assert setup.meter_provider is provider and setup.metric_exporters == ()


@pytest.mark.parametrize(
    ("variable", "value", "fix"),
    [
        ("OTEL_METRICS_EXPORTER", "jaeger", "use console, otlp, none"),
        ("OTEL_TRACES_EXPORTER", "console,zipkin", "use console, otlp, none"),
        ("OTEL_METRICS_EXPORTER", "prometheus", "Ray's metrics export port"),
    ],
)
def test_unknown_exporter_is_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, fix: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(rf.ConfigError) as err:
        prepare_telemetry()
    assert variable in str(err.value) and repr(value) in str(err.value)
    assert fix in str(err.value)


@pytest.mark.parametrize(
    ("exporter", "variable", "value", "fix"),
    [
        ("OTEL_METRICS_EXPORTER", "OTEL_METRIC_EXPORT_INTERVAL", "5s", "milliseconds"),
        ("OTEL_METRICS_EXPORTER", "OTEL_METRIC_EXPORT_INTERVAL", "0", "milliseconds"),
        ("OTEL_METRICS_EXPORTER", "OTEL_METRIC_EXPORT_TIMEOUT", "nan", "milliseconds"),
        ("OTEL_TRACES_EXPORTER", "OTEL_BSP_SCHEDULE_DELAY", "1.5", "milliseconds"),
        ("OTEL_TRACES_EXPORTER", "OTEL_BSP_MAX_QUEUE_SIZE", "-1", "spans"),
    ],
)
def test_unparsable_numbers_are_refused(
    monkeypatch: pytest.MonkeyPatch, exporter: str, variable: str, value: str, fix: str
) -> None:
    monkeypatch.setenv(exporter, "console")
    monkeypatch.setenv(variable, value)
    with pytest.raises(rf.ConfigError) as err:
        prepare_telemetry()
    message = str(err.value)
    assert f"{variable}={value!r}" in message and fix in message and "unset it" in message


def test_otlp_without_its_exporter_package_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.grpc.trace_exporter", None)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")
    with pytest.raises(rf.ConfigError) as err:
        prepare_telemetry()
    assert "OTEL_TRACES_EXPORTER=otlp" in str(err.value)
    assert "pip install opentelemetry-exporter-otlp-proto-grpc" in str(err.value)


@pytest.mark.parametrize(
    ("variable", "value", "fix"),
    [
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json", "use http/protobuf or grpc"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "localhost:4318", "http(s)://host:port"),
        ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "collector", "http(s)://host:port"),
    ],
)
def test_bad_otlp_settings_are_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, fix: str
) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    monkeypatch.setenv(variable, value)
    with pytest.raises(rf.ConfigError) as err:
        prepare_telemetry()
    assert f"{variable}={value!r}" in str(err.value) and fix in str(err.value)


# -- OpenTelemetry not installed ------------------------------------------------------


def test_without_opentelemetry_telemetry_is_simply_off(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_opentelemetry(monkeypatch)
    setup = prepare_telemetry()
    assert not setup.enabled and "not installed" in setup.why
    # The driver still polls (the notebook display and the alert log use it).
    polls: list[dict[str, Any]] = []
    telemetry = Telemetry("wc", lambda since: {}, setup, interval_s=3600)
    telemetry.on_poll = polls.append
    telemetry.update(_poll(time.time()))
    telemetry.close()
    assert len(polls) == 1


@pytest.mark.parametrize("asked", ["OTEL_METRICS_EXPORTER", "OTEL_TRACES_EXPORTER", "provider"])
def test_without_opentelemetry_asking_for_it_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, asked: str
) -> None:
    provider = MeterProvider() if asked == "provider" else None
    if asked != "provider":
        monkeypatch.setenv(asked, "console")
    _without_opentelemetry(monkeypatch)
    with pytest.raises(rf.ConfigError) as err:
        prepare_telemetry(meter_provider=provider)
    assert "pip install 'rayflow[otel]'" in str(err.value)
    assert (asked if asked != "provider" else "meter_provider=") in str(err.value)


def test_telemetry_modules_import_without_opentelemetry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import rayflow._internal as internal

    _without_opentelemetry(monkeypatch)
    for name in ("telemetry", "telemetry_config"):
        monkeypatch.delitem(sys.modules, f"rayflow._internal.{name}")
        monkeypatch.setattr(internal, name, getattr(internal, name))  # put back afterwards
    import rayflow._internal.telemetry as reimported

    assert reimported.Telemetry is not Telemetry  # really imported again, without it


# -- rf.start checks before it starts anything ----------------------------------------


def test_start_refuses_a_bad_otel_value_before_connecting_to_ray(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ray

    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "jaegr")
    flow = rf.Dataflow("otel-typo")
    flow.source("s", rf.testing.from_items([1, 2, 3])).sink("out", rf.testing.Collect())
    connected_before = ray.is_initialized()
    with pytest.raises(rf.ConfigError, match="OTEL_METRICS_EXPORTER='jaegr'"):
        rf.start(flow)
    # Nothing was started: not even Ray (no actor, no job left running without a handle).
    assert ray.is_initialized() is connected_before


def test_the_readme_tables_list_every_metric_with_its_type_and_unit() -> None:
    from pathlib import Path

    from rayflow._internal.job.ray_metrics import METRICS

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `rayflow")]
    for instrument in INSTRUMENTS:
        (row,) = [r for r in rows if f"`{instrument.name}`" in r and "." in instrument.name]
        kind, unit = (cell.strip() for cell in row.split("|")[2:4])
        assert kind == instrument.kind and unit == f"`{instrument.unit}`", row
    for metric in METRICS:
        (row,) = [r for r in rows if f"`{metric.name}`" in r]
        assert metric.kind in row.split("|")[2], row
