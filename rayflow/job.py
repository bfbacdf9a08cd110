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
from rayflow._internal.checkpoint import lease as leases
from rayflow._internal.checkpoint.start import StartDecision, decide_start
from rayflow._internal.history import MetricsHistory
from rayflow._internal.job import launcher, resources, warm
from rayflow._internal.job.journal import JobJournal, default_log_handler
from rayflow._internal.job.report import JobReport, JobStatus
from rayflow._internal.job.restarts import RestartTracker
from rayflow._internal.notebook import (
    FINAL_COLUMNS,
    LiveDisplay,
    in_notebook,
    plot_history,
    render,
)
from rayflow._internal.plan import Plan, build_plan
from rayflow._internal.storage import open_storage
from rayflow._internal.storage.base import normalize_uri
from rayflow._internal.telemetry import Telemetry
from rayflow._internal.telemetry_config import prepare_telemetry
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
    partitioned_outputs: dict[str, dict[int, list[Any]]] = field(default_factory=dict, repr=False)
    alerts: list[dict[str, Any]] = field(default_factory=list)  # active when the job ended
    # The metrics the handle polled over the job's life: see history().
    _history: MetricsHistory | None = field(default=None, repr=False, compare=False)

    @property
    def restarts(self) -> int:
        """How many times the job restarted from a checkpoint."""
        return len(self.recoveries)

    def history(self) -> Any:
        """The job's metrics over its life as a pandas DataFrame (see ``JobHandle.history``)."""
        return self._polled().frame()

    def plot(self) -> Any:
        """Throughput, busy and back-pressured time per step over the job's life (a Figure)."""
        return plot_history(self.history(), f"rayflow job {self.job}")

    def _polled(self) -> MetricsHistory:
        if self._history is None:
            raise RayflowError(
                f"this JobResult of job {self.job!r} carries no metrics history (it was not "
                "made by rf.run or JobHandle.stop/wait); use the result a handle returned"
            )
        return self._history

    def _repr_html_(self) -> str:
        """The finished job for notebooks: status, duration, checkpoints and each step's records."""
        data = {
            "status": self.status.value,
            "duration_s": self.duration_s,
            "metrics": self.metrics,
            "checkpoints": self.checkpoints,
            "final_checkpoint": self.final_checkpoint,
            "savepoint": self.savepoint,
            "restarts": self.restarts,
            "alerts": self.alerts,
        }
        return render(self.job, data, FINAL_COLUMNS)

    def output(self, step: str) -> list[Any]:
        """The committed records of the ``rf.testing.Collect`` sink named ``step``."""
        try:
            return self.outputs[step]
        except KeyError:
            raise KeyError(
                f"no Collect sink named {step!r} in job {self.job!r}; "
                f"Collect sinks: {sorted(self.outputs) or 'none'}"
            ) from None

    def output_partitions(self, step: str) -> dict[int, list[Any]]:
        """The committed records of a ``Collect`` sink per partition, each in commit order."""
        self.output(step)  # the same error for an unknown step
        return self.partitioned_outputs.get(step, {})

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
    decision: StartDecision


