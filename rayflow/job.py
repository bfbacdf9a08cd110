"""Running dataflows: ``run``, ``start``, :class:`JobHandle` and :class:`JobResult`."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, NoReturn

import ray

from rayflow._internal import naming
from rayflow._internal.checkpoint.restore import (
    RestorePoint,
    highest_checkpoint_id,
    latest_checkpoint,
    list_checkpoint_ids,
    open_restore_point,
)
from rayflow._internal.job import launcher
from rayflow._internal.job.report import JobReport, JobStatus
from rayflow._internal.job.restarts import RestartTracker
from rayflow._internal.notebook import LiveDisplay, in_notebook, render
from rayflow._internal.plan import Plan, build_plan
from rayflow._internal.storage.base import normalize_uri
from rayflow._internal.telemetry import Telemetry
from rayflow.config import Checkpointing, RestartStrategy, RuntimeConfig
from rayflow.dataflow import Dataflow
from rayflow.errors import ConfigError, Failure, JobFailedError, RayflowError
from rayflow.testing import Faults

__all__ = ["CheckpointError", "JobHandle", "JobResult", "JobStatus", "run", "start"]

log = logging.getLogger("rayflow")


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
    recoveries: list[dict[str, Any]] = field(default_factory=list)  # one per restart
    restored_checkpoint: int | None = None  # the checkpoint the job (last) started from
    outputs: dict[str, list[Any]] = field(default_factory=dict, repr=False)

    @property
    def restarts(self) -> int:
        """How many times the job restarted from a checkpoint."""
        return len(self.recoveries)

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
        """Records that step ``step`` took in, over all partitions (since the last start)."""
        return sum(e["records_in"] for e in self._step(step))

    def records_out(self, step: str) -> int:
        """Records that step ``step`` put out, over all partitions (since the last start)."""
        return sum(e["records_out"] for e in self._step(step))

    def _step(self, step: str) -> list[dict[str, Any]]:
        try:
            return self.metrics[step]
        except KeyError:
            raise KeyError(f"no step named {step!r}; steps: {sorted(self.metrics)}") from None


class CheckpointError(RayflowError):
    """A checkpoint or savepoint requested through the handle failed."""


@dataclass
class _Launch:
    """Everything needed to (re)create the job's coordinator."""

    job: str
    plan: Plan
    runtime: RuntimeConfig
    checkpoint: Checkpointing | None
    restart: RestartStrategy | None
    start_point: RestorePoint | None


