"""OpenTelemetry: metrics and spans through providers passed in, or built from OTEL_* variables."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import ray
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import rayflow as rf


def _wait_for(predicate: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.1)


def _flow(name: str) -> rf.Dataflow:
    flow = rf.Dataflow(name, parallelism=2)
    src = flow.source(
        "gen", rf.sources.Generator(lambda p, i: (i % 100, 1), partitions=2, rate=4000)
    )
    src.key_by("k", lambda r: r[0]).reduce("count", lambda a, r: a + 1, initial=0).sink(
        "out", rf.testing.Discard()
    )
    return flow


def test_checkpoint_and_recovery_spans_and_job_metrics(tmp_path: Path) -> None:
    reader = InMemoryMetricReader()
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    handle = rf.start(
        _flow("telemetry"),
        checkpoint=rf.Checkpointing(storage=str(tmp_path), interval_s=0.3),
        meter_provider=MeterProvider(metric_readers=[reader]),
        tracer_provider=tracer_provider,
        runtime=rf.RuntimeConfig(metrics_interval_s=0.2),
    )
    try:
        _wait_for(lambda: (handle.checkpoint_stats() or {}).get("completed", 0) >= 2)
        ray.kill(ray.get_actor("rayflow/telemetry/count/1", namespace="rayflow"))
        _wait_for(lambda: any(r["recovered_in_s"] for r in handle.recoveries()))
        _wait_for(lambda: (handle.checkpoint_stats() or {}).get("completed", 0) >= 4)
        time.sleep(0.5)
        points = {
            m.name: m.data.data_points
            for rm in reader.get_metrics_data().resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
        }
    finally:
        handle.stop()

    finished = spans.get_finished_spans()
    checkpoints = [s for s in finished if s.name.startswith("checkpoint ")]
    assert len(checkpoints) >= 4
    first = checkpoints[0]
    children = sorted(
        (s for s in finished if s.parent and s.parent.span_id == first.context.span_id),
        key=lambda s: s.start_time,
    )
    assert [c.name for c in children] == [
        "trigger the sources",
        "snapshot and acknowledge",
        "write the manifest",
        "notify the sinks",
    ]
    assert first.attributes["rayflow.checkpoint.outcome"] == "completed"
    assert first.start_time <= children[0].start_time and children[-1].end_time <= first.end_time
    (recovery,) = [s for s in finished if s.name == "recovery"]
    phases = [s.name for s in finished if s.parent and s.parent.span_id == recovery.context.span_id]
    assert "replace the dead operators" in phases and "until the first record" in phases
    assert "rayflow/telemetry/count/1" in recovery.attributes["rayflow.recovery.replaced"]

    for name in (
        "rayflow.checkpoint.size",
        "rayflow.checkpoint.age",
        "rayflow.checkpoints.completed",
        "rayflow.restarts",
        "rayflow.records_out",
        "rayflow.busy.utilization",
        "rayflow.backpressured.utilization",
    ):
        assert name in points, name
    assert next(iter(points["rayflow.restarts"])).value == 1
    assert next(iter(points["rayflow.checkpoint.size"])).value > 0
    # Every point names its job as rayflow.job (a bare "job" is Prometheus' label).
    for name, data in points.items():
        for point in data:
            assert point.attributes["rayflow.job"] == "telemetry", name
            assert "job" not in point.attributes, name
    records = {
        (p.attributes["rayflow.step"], p.attributes["rayflow.partition"]): p.value
        for p in points["rayflow.records_out"]
    }
    assert records[("gen", 0)] > 0 and records[("gen", 1)] > 0
    for point in points["rayflow.busy.utilization"]:
        assert 0.0 <= point.value <= 1.0
    # Durations are histograms in seconds: one per checkpoint, one per recovery.
    durations = [
        p for p in points["rayflow.checkpoint.duration"]
        if p.attributes["rayflow.checkpoint.outcome"] == "completed"
    ]  # fmt: skip
    assert sum(p.count for p in durations) >= 4
    assert 0.0 < max(p.max for p in durations) < 30.0  # seconds, not milliseconds
    (recovered,) = points["rayflow.recovery.duration"]
    assert recovered.count == 1 and 0.0 < recovered.sum < 60.0
    phases = {
        p.attributes["rayflow.checkpoint.phase"]
        for p in points["rayflow.checkpoint.phase.duration"]
    }
    assert phases == {"trigger", "acknowledge", "manifest", "notify"}


def test_console_exporters_from_otel_environment_variables(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import rayflow as rf
        from test_telemetry import _flow
        handle = rf.start(_flow("telemetry-env"),
                          checkpoint=rf.Checkpointing(storage={str(tmp_path)!r},
                                                      interval_s=0.3))
        import time; time.sleep(1.5)
        handle.stop()
    """)
    env = {
        **os.environ,
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_METRICS_EXPORTER": "console",
        "OTEL_SERVICE_NAME": "rayflow-test",
    }
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert '"name": "checkpoint 1"' in out.stdout
    assert '"name": "write the manifest"' in out.stdout
    assert '"rayflow.records_out"' in out.stdout
    assert '"service.name": "rayflow-test"' in out.stdout


def test_a_bad_otel_value_fails_the_start_before_any_actor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317")
    with pytest.raises(rf.ConfigError) as err:
        rf.start(
            _flow("telemetry-bad"),
            checkpoint=rf.Checkpointing(storage=str(tmp_path), interval_s=0.3),
        )
    assert "OTEL_EXPORTER_OTLP_ENDPOINT='collector:4317'" in str(err.value)
    named = ray.util.list_named_actors(all_namespaces=True)
    assert not [a for a in named if a["name"].startswith("rayflow/telemetry-bad/")]
    # Nothing half-started either: the same job starts once the variable is fixed.
    monkeypatch.delenv("OTEL_TRACES_EXPORTER")
    result = rf.start(
        _flow("telemetry-bad"), checkpoint=rf.Checkpointing(storage=str(tmp_path))
    ).stop()
    assert result.status is rf.JobStatus.STOPPED


def test_otel_sdk_disabled_exports_nothing(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import rayflow as rf
        from test_telemetry import _flow
        handle = rf.start(_flow("telemetry-off"),
                          checkpoint=rf.Checkpointing(storage={str(tmp_path)!r},
                                                      interval_s=0.3))
        import time; time.sleep(1.5)
        print("checkpoints", handle.stop().checkpoints["completed"])
    """)
    env = {
        **os.environ,
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "OTEL_SDK_DISABLED": "true",
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_METRICS_EXPORTER": "console",
    }
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split("checkpoints")[-1]) >= 1  # the job ran and checkpointed
    assert "rayflow." not in out.stdout and '"name"' not in out.stdout
