"""Deciding, before a job starts, what its OpenTelemetry goes through.

``rf.start`` calls :func:`prepare_telemetry` before it creates any actor, so
that a mistake in the ``OTEL_*`` environment is a :class:`ConfigError` while
the caller can still fix it, not an exception after the job is running with
no handle to stop it. Everything that can fail is done here: the variables
are parsed, the exporter classes imported and the exporters and the resource
created. What starts threads (metric readers, span processors, providers) is
built later by :class:`~rayflow._internal.telemetry.Telemetry`, so a start
that fails afterwards leaves nothing running.

The rules, in order, per signal (metrics, traces):

1. ``OTEL_SDK_DISABLED=true``: telemetry is off; no provider is built or
   used, not even one passed in (as the SDK's own providers behave).
2. A provider passed to ``rf.start``.
3. The global provider, if an SDK provider was installed.
4. ``OTEL_METRICS_EXPORTER`` / ``OTEL_TRACES_EXPORTER`` (``console``,
   ``otlp``, ``none``; comma-separated): an SDK provider built from the
   environment, as the OpenTelemetry SDK documents it (``OTEL_SERVICE_NAME``,
   ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_EXPORTER_OTLP_*``,
   ``OTEL_METRIC_EXPORT_INTERVAL``, ``OTEL_BSP_*``).
5. Otherwise the global (proxy) provider, so that a provider the program
   installs later still receives the job's telemetry.

OpenTelemetry is optional (``pip install 'rayflow[otel]'``) and imported only
here and in ``telemetry.py``, only when it is used. Without it, telemetry is
simply off, unless the user asked for it (providers passed, or an
``OTEL_*_EXPORTER`` set), which is a :class:`ConfigError` saying what to install.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from rayflow.errors import ConfigError

log = logging.getLogger("rayflow")

INSTALL_OTEL = "pip install 'rayflow[otel]'"

#: The exporters rayflow builds from ``OTEL_*_EXPORTER`` ("none" means none).
EXPORTERS = ("console", "otlp", "none")
#: OTLP protocols the Python exporters implement (the spec's default first).
PROTOCOLS = ("http/protobuf", "grpc")

# Per signal: the exporter variable, the signal's name in OTLP variables, and
# the numeric variables its SDK pipeline reads: (name, integer?, minimum, what).
_Number = tuple[str, bool, float, str]
_SIGNALS: dict[str, tuple[str, str, tuple[_Number, ...]]] = {
    "metrics": (
        "OTEL_METRICS_EXPORTER",
        "METRICS",
        (
            ("OTEL_METRIC_EXPORT_INTERVAL", False, 1.0, "milliseconds, e.g. 60000"),
            ("OTEL_METRIC_EXPORT_TIMEOUT", False, 0.0, "milliseconds, e.g. 30000"),
        ),
    ),
    "traces": (
        "OTEL_TRACES_EXPORTER",
        "TRACES",
        (
            ("OTEL_BSP_SCHEDULE_DELAY", True, 0.0, "milliseconds, e.g. 5000"),
            ("OTEL_BSP_EXPORT_TIMEOUT", True, 0.0, "milliseconds, e.g. 30000"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", True, 1.0, "spans, e.g. 2048"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", True, 1.0, "spans, e.g. 512"),
        ),
    ),
}

# (console class, OTLP module, OTLP class) per signal.
_CLASSES = {
    "metrics": (
        ("opentelemetry.sdk.metrics.export", "ConsoleMetricExporter"),
        "metric_exporter",
        "OTLPMetricExporter",
    ),
    "traces": (
        ("opentelemetry.sdk.trace.export", "ConsoleSpanExporter"),
        "trace_exporter",
        "OTLPSpanExporter",
    ),
}


@dataclass(frozen=True)
class TelemetrySetup:
    """What the job's OpenTelemetry goes through, decided and checked before it starts.

    ``enabled`` False: nothing is published through OpenTelemetry (``why``
    says why). Otherwise, per signal, either a provider to use as it is or
    the exporters to build an SDK provider from (the provider then belongs
    to the job, which flushes and shuts it down at the end).
    """

    enabled: bool
    why: str = ""
    meter_provider: Any = None
    tracer_provider: Any = None
    metric_exporters: tuple[Any, ...] = ()
    span_exporters: tuple[Any, ...] = ()
    resource: Any = None


def sdk_disabled() -> bool:
    """``OTEL_SDK_DISABLED``: only ``true`` (any case) disables, as the spec says."""
    value = os.environ.get("OTEL_SDK_DISABLED", "").strip().lower()
    if value not in ("", "true", "false"):
        log.warning("OTEL_SDK_DISABLED=%r is neither true nor false; taken as false", value)
    return value == "true"


def prepare_telemetry(meter_provider: Any = None, tracer_provider: Any = None) -> TelemetrySetup:
    """Decide and check what the job's telemetry goes through (see the module docstring).

    Raises :class:`ConfigError` for an ``OTEL_*`` value that cannot work (naming
    the variable, its value and the fix), or when OpenTelemetry is asked for
    but not installed. Reads ``os.environ``, as the SDK and its exporters do.
    """
    env = os.environ
    # Step 1. The SDK switched off: nothing else is read.
    if sdk_disabled():
        if meter_provider is not None or tracer_provider is not None:
            log.info("OTEL_SDK_DISABLED=true: the providers passed to rf.start are not used")
        return TelemetrySetup(enabled=False, why="OTEL_SDK_DISABLED=true")
    # Step 2. What was asked for, and whether OpenTelemetry is there to do it.
    metric_names = exporter_names("metrics", env) if meter_provider is None else []
    span_names = exporter_names("traces", env) if tracer_provider is None else []
    asked = [
        *(["meter_provider=..."] if meter_provider is not None else []),
        *(["tracer_provider=..."] if tracer_provider is not None else []),
        *([f"OTEL_METRICS_EXPORTER={','.join(metric_names)}"] if metric_names else []),
        *([f"OTEL_TRACES_EXPORTER={','.join(span_names)}"] if span_names else []),
    ]
    api = _optional("opentelemetry.metrics"), _optional("opentelemetry.trace")
    if api[0] is None or api[1] is None:
        if asked:
            raise ConfigError(
                f"{' and '.join(asked)} needs OpenTelemetry, which is not installed: {INSTALL_OTEL}"
            )
        return TelemetrySetup(enabled=False, why="OpenTelemetry is not installed")
    otel_metrics, otel_trace = api
    # Step 3. Per signal: the provider passed, the global SDK one, or exporters.
    if meter_provider is None and _is_sdk(otel_metrics.get_meter_provider(), "MeterProvider"):
        meter_provider, metric_names = otel_metrics.get_meter_provider(), []
    if tracer_provider is None and _is_sdk(otel_trace.get_tracer_provider(), "TracerProvider"):
        tracer_provider, span_names = otel_trace.get_tracer_provider(), []
    metric_exporters = _exporters("metrics", metric_names, env)
    span_exporters = _exporters("traces", span_names, env)
    resource = _resource() if metric_exporters or span_exporters else None
    # Step 4. Nothing chosen: the global provider, which may be installed later.
    if meter_provider is None and not metric_exporters:
        meter_provider = otel_metrics.get_meter_provider()
    if tracer_provider is None and not span_exporters:
        tracer_provider = otel_trace.get_tracer_provider()
    return TelemetrySetup(
        enabled=True,
        meter_provider=meter_provider,
        tracer_provider=tracer_provider,
        metric_exporters=tuple(metric_exporters),
        span_exporters=tuple(span_exporters),
        resource=resource,
    )


def exporter_names(signal: str, environ: Mapping[str, str]) -> list[str]:
    """The exporters ``OTEL_<SIGNAL>_EXPORTER`` names ('none' dropped); unknown ones refused."""
    variable = _SIGNALS[signal][0]
    raw = environ.get(variable, "")
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    for name in names:
        if name not in EXPORTERS:
            hint = (
                " (for Prometheus, scrape Ray's metrics export port, where rayflow "
                "publishes its rayflow_* series)"
                if name == "prometheus"
                else ""
            )
            raise ConfigError(
                f"{variable}={raw!r}: exporter {name!r} is not supported; "
                f"use {', '.join(EXPORTERS)} (comma-separated) or unset it{hint}"
            )
    return [n for n in names if n != "none"]


def _exporters(signal: str, names: list[str], environ: Mapping[str, str]) -> list[Any]:
    """Check the signal's variables and create its exporters (no threads start here)."""
    if not names:
        return []
    variable, otlp_signal, numbers = _SIGNALS[signal]
    if _optional("opentelemetry.sdk") is None:
        raise ConfigError(
            f"{variable}={environ.get(variable)!r} needs the OpenTelemetry SDK, which is "
            f"not installed: {INSTALL_OTEL}"
        )
    for number in numbers:
        _check_number(environ, number)
    exporters = []
    for name in names:
        if name == "console":
            module, cls = _CLASSES[signal][0]
            factory = getattr(importlib.import_module(module), cls)
        else:
            factory = _otlp_class(signal, otlp_signal, environ)
        try:
            exporters.append(factory())
        except Exception as exc:
            raise ConfigError(
                f"{variable}={environ.get(variable)!r}: the {name} exporter could not be "
                f"created: {type(exc).__name__}: {exc}; check the OTEL_EXPORTER_OTLP_* "
                "variables"
            ) from exc
    return exporters


