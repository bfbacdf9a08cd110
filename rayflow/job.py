"""Running dataflows: ``run``, ``start``, :class:`JobHandle` and :class:`JobResult`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, NoReturn

import ray

from rayflow._internal import naming
from rayflow._internal.job import launcher
from rayflow._internal.job.report import JobReport, JobStatus
from rayflow._internal.plan import Plan, build_plan
from rayflow._internal.spec import StepKind
from rayflow._internal.telemetry import MetricsPublisher
from rayflow.config import RuntimeConfig
from rayflow.dataflow import Dataflow
from rayflow.errors import ConfigError, Failure, JobFailedError

__all__ = ["JobHandle", "JobResult", "JobStatus", "run", "start"]


@dataclass
class JobResult:
    """How a job ended: its status, duration, final metrics and collected output."""

    job: str
    status: JobStatus
    duration_s: float
    started_at: float = 0.0  # wall-clock times (time.time())
    running_at: float | None = None  # every operator deployed and running
    ended_at: float = 0.0
    metrics: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    outputs: dict[str, list[Any]] = field(default_factory=dict, repr=False)

    def output(self, step: str) -> list[Any]:
        """The committed records of the ``rf.testing.Collect`` sink named ``step``."""
        try:
            return self.outputs[step]
        except KeyError:
            raise KeyError(
                f"no Collect sink named {step!r} in job {self.job!r}; "
                f"Collect sinks: {sorted(self.outputs) or 'none'}"
            ) from None

    def records_in(self, step: str) -> int:
        """Records that step ``step`` took in, over all partitions."""
        return sum(e["records_in"] for e in self._step(step))

    def records_out(self, step: str) -> int:
        """Records that step ``step`` put out, over all partitions."""
        return sum(e["records_out"] for e in self._step(step))

    def _step(self, step: str) -> list[dict[str, Any]]:
        try:
            return self.metrics[step]
        except KeyError:
            raise KeyError(f"no step named {step!r}; steps: {sorted(self.metrics)}") from None


class JobHandle:
    """A running job. Returned by :func:`start`; lives in the driver process."""

    def __init__(
        self,
        job: str,
        plan: Plan,
        coordinator: Any,
        collector: Any,
        publisher: MetricsPublisher | None,
    ):
        self.job = job
        self.plan = plan
        self._coordinator = coordinator
        self._collector = collector
        self._publisher = publisher
        self._result: JobResult | None = None
        self._error: JobFailedError | None = None
        self._started = time.monotonic()

    def __repr__(self) -> str:
        return f"JobHandle({self.job!r}, status={self.status().value})"

    def __reduce__(self) -> NoReturn:
        raise TypeError(
            "a JobHandle belongs to the driver process and cannot be pickled; "
            "find a running job's actors by name instead "
            f"({naming.coordinator_actor(self.job)!r} in namespace {naming.NAMESPACE!r})"
        )

    def status(self) -> JobStatus:
        if self._result is not None:
            return self._result.status
        if self._error is not None:
            return JobStatus.FAILED
        return JobStatus(ray.get(self._coordinator.status.remote()))

    def metrics(self) -> dict[str, list[dict[str, Any]]]:
        """Per step, a list of per-partition metric dicts (see the README)."""
        if self._result is not None:
            return self._result.metrics
        return ray.get(self._coordinator.metrics.remote())

    def stop(self, savepoint: bool = False, timeout: float | None = None) -> JobResult:
        """Stop the sources, let everything in flight drain and commit; wait for the end."""
        if savepoint:
            raise ConfigError(
                "stop(savepoint=True) needs checkpointing; start the job with checkpoint=..."
            )
        if self._result is None and self._error is None:
            ray.get(self._coordinator.stop.remote())
        return self.wait(timeout=timeout)

    def wait(self, timeout: float | None = None) -> JobResult:
        """Block until the job ends; return its result or raise :class:`JobFailedError`."""
        if self._result is not None:
            return self._result
        if self._error is not None:
            raise self._error
        try:
            report: JobReport = ray.get(self._coordinator.wait.remote(), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"job {self.job!r} is still running after {timeout} s") from None
        except ray.exceptions.RayActorError as exc:
            report = JobReport(
                job=self.job,
                status=JobStatus.FAILED,
                started_at=time.time(),
                failures=[Failure(kind="system", message=f"the job's coordinator died: {exc}")],
            )
        return self._conclude(report)

    def _conclude(self, report: JobReport) -> JobResult:
        outputs: dict[str, list[Any]] = {}
        try:
            if self._collector is not None and report.status is not JobStatus.FAILED:
                for step in launcher.collect_sinks(self.plan):
                    outputs[step] = ray.get(self._collector.output.remote(step))
        finally:
            self._cleanup(report)
        if report.status is JobStatus.FAILED:
            self._error = JobFailedError(self.job, report.failures)
            raise self._error
        ended_at = report.ended_at or time.time()
        self._result = JobResult(
            job=self.job,
            status=report.status,
            duration_s=ended_at - report.started_at,
            started_at=report.started_at,
            running_at=report.running_at,
            ended_at=ended_at,
            metrics=report.metrics,
            outputs=outputs,
        )
        return self._result

    def _cleanup(self, report: JobReport) -> None:
        if self._publisher is not None:
            self._publisher.close(report.metrics)
        try:
            ray.get(self._coordinator.shutdown.remote(), timeout=30)
        except Exception:
            pass
        launcher.kill_quietly(self._coordinator)
        launcher.kill_quietly(self._collector)


def start(
    flow: Dataflow,
    *,
    job_name: str | None = None,
    runtime: RuntimeConfig | None = None,
    meter_provider: Any = None,
) -> JobHandle:
    """Start ``flow`` on Ray and return at once with a :class:`JobHandle`.

    Connects to the Ray this process uses (or ``RAY_ADDRESS``, or starts a
    local one). ``meter_provider`` is an OpenTelemetry ``MeterProvider`` to
    publish the job's metrics with (default: the global one).
    """
    if not isinstance(flow, Dataflow):
        raise ConfigError(f"run/start need a rayflow Dataflow; got {type(flow).__name__}")
    job = flow.name if job_name is None else job_name
    if not naming.is_valid_name(job):
        raise ConfigError(f"job_name {job!r} is not valid: use letters, digits, '_', '.' or '-'")
    if runtime is None:
        runtime = RuntimeConfig()
    elif not isinstance(runtime, RuntimeConfig):
        raise ConfigError(f"runtime must be a rf.RuntimeConfig; got {runtime!r}")
    plan = build_plan(flow.spec())
    launcher.check_picklable(plan)
    launcher.ensure_ray()
    launcher.check_not_running(job)

    for step in plan.flow.steps:
        if step.kind is StepKind.SINK:
            step.connector.setup(job, fresh=True)
    collector = launcher.create_collector(job) if launcher.collect_sinks(plan) else None
    coordinator = launcher.create_coordinator(job, plan, runtime)
    try:
        report: JobReport = ray.get(coordinator.start.remote())
    except BaseException:
        launcher.kill_quietly(coordinator)
        launcher.kill_quietly(collector)
        raise
    publisher = None
    if report.status is not JobStatus.FAILED:
        publisher = MetricsPublisher(
            job,
            lambda: ray.get(coordinator.metrics.remote()),
            meter_provider=meter_provider,
            interval_s=runtime.metrics_interval_s,
        )
    handle = JobHandle(job, plan, coordinator, collector, publisher)
    if report.status is JobStatus.FAILED:
        handle._conclude(report)  # raises JobFailedError
    return handle


def run(flow: Dataflow, **options: Any) -> JobResult:
    """Run ``flow`` to its end (bounded sources) or until stopped; return the result."""
    return start(flow, **options).wait()