class JobHandle:
    """A running job. Returned by :func:`start`; lives in the driver process.

    A background thread watches the job's coordinator; if the coordinator
    dies, it starts a new one from the latest complete checkpoint (when the
    job checkpoints and the restart strategy allows). When the job ends, the
    same thread collects its result and ends its actors, whether or not
    anybody waits for it, so that a finished job leaves nothing behind.
    """

    def __init__(
        self,
        launch: _Launch,
        coordinator: Any,
        collector: tuple[Any, str] | None,
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
        # The current coordinator's recoveries, as its watch gave them (each at once):
        # if it dies, its report dies with it, and these are what the result keeps.
        self._watched_recoveries: list[dict[str, Any]] = []
        self._restarts = RestartTracker(launch.restart if launch.checkpoint else None)
        # Filled by the telemetry poll (no call of its own), closed with the final metrics.
        self._history = MetricsHistory(
            origin=time.time(), kinds={s.name: s.kind.value for s in self.plan.flow.steps}
        )
        self._journal = JobJournal(self.job)
        self._watcher = threading.Thread(
            target=self._watch, name=f"rayflow-watch-{self.job}", daemon=True
        )

    def _begin(self) -> None:
        """Start watching (once the handle is complete: the watcher may end it at once).

        Every telemetry poll of the coordinator is also kept in the history,
        before it reaches the live display (if any).
        """
        publisher = self._publisher
        if publisher is not None:
            display = publisher.on_poll

            def observe(data: dict[str, Any]) -> None:
                self._history.record(time.time(), data)
                self._journal.update(data)
                if display is not None:
                    display(data)

            publisher.on_poll = observe
        self._watcher.start()

    def __repr__(self) -> str:
        return f"JobHandle({self.job!r}, status={self.status().value})"

    def _repr_html_(self) -> str:
        """A table of the job's status, checkpoints and steps (for notebooks)."""
        if self._result is not None:
            return self._result._repr_html_()
        if self._done.is_set():  # it failed: no coordinator left to ask
            report = self._report
            failure = str(self._error or "").strip().splitlines() or ["unknown failure"]
            data = {
                "status": JobStatus.FAILED.value,
                "metrics": report.metrics if report else {},
                "alerts": [{"kind": "failed", "message": failure[0]}],
            }
            return render(self.job, data, FINAL_COLUMNS)
        return render(self.job, self._call("telemetry", 2**62))

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

    def alerts(self) -> list[dict[str, Any]]:
        """The active alerts: ``{kind, step, partition, since, message}`` (see the README)."""
        if self._result is not None:
            return self._result.alerts
        active: list[dict[str, Any]] = self._call("alerts_active")
        return active

    def recoveries(self) -> list[dict[str, Any]]:
        """One dict per restart: cause, replaced actors, checkpoint, replayed records, time."""
        if self._result is not None:
            return self._result.recoveries
        current: list[dict[str, Any]] = self._call("recoveries")
        return [*self._coordinator_recoveries, *current]

    def history(self) -> Any:
        """The metrics polled over the job's life, as a pandas DataFrame.

        One row per (poll, step, partition): ``time`` (UTC), ``elapsed_s``
        (since ``rf.start`` returned), ``step``, ``kind`` (``source``, ``map``,
        ..., ``sink``), ``partition``, the figures of
        ``metrics()`` (``records_in``, ``records_out``, their rates,
        ``busy_ms_per_s``, ``idle_ms_per_s``, ``backpressured_ms_per_s``,
        ``mailbox_depth``, ``mailbox_bytes``, ``inflight_records``,
        ``inflight_s``, ``state_keys``; missing where a partition does not
        report one) and the job's ``status``, ``restarts``,
        ``checkpoints_completed``, ``checkpoints_failed`` and
        ``last_checkpoint``. Polled once per ``RuntimeConfig.metrics_interval_s``
        (1 s) by the poll that feeds telemetry; the last 3,600 polls are kept
        (at most 500,000 rows), and the job's final metrics are the last rows.
        Counters start again at a restart. Needs pandas
        (``pip install 'rayflow[notebook]'``).
        """
        return self._history.frame()

    def plot(self) -> Any:
        """Records out per second, busy and back-pressured time of every step over time.

        Returns a ``matplotlib.figure.Figure`` with one axis per quantity
        (drawn from :meth:`history`), which a notebook shows as an image.
        Needs matplotlib and pandas (``pip install 'rayflow[notebook]'``).
        """
        return plot_history(self.history(), f"rayflow job {self.job}")

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
        ``savepoint`` a savepoint is written first, to the given path (which
        must be empty) or, with ``True``, to ``<storage>/<job>/savepoints/<time>``,
        and ``JobResult.savepoint`` says where. Both cover the same records.
        """
        location = None
        if savepoint:
            if self.checkpointing is None:
                raise ConfigError(
                    "stop(savepoint=...) needs checkpointing; start the job with checkpoint=..."
                )
            if savepoint is True:
                now = time.time()
                stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
                stamp += f"{now % 1:.3f}"[1:]
                location = f"{self.checkpointing.storage}/{self.job}/savepoints/{stamp}"
            else:
                location = normalize_uri(savepoint)
        if not self._done.is_set():
            try:
                self._call("stop", location)
            except ray.exceptions.RayTaskError as exc:
                # The stop was refused (a savepoint path that is not empty): say why.
                raise CheckpointError(str(exc.cause or exc).strip().splitlines()[-1]) from None
            except (ray.exceptions.RayActorError, RayflowError):
                pass  # the job ended meanwhile: wait() tells how
        return self.wait(timeout=timeout)

    def wait(self, timeout: float | None = None) -> JobResult:
        """Block until the job ends; return its result or raise :class:`JobFailedError`."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"job {self.job!r} is still running after {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    # -- supervision of the coordinator ---------------------------------------

    def _watch(self) -> None:
        seen = 0  # what the current coordinator announced (recoveries, timings, the end)
        while True:
            try:
                seen, self._watched_recoveries, final = ray.get(
                    self._coordinator.watch.remote(seen)
                )
                if final is None:
                    continue
                report: JobReport = final
            except ray.exceptions.RayActorError as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                failure = Failure(kind="system", message=f"the job's coordinator died: {first}")
                final = self._recover_coordinator(failure)
                seen = 0  # a new coordinator counts from 0
                if final is None:
                    continue
                report = final
            except Exception as exc:  # Ray itself is gone (shutdown, lost cluster)
                failure = Failure(kind="system", message=f"lost the job's coordinator: {exc}")
                report = self._failed_report(failure)
            self._report = report
            try:
                self._conclude(report)
            except Exception as exc:  # never leave a waiter hanging
                log.error("job %s: concluding failed: %s", self.job, exc)
                if self._error is None and self._result is None:
                    self._error = JobFailedError(
                        self.job, [Failure(kind="system", message=f"concluding failed: {exc}")]
                    )
            finally:
                self._done.set()
            return

    def _failed_report(self, failure: Failure) -> JobReport:
        failures = [failure]
        if len(self._restarts.history) > 1:
            failures.append(Failure(kind="system", message=self._restarts.give_up_message()))
        return JobReport(
            job=self.job, status=JobStatus.FAILED, started_at=time.time(), failures=failures
        )

    def _recover_coordinator(self, failure: Failure) -> JobReport | None:
        """Start a new coordinator from the latest complete checkpoint.

        Returns None once one runs, or the report to end the job with. A
        coordinator that dies again while it starts is one more failure for
        the restart strategy, which decides on another try.
        """
        launch = self._launch
        if launch.checkpoint is None:
            return self._failed_report(failure)
        while True:
            delay = self._restarts.failed(time.time(), failure)
            if delay is None:
                return self._failed_report(failure)
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
            coordinator = None
            try:
                # The old coordinator is dead (killed just above): take over its lease now.
                decision = decide_start(
                    self.job,
                    launch.checkpoint,
                    recovering=True,
                    recover_from=launch.decision.point,
                    holder=launcher.lease_holder(),
                )
                coordinator = self._create_coordinator(decision)
                report: JobReport = ray.get(coordinator.start.remote())
            except Exception as exc:
                launcher.kill_quietly(coordinator)
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                log.error("job %s: could not restart the coordinator: %s", self.job, first)
                failure = Failure(
                    kind="system", message=f"restarting the job's coordinator failed: {first}"
                )
                continue
            finally:
                self._recovering = False
            self._coordinator = coordinator
            if self._publisher is not None:
                self._publisher.restarted()  # the new coordinator numbers its events from 1
            if report.status is JobStatus.FAILED:
                return report
            point = decision.point
            # What the dead coordinator had recovered from (its watch gave each at once).
            seen, self._watched_recoveries = self._watched_recoveries, []
            self._coordinator_recoveries.extend(seen)
            self._coordinator_recoveries.append(
                {
                    "detected_at": detected,
                    "cause": failure.message,
                    "replaced": [naming.coordinator_actor(self.job), "every operator"],
                    "scope": "global",
                    "restored_checkpoint": point.manifest.checkpoint_id if point else None,
                    "records_replayed": None,
                    "recovered_in_s": (report.running_at or time.time()) - detected,
                }
            )
            return None

    def _create_coordinator(self, decision: StartDecision) -> Any:
        launch = self._launch
        deadline = time.monotonic() + 30
        while True:
            try:
                return launcher.create_coordinator(
                    self.job,
                    launch.plan,
                    launch.runtime,
                    launch.checkpoint,
                    decision,
                    restart=launch.restart,
                )
            except ValueError:  # the dead coordinator's name is not free yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _conclude(self, report: JobReport) -> None:
        """Collect the result and end the job's actors (in the watcher thread)."""
        final = {
            "status": report.status.value,
            "metrics": report.metrics,
            "checkpoints": report.checkpoints,
            "restarts": len(report.recoveries) + len(self._coordinator_recoveries),
        }
        self._history.close(report.ended_at or time.time(), final)
        outputs: dict[str, list[Any]] = {}
        partitioned: dict[str, dict[int, list[Any]]] = {}
        try:
            if self._collector is not None and report.status is not JobStatus.FAILED:
                collector, key = self._collector
                for step in launcher.collect_sinks(self.plan):
                    outputs[step] = ray.get(collector.output.remote(key, step))
                    partitioned[step] = ray.get(collector.by_partition.remote(key, step))
        finally:
            self._cleanup(report)
        ended_at = report.ended_at or time.time()
        self._journal.ended(report, ended_at - report.started_at)
        if report.status is JobStatus.FAILED:
            self._error = JobFailedError(self.job, report.failures)
            return
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
            partitioned_outputs=partitioned,
            alerts=list(report.alerts),
            _history=self._history,
        )

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
        launcher.forget_collected(self._collector)


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
    if faults is not None and not isinstance(faults, Faults):
        raise ConfigError(f"faults must be a rf.testing.Faults; got {faults!r}")
    # Before any actor: a bad OTEL_* value is a ConfigError while the caller can still fix it.
    telemetry = prepare_telemetry(meter_provider, tracer_provider)
    plan = build_plan(flow.spec())
    launcher.check_picklable(plan)
    default_log_handler()
    launcher.ensure_ray()
    launcher.check_not_running(job)
    # Worker processes for the job's actors start now, while the start is decided and
    # beside the coordinator's, if Ray has none idle for them (warm.py).
    actors = launcher.actors_of(plan)
    warm.POOL.ensure(*actors)
    # The plan to ship names, in its Collect sinks, the driver's collector and this start's key.
    plan, collector = launcher.collector_for(job, plan)
    runtime = resources.resolve(runtime, plan)
    # Where the run starts, its run id, its lease and its first checkpoint id: one decision.
    decision = decide_start(
        job,
        checkpoint,
        resume=resume,
        restore_from=restore_from,
        holder=launcher.lease_holder(),
        alive=launcher.lease_holder_alive,
    )
    launch = _Launch(job, plan, runtime, checkpoint, restart or RestartStrategy(), decision)
    coordinator = operators = None
    try:
        coordinator = launcher.create_coordinator(
            job,
            plan,
            runtime,
            checkpoint,
            decision,
            restart=launch.restart,
            faults=faults.all() if faults else (),
            fault_record=faults.record if faults else None,
        )
        # The operators start beside the coordinator, not after it (launcher.create_operators).
        operators = launcher.create_operators(job, plan, runtime, checkpoint, decision)
        report: JobReport = ray.get(coordinator.start.remote(operators))
    except BaseException:
        launcher.hand_over(operators, kill=True)
        launcher.kill_quietly(coordinator)
        launcher.forget_collected(collector)
        _release(checkpoint, decision)
        raise
    # From here on the coordinator holds the operators' only handles: they die with it.
    launcher.hand_over(operators, kill=report.status is JobStatus.FAILED)
    if report.status is JobStatus.FAILED:
        launcher.kill_quietly(coordinator)
        launcher.forget_collected(collector)
        raise JobFailedError(job, report.failures)
    handle = JobHandle(launch, coordinator, collector, None)
    try:
        handle._publisher = Telemetry(
            job,
            lambda since: ray.get(handle._coordinator.telemetry.remote(since)),
            telemetry,
            interval_s=runtime.metrics_interval_s,
        )
        if in_notebook():
            handle._publisher.on_poll = LiveDisplay(job).update
        handle._journal.started(
            sum(stage.parallelism for stage in plan.stages), report.restored_checkpoint
        )
        handle._begin()
        warm.POOL.after(handle._done, *actors)  # ready for the next job
    except BaseException:
        # Nobody would hold a handle to a job that runs on: end it.
        if handle._publisher is not None:
            handle._publisher.close(None)
        launcher.kill_quietly(coordinator)
        launcher.forget_collected(collector)
        _release(checkpoint, decision)
        raise
    return handle


def _release(checkpoint: Checkpointing | None, decision: StartDecision) -> None:
    """Give up a lease that no coordinator took over (the start failed)."""
    if checkpoint is not None and decision.lease is not None:
        leases.release(open_storage(checkpoint.storage), decision.lease)


def run(flow: Dataflow, **options: Any) -> JobResult:
    """Run ``flow`` to its end (bounded sources) or until stopped; return the result."""
    return start(flow, **options).wait()
