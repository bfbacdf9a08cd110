"""Running dataflows: ``run``, ``start``, :class:`JobHandle` and :class:`JobResult`."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, NoReturn

import ray

from rayflow._internal import naming
from rayflow._internal.checkpoint.restore import (
    RestorePoint,
    latest_checkpoint,
    list_checkpoint_ids,
    open_restore_point,
)
from rayflow._internal.job import launcher
from rayflow._internal.job.report import JobReport, JobStatus
from rayflow._internal.plan import Plan, build_plan
from rayflow._internal.storage.base import normalize_uri
from rayflow._internal.telemetry import MetricsPublisher
from rayflow.config import Checkpointing, RuntimeConfig
from rayflow.dataflow import Dataflow
from rayflow.errors import ConfigError, Failure, JobFailedError, RayflowError
from rayflow.testing import Faults

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
    checkpoints: dict[str, Any] | None = None  # checkpoint statistics, if checkpointing
    final_checkpoint: int | None = None  # the checkpoint that covers the whole output
    savepoint: str | None = None  # where stop(savepoint=...) wrote the final savepoint
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


class CheckpointError(RayflowError):
    """A checkpoint or savepoint requested through the handle failed."""


class JobHandle:
    """A running job. Returned by :func:`start`; lives in the driver process."""

    def __init__(
        self,
        job: str,
        plan: Plan,
        coordinator: Any,
        collector: Any,
        publisher: MetricsPublisher | None,
        checkpointing: Checkpointing | None,
    ):
        self.job = job
        self.plan = plan
        self.checkpointing = checkpointing
        self._coordinator = coordinator
        self._collector = collector
        self._publisher = publisher
        self._result: JobResult | None = None
        self._error: JobFailedError | None = None

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

    def checkpoint_stats(self) -> dict[str, Any] | None:
        """Completed and failed checkpoints, the last one's duration and size, ..."""
        if self._result is not None:
            return self._result.checkpoints
        return ray.get(self._coordinator.checkpoint_stats.remote())

    def checkpoint(self, timeout: float | None = None) -> int:
        """Take a checkpoint now; return its id once it is complete."""
        return int(self._checkpoint(None, timeout)["id"])

    def savepoint(self, path: str | os.PathLike[str], timeout: float | None = None) -> str:
        """Write a self-contained full snapshot to ``path`` (a folder or s3:// URI).

        Retention never deletes it; start a job from it with ``restore_from=``.
        """
        uri = normalize_uri(path)
        self._checkpoint(uri, timeout)
        return uri

    def _checkpoint(self, savepoint: str | None, timeout: float | None) -> dict[str, Any]:
        if self.checkpointing is None:
            raise ConfigError(
                "this job was started without checkpointing; pass checkpoint="
                "rf.Checkpointing(...) to rf.start to take checkpoints or savepoints"
            )
        try:
            info: dict[str, Any] = ray.get(
                self._coordinator.checkpoint.remote(savepoint), timeout=timeout
            )
        except ray.exceptions.RayTaskError as exc:
            raise CheckpointError(str(exc.cause or exc).strip().splitlines()[-1]) from None
        return info

    def stop(
        self, savepoint: bool | str | os.PathLike[str] = False, timeout: float | None = None
    ) -> JobResult:
        """Stop the sources, drain, commit, and wait for the end.

        With checkpointing the job ends with a final checkpoint; with
        ``savepoint`` it is a savepoint instead, written to the given path (or,
        with ``True``, to ``<storage>/<job>/savepoints/<time>``), and
        ``JobResult.savepoint`` says where.
        """
        location = None
        if savepoint:
            if self.checkpointing is None:
                raise ConfigError(
                    "stop(savepoint=...) needs checkpointing; start the job with checkpoint=..."
                )
            if savepoint is True:
                stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
                location = f"{self.checkpointing.storage}/{self.job}/savepoints/{stamp}"
            else:
                location = normalize_uri(savepoint)
        if self._result is None and self._error is None:
            ray.get(self._coordinator.stop.remote(location))
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
            checkpoints=report.checkpoints,
            final_checkpoint=report.final_checkpoint,
            savepoint=report.savepoint,
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


def _restore_point(
    job: str,
    checkpoint: Checkpointing | None,
    resume: bool,
    restore_from: str | os.PathLike[str] | None,
) -> RestorePoint | None:
    if restore_from is not None and resume:
        raise ConfigError("pass either resume=True or restore_from=..., not both")
    if restore_from is not None:
        return open_restore_point(os.fspath(restore_from))
    if checkpoint is None:
        if resume:
            raise ConfigError("resume=True needs checkpoint=rf.Checkpointing(storage=...)")
        return None
    existing = list_checkpoint_ids(checkpoint.storage, job)
    if not resume:
        if existing:
            raise ConfigError(
                f"{checkpoint.storage} already holds {len(existing)} checkpoint(s) of job "
                f"{job!r} (the latest is {existing[-1]}). Pass resume=True to continue from "
                "the latest, give this run another job_name=..., or use another storage; "
                "rayflow never overwrites or ignores a job's checkpoints."
            )
        return None
    point = latest_checkpoint(checkpoint.storage, job)
    if point is None:
        raise ConfigError(
            f"resume=True, but {checkpoint.storage} holds no complete checkpoint of job "
            f"{job!r}; start it without resume=True"
        )
    return point


def start(
    flow: Dataflow,
    *,
    job_name: str | None = None,
    checkpoint: Checkpointing | None = None,
    resume: bool = False,
    restore_from: str | os.PathLike[str] | None = None,
    runtime: RuntimeConfig | None = None,
    meter_provider: Any = None,
    faults: Faults | None = None,
) -> JobHandle:
    """Start ``flow`` on Ray and return at once with a :class:`JobHandle`.

    Connects to the Ray this process uses (or ``RAY_ADDRESS``, or starts a
    local one). ``checkpoint`` turns checkpointing on; ``resume=True``
    continues the job from the latest complete checkpoint in that storage;
    ``restore_from`` starts from a savepoint (or one checkpoint's folder).
    ``meter_provider`` is an OpenTelemetry ``MeterProvider`` to publish the
    job's metrics with (default: the global one).
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
    if checkpoint is not None and not isinstance(checkpoint, Checkpointing):
        raise ConfigError(f"checkpoint must be a rf.Checkpointing; got {checkpoint!r}")
    plan = build_plan(flow.spec())
    launcher.check_picklable(plan)
    point = _restore_point(job, checkpoint, resume, restore_from)
    launcher.ensure_ray()
    launcher.check_not_running(job)

    collector = launcher.create_collector(job) if launcher.collect_sinks(plan) else None
    coordinator = launcher.create_coordinator(
        job,
        plan,
        runtime,
        checkpoint,
        point,
        faults.crash_coordinator_before_manifest if faults else None,
    )
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
    handle = JobHandle(job, plan, coordinator, collector, publisher, checkpoint)
    if report.status is JobStatus.FAILED:
        handle._conclude(report)  # raises JobFailedError
    return handle


def run(flow: Dataflow, **options: Any) -> JobResult:
    """Run ``flow`` to its end (bounded sources) or until stopped; return the result."""
    return start(flow, **options).wait()