class JobHandle:
    """A running job. Returned by :func:`start`; lives in the driver process.

    A background thread watches the job's coordinator; if the coordinator
    dies, it starts a new one from the latest complete checkpoint (when the
    job checkpoints and the restart strategy allows).
    """

    def __init__(
        self,
        launch: _Launch,
        coordinator: Any,
        collector: Any,
        publisher: Telemetry | None,
    ):
        self.job = launch.job
        self.plan = launch.plan
        self.checkpointing = launch.checkpoint
        self._launch = launch
        self._coordinator = coordinator
        self._collector = collector
        self._publisher = publisher
        self._result: JobResult | None = None
        self._error: JobFailedError | None = None
        self._report: JobReport | None = None
        self._done = threading.Event()
        self._recovering = False
        self._coordinator_recoveries: list[dict[str, Any]] = []
        self._restarts = RestartTracker(launch.restart if launch.checkpoint else None)
        self._watcher = threading.Thread(
            target=self._watch, name=f"rayflow-watch-{self.job}", daemon=True
        )
        self._watcher.start()

    def __repr__(self) -> str:
        return f"JobHandle({self.job!r}, status={self.status().value})"

    def _repr_html_(self) -> str:
        """A table of the job's status, checkpoints and steps (for notebooks)."""
        if self._result is not None:
            r = self._result
            data = {
                "status": r.status.value,
                "metrics": r.metrics,
                "checkpoints": r.checkpoints,
                "restarts": r.restarts,
            }
        else:
            data = self._call("telemetry", 2**62)
        return render(self.job, data)

    def __reduce__(self) -> NoReturn:
        raise TypeError(
            "a JobHandle belongs to the driver process and cannot be pickled; "
            "find a running job's actors by name instead "
            f"({naming.coordinator_actor(self.job)!r} in namespace {naming.NAMESPACE!r})"
        )

    def _call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        """Call the coordinator; while it is being replaced, wait for the new one."""
        deadline = time.monotonic() + 120
        while True:
            coordinator = self._coordinator
            if coordinator is not None:
                try:
                    return ray.get(getattr(coordinator, method).remote(*args), timeout=timeout)
                except ray.exceptions.RayActorError:
                    if self.checkpointing is None or self._done.is_set():
                        raise
            elif self._done.is_set():
                raise RayflowError(f"job {self.job!r} ended while its coordinator restarted")
            if time.monotonic() > deadline:
                raise RayflowError(f"the coordinator of job {self.job!r} did not come back")
            time.sleep(0.05)

    # -- observation ---------------------------------------------------------

    def status(self) -> JobStatus:
        if self._result is not None:
            return self._result.status
        if self._error is not None or (self._report and self._report.status.terminal):
            return self._report.status if self._report else JobStatus.FAILED
        if self._recovering:
            return JobStatus.RECOVERING
        coordinator = self._coordinator
        if coordinator is None:
            return JobStatus.RECOVERING
        try:
            return JobStatus(ray.get(coordinator.status.remote()))
        except ray.exceptions.RayActorError:
            return JobStatus.RECOVERING if self.checkpointing else JobStatus.FAILED

    def metrics(self) -> dict[str, list[dict[str, Any]]]:
        """Per step, a list of per-partition metric dicts (see the README)."""
        if self._result is not None:
            return self._result.metrics
        metrics: dict[str, list[dict[str, Any]]] = self._call("metrics")
        return metrics

    def checkpoint_stats(self) -> dict[str, Any] | None:
        """Completed and failed checkpoints, the last one's duration and size, ..."""
        if self._result is not None:
            return self._result.checkpoints
        stats: dict[str, Any] | None = self._call("checkpoint_stats")
        return stats

    def recoveries(self) -> list[dict[str, Any]]:
        """One dict per restart: cause, replaced actors, checkpoint, replayed records, time."""
        if self._result is not None:
            return self._result.recoveries
        current: list[dict[str, Any]] = self._call("recoveries")
        return [*self._coordinator_recoveries, *current]

    # -- control -------------------------------------------------------------

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
            info: dict[str, Any] = self._call("checkpoint", savepoint, timeout=timeout)
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
        if not self._done.is_set():
            try:
                self._call("stop", location)
            except (ray.exceptions.RayActorError, RayflowError):
                pass  # the job ended meanwhile: wait() tells how
        return self.wait(timeout=timeout)

    def wait(self, timeout: float | None = None) -> JobResult:
        """Block until the job ends; return its result or raise :class:`JobFailedError`."""
        if self._result is not None:
            return self._result
        if self._error is not None:
            raise self._error
        if not self._done.wait(timeout):
            raise TimeoutError(f"job {self.job!r} is still running after {timeout} s")
        assert self._report is not None
        return self._conclude(self._report)

    # -- supervision of the coordinator ---------------------------------------

    def _watch(self) -> None:
        while True:
            try:
                report: JobReport = ray.get(self._coordinator.wait.remote())
            except ray.exceptions.RayActorError as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                failure = Failure(kind="system", message=f"the job's coordinator died: {first}")
                if self._recover_coordinator(failure):
                    continue
                report = self._failed_report(failure)
            except Exception as exc:  # Ray itself is gone (shutdown, lost cluster)
                failure = Failure(kind="system", message=f"lost the job's coordinator: {exc}")
                report = self._failed_report(failure)
            self._report = report
            self._done.set()
            return

    def _failed_report(self, failure: Failure) -> JobReport:
        failures = [failure]
        if len(self._restarts.history) > 1:
            failures.append(Failure(kind="system", message=self._restarts.give_up_message()))
        return JobReport(
            job=self.job, status=JobStatus.FAILED, started_at=time.time(), failures=failures
        )

    def _recover_coordinator(self, failure: Failure) -> bool:
        """Start a new coordinator from the latest complete checkpoint."""
        launch = self._launch
        if launch.checkpoint is None:
            return False
        delay = self._restarts.failed(time.time(), failure)
        if delay is None:
            return False
        self._recovering = True
        detected = time.time()
        log.warning(
            "job %s: %s; restarting it from the latest checkpoint",
            self.job,
            failure.message.splitlines()[0],
        )
        # Ray keeps a dead actor's name while its owner still holds a handle to it.
        launcher.kill_quietly(self._coordinator)
        self._coordinator = None
        time.sleep(delay)
        try:
            storage = launch.checkpoint.storage
            point = latest_checkpoint(storage, self.job) or launch.start_point
            coordinator = None
            deadline = time.monotonic() + 30
            while coordinator is None:
                try:
                    coordinator = launcher.create_coordinator(
                        self.job,
                        launch.plan,
                        launch.runtime,
                        launch.checkpoint,
                        point,
                        restart=launch.restart,
                        next_checkpoint_id=highest_checkpoint_id(storage, self.job) + 1,
                    )
                except ValueError:  # the dead coordinator's name is not free yet
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            report: JobReport = ray.get(coordinator.start.remote())
            if report.status is JobStatus.FAILED:
                self._coordinator = coordinator
                return False
        except Exception as exc:
            log.error("job %s: could not restart the coordinator: %s", self.job, exc)
            return False
        finally:
            self._recovering = False
        self._coordinator = coordinator
        self._coordinator_recoveries.append(
            {
                "detected_at": detected,
                "cause": failure.message,
                "replaced": [naming.coordinator_actor(self.job), "every operator"],
                "restored_checkpoint": point.manifest.checkpoint_id if point else None,
                "records_replayed": None,
                "recovered_in_s": (report.running_at or time.time()) - detected,
            }
        )
        return True

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
            recoveries=[*self._coordinator_recoveries, *report.recoveries],
            restored_checkpoint=report.restored_checkpoint,
            outputs=outputs,
        )
        return self._result

    def _cleanup(self, report: JobReport) -> None:
        if self._publisher is not None:
            self._publisher.close(
                {
                    "metrics": report.metrics,
                    "checkpoints": report.checkpoints,
                    "restarts": len(report.recoveries) + len(self._coordinator_recoveries),
                    "events": report.events,
                    "status": report.status.value,
                }
            )
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
    restart: RestartStrategy | None = None,
    runtime: RuntimeConfig | None = None,
    meter_provider: Any = None,
    tracer_provider: Any = None,
    faults: Faults | None = None,
) -> JobHandle:
    """Start ``flow`` on Ray and return at once with a :class:`JobHandle`.

    Connects to the Ray this process uses (or ``RAY_ADDRESS``, or starts a
    local one). ``checkpoint`` turns checkpointing on (and with it restarts
    after failures, as ``restart`` says; the default strategy allows 10
    failures in 5 minutes); ``resume=True`` continues the job from the
    latest complete checkpoint in that storage; ``restore_from`` starts from
    a savepoint (or one checkpoint's folder). ``meter_provider`` and
    ``tracer_provider`` are the OpenTelemetry providers for the job's
    metrics and its checkpoint and recovery spans (default: the global ones,
    else ``OTEL_METRICS_EXPORTER`` / ``OTEL_TRACES_EXPORTER``).
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
    if restart is not None and not isinstance(restart, RestartStrategy):
        raise ConfigError(f"restart must be a rf.RestartStrategy; got {restart!r}")
    if restart is not None and checkpoint is None:
        raise ConfigError(
            "restart=... needs checkpoint=rf.Checkpointing(...): a job restarts from its "
            "last checkpoint"
        )
    plan = build_plan(flow.spec())
    launcher.check_picklable(plan)
    point = _restore_point(job, checkpoint, resume, restore_from)
    launcher.ensure_ray()
    launcher.check_not_running(job)

    launch = _Launch(job, plan, runtime, checkpoint, restart or RestartStrategy(), point)
    next_id = None
    if checkpoint is not None and resume:
        # Never reuse the id of a checkpoint that was under way when the last run died.
        next_id = highest_checkpoint_id(checkpoint.storage, job) + 1
    collector = launcher.create_collector(job) if launcher.collect_sinks(plan) else None
    coordinator = launcher.create_coordinator(
        job,
        plan,
        runtime,
        checkpoint,
        point,
        restart=launch.restart,
        next_checkpoint_id=next_id,
        crash_before_manifest=faults.crash_coordinator_before_manifest if faults else None,
    )
    try:
        report: JobReport = ray.get(coordinator.start.remote())
    except BaseException:
        launcher.kill_quietly(coordinator)
        launcher.kill_quietly(collector)
        raise
    if report.status is JobStatus.FAILED:
        launcher.kill_quietly(coordinator)
        launcher.kill_quietly(collector)
        raise JobFailedError(job, report.failures)
    handle = JobHandle(launch, coordinator, collector, None)
    handle._publisher = Telemetry(
        job,
        lambda since: ray.get(handle._coordinator.telemetry.remote(since)),  # fails in restarts
        meter_provider=meter_provider,
        tracer_provider=tracer_provider,
        interval_s=runtime.metrics_interval_s,
    )
    if in_notebook():
        handle._publisher.on_poll = LiveDisplay(job).update
    return handle


def run(flow: Dataflow, **options: Any) -> JobResult:
    """Run ``flow`` to its end (bounded sources) or until stopped; return the result."""
    return start(flow, **options).wait()