def _otlp_class(signal: str, otlp_signal: str, environ: Mapping[str, str]) -> Any:
    """The OTLP exporter class for the protocol the environment chose; its endpoint checked."""
    specific = f"OTEL_EXPORTER_OTLP_{otlp_signal}_PROTOCOL"
    variable = specific if environ.get(specific) else "OTEL_EXPORTER_OTLP_PROTOCOL"
    protocol = environ.get(variable, "").strip().lower() or PROTOCOLS[0]
    if protocol not in PROTOCOLS:
        raise ConfigError(
            f"{variable}={environ.get(variable)!r} is not an OTLP protocol the Python "
            f"exporters implement; use {' or '.join(PROTOCOLS)}"
        )
    for name in (f"OTEL_EXPORTER_OTLP_{otlp_signal}_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        value = environ.get(name, "").strip()
        if value:
            url = urlparse(value)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ConfigError(
                    f"{name}={value!r} is not a URL: give the collector as "
                    "http(s)://host:port (e.g. http://localhost:4318 for http/protobuf, "
                    "http://localhost:4317 for grpc)"
                )
    package = "grpc" if protocol == "grpc" else "http"
    module_name = f"opentelemetry.exporter.otlp.proto.{package}.{_CLASSES[signal][1]}"
    module = _optional(module_name)
    if module is None:
        raise ConfigError(
            f"{_SIGNALS[signal][0]}=otlp with protocol {protocol} needs the OTLP exporter, "
            f"which is not installed: pip install opentelemetry-exporter-otlp-proto-{package}"
        )
    return getattr(module, _CLASSES[signal][2])


def _check_number(environ: Mapping[str, str], number: _Number) -> None:
    """A numeric OTEL_* variable must parse (the SDK would quietly use its default)."""
    name, integer, minimum, what = number
    raw = environ.get(name)
    if raw is None or not raw.strip():
        return
    try:
        value: float | None = int(raw) if integer else float(raw)
    except ValueError:
        value = None
    if value is None or value != value or value < minimum:  # value != value: NaN
        kind = "a whole number" if integer else "a number"
        raise ConfigError(
            f"{name}={raw!r} is not {kind} >= {minimum:g}: give it in {what}, "
            "or unset it for the default"
        )


def _resource() -> Any:
    """The SDK resource from OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES."""
    from opentelemetry.sdk.resources import Resource

    try:
        return Resource.create()
    except Exception as exc:
        raise ConfigError(
            f"OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES could not be read: {exc}; "
            "give OTEL_RESOURCE_ATTRIBUTES as key=value,key=value"
        ) from exc


def _is_sdk(provider: Any, sdk_type: str) -> bool:
    """Whether ``provider`` is the SDK's provider (not the API's proxy or no-op one)."""
    return type(provider).__module__.startswith("opentelemetry.sdk") and (
        type(provider).__name__ == sdk_type
    )


def _optional(module: str) -> Any:
    """Import a module of an optional package; None if it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None
