"""The job's coordinator actor: deploys the operators, checkpoints, ends the job.

Named ``rayflow/<job>/coordinator``. The operator actors are created by the
coordinator and therefore owned by it: if it dies they die with it, and a
job never leaves orphaned actors behind. The coordinator stays thin: the
Ray calls are in :class:`Deployment`, the checkpoint protocol in
:class:`CheckpointCoordinator`, and failure triage is a small pure function.

With checkpointing, a job ends with a final checkpoint: when every source
is exhausted (or stopped), the coordinator takes one more checkpoint (a
savepoint, if the stop asked for one), and only after it is committed do
the sources end their streams. So every record that reached a sink is
covered by a committed checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from typing import Any

import ray

from rayflow._internal.checkpoint.coordinator import CheckpointCoordinator, CheckpointFailed
from rayflow._internal.checkpoint.manifest import CHECKPOINT, SAVEPOINT, describe_flow
from rayflow._internal.checkpoint.restore import RestorePoint, assign
from rayflow._internal.job.deployment import ActorKey, Deployment
from rayflow._internal.job.report import JobReport, JobStatus
from rayflow._internal.plan import Plan, decode_plan
from rayflow._internal.runtime.task import TaskOutcome
from rayflow._internal.spec import StepKind
from rayflow.config import Checkpointing, RuntimeConfig
from rayflow.errors import Failure

log = logging.getLogger("rayflow")

#: After a first failure, how long to wait for others before judging the root cause.
FAILURE_GRACE_S = 0.5
#: Pause between attempts at the final checkpoint.
FINAL_RETRY_S = 0.5

# Root causes first: a user error explains an actor's exit; a lost actor explains
# the broken channels of its neighbours.
_SEVERITY = {"user": 0, "checkpoint": 1, "system": 2, "actor_died": 3, "channel": 4}


def order_failures(failures: list[Failure]) -> list[Failure]:
    return sorted(failures, key=lambda f: _SEVERITY.get(f.kind, 9))


class JobCoordinator:
    def __init__(
        self,
        job: str,
        plan_blob: bytes,
        config: RuntimeConfig,
        checkpointing: Checkpointing | None = None,
        restore_point: RestorePoint | None = None,
        crash_before_manifest: int | None = None,
        startup_timeout_s: float = 600.0,
    ):
        self.job = job
        self._plan_blob = plan_blob
        self._config = config
        self._checkpointing = checkpointing
        self._restore_point = restore_point
        self._crash_before_manifest = crash_before_manifest
        self._startup_timeout_s = startup_timeout_s
        self.plan: Plan | None = None
        self.deployment: Deployment | None = None
        self.checkpoints: CheckpointCoordinator | None = None
        self._status = JobStatus.STARTING
        self._report = JobReport(job=job, status=JobStatus.STARTING, started_at=time.time())
        self._finished: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._stop_when_running = False
        self._final_savepoint: str | None = None
        self._sources_done: set[ActorKey] = set()
        self._final_started = False
        self._fatal: list[Failure] = []

    # -- life cycle ----------------------------------------------------------

    async def start(self) -> JobReport:
        """Deploy and start every operator; returns the report (FAILED if that failed)."""
        self._finished = asyncio.Event()
        self._wake = asyncio.Event()
        try:
            plan = self.plan = decode_plan(self._plan_blob)
            point = self._restore_point
            restored_id = point.manifest.checkpoint_id if point else None
            cp = self._checkpointing
            assignments = None
            if point is not None:
                assignments = assign(plan, point, continue_in=cp.storage if cp else None)
            for step in plan.flow.steps:
                if step.kind is StepKind.SINK:
                    await asyncio.to_thread(
                        step.connector.setup, self.job, restored_checkpoint=restored_id
                    )
            self.deployment = Deployment(
                self.job, plan, self._config, cp.full_every if cp else None
            )
            self.deployment.create()
            await self.deployment.wait_ready(self._startup_timeout_s)
            if assignments is not None:
                await self.deployment.restore(assignments)
            if cp is not None:
                self.checkpoints = CheckpointCoordinator(
                    self.job,
                    describe_flow(plan),
                    cp,
                    self.deployment,
                    next_id=(restored_id or 0) + 1,
                    last_completed=point.manifest if point else None,
                    crash_before_manifest=self._crash_before_manifest,
                )
            me = ray.get_runtime_context().current_actor
            await self.deployment.connect(me)
            runs = self.deployment.run_all()
            self._report.running_at = time.time()
        except Exception as exc:
            self._end(JobStatus.FAILED, [_startup_failure(exc)])
            if self.deployment is not None:
                self.deployment.kill()
            return self._report
        self._set_status(JobStatus.RUNNING)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._supervise(runs)))
        if self.checkpoints is not None:
            self._tasks.append(loop.create_task(self.checkpoints.run(self._checkpoints_fatal)))
        if self._stop_when_running:
            await self.stop()
        return self._report

    async def wait(self) -> JobReport:
        assert self._finished is not None, "start() first"
        await self._finished.wait()
        return self._report

    async def status(self) -> str:
        return self._status.value

    @property
    def _deployed(self) -> Deployment:
        assert self.deployment is not None, "start() first"
        return self.deployment

    async def metrics(self) -> dict[str, list[dict[str, Any]]]:
        if self._status.terminal or self.deployment is None:
            return self._report.metrics
        return await self.deployment.metrics()

    async def checkpoint_stats(self) -> dict[str, Any] | None:
        return self.checkpoints.stats() if self.checkpoints else None

    async def stop(self, savepoint: str | None = None) -> None:
        """Graceful stop: sources stop; with checkpoints a final one (or a savepoint) commits."""
        self._final_savepoint = savepoint
        if self._status is JobStatus.STARTING:
            self._stop_when_running = True
        elif self._status is JobStatus.RUNNING:
            self._set_status(JobStatus.STOPPING)
            await self._deployed.stop_sources()

    async def shutdown(self) -> None:
        """Kill whatever is left (the driver calls this once it has the result)."""
        for task in self._tasks:
            task.cancel()
        if self.checkpoints is not None:
            self.checkpoints.close()
        if self.deployment is not None:
            self.deployment.kill()

    # -- checkpoints -----------------------------------------------------------

    async def checkpoint(self, savepoint: str | None = None) -> dict[str, Any]:
        """Take a checkpoint (or a savepoint at ``savepoint``) now; its id and figures."""
        if self.checkpoints is None:
            raise CheckpointFailed("the job was started without checkpoint=...")
        if self._status is not JobStatus.RUNNING:
            raise CheckpointFailed(f"the job is {self._status.value}, not RUNNING")
        kind = SAVEPOINT if savepoint else CHECKPOINT
        manifest = await self.checkpoints.trigger(kind, savepoint)
        return {
            "id": manifest.checkpoint_id,
            "kind": manifest.kind,
            "written_bytes": manifest.written_bytes,
            "duration_ms": manifest.duration_ms,
        }

    async def acknowledge(self, checkpoint_id: int, key: ActorKey, snapshot: Any) -> str:
        if self.checkpoints is None:
            return "unknown"
        return self.checkpoints.acknowledge(checkpoint_id, tuple(key), snapshot).value  # type: ignore[arg-type]

    async def decline(self, checkpoint_id: int, key: ActorKey, reason: str) -> None:
        if self.checkpoints is not None:
            self.checkpoints.decline(checkpoint_id, tuple(key), reason)  # type: ignore[arg-type]

    async def source_done(self, key: ActorKey) -> None:
        """A source read everything (or was stopped); end the job once all have."""
        self._sources_done.add(tuple(key))  # type: ignore[arg-type]
        if self._final_started or set(self._deployed.source_keys()) - self._sources_done:
            return
        self._final_started = True
        self._tasks.append(asyncio.get_running_loop().create_task(self._final_checkpoint()))

    async def _final_checkpoint(self) -> None:
        assert self.checkpoints is not None
        kind = SAVEPOINT if self._final_savepoint else CHECKPOINT
        while not self._fatal:
            try:
                manifest = await self.checkpoints.trigger(kind, self._final_savepoint, final=True)
            except CheckpointFailed as exc:
                log.warning("job %s: final checkpoint failed, retrying: %s", self.job, exc)
                await asyncio.sleep(FINAL_RETRY_S)
                continue
            self._report.final_checkpoint = manifest.checkpoint_id
            if kind == SAVEPOINT:
                self._report.savepoint = self._final_savepoint
            await self._deployed.finish_sources()
            return

    def _checkpoints_fatal(self, reasons: list[str]) -> None:
        self._fatal.append(
            Failure(
                kind="checkpoint",
                message=f"{len(reasons)} checkpoints failed in a row (the limit is "
                f"Checkpointing.max_consecutive_failures); the last: {reasons[-1]}",
                traceback="\n".join(reasons),
            )
        )
        assert self._wake is not None
        self._wake.set()

    # -- supervision ---------------------------------------------------------

    async def _supervise(self, runs: dict[ActorKey, asyncio.Future[Any]]) -> None:
        assert self._wake is not None
        pending = {fut: key for key, fut in runs.items()}
        failures: list[Failure] = []
        while pending and not failures and not self._fatal:
            wake = asyncio.ensure_future(self._wake.wait())
            done, _ = await asyncio.wait([*pending, wake], return_when=asyncio.FIRST_COMPLETED)
            wake.cancel()
            failures.extend(self._collect({f for f in done if f in pending}, pending))
        failures.extend(self._fatal)
        if self.checkpoints is not None:
            self.checkpoints.close()
        if failures:
            # Give the other actors a moment to report, then pick the root cause.
            if pending:
                done, _ = await asyncio.wait(pending, timeout=FAILURE_GRACE_S)
                failures.extend(self._collect(done, pending))
            self._report.metrics = await self._deployed.metrics(timeout_s=2.0)
            self._deployed.kill()
            self._end(JobStatus.FAILED, order_failures(failures))
            return
        self._report.metrics = await self._deployed.metrics()
        self._deployed.kill()
        stopped = self._status is JobStatus.STOPPING
        self._end(JobStatus.STOPPED if stopped else JobStatus.FINISHED, [])

    def _collect(
        self, done: set[asyncio.Future[Any]], pending: dict[asyncio.Future[Any], ActorKey]
    ) -> list[Failure]:
        failures = []
        for fut in done:
            key = pending.pop(fut)
            failure = _outcome_failure(self._deployed.name(key), key, fut)
            if failure is not None:
                failures.append(failure)
        return failures

    def _set_status(self, status: JobStatus) -> None:
        self._status = status
        self._report.status = status

    def _end(self, status: JobStatus, failures: list[Failure]) -> None:
        self._set_status(status)
        self._report.failures = failures
        self._report.ended_at = time.time()
        if self.checkpoints is not None:
            self._report.checkpoints = self.checkpoints.stats()
        if failures:
            log.error("job %s failed: %s", self.job, failures[0].describe())
        assert self._finished is not None
        self._finished.set()


def _outcome_failure(actor: str, key: ActorKey, fut: asyncio.Future[Any]) -> Failure | None:
    try:
        outcome: TaskOutcome = fut.result()
    except ray.exceptions.RayActorError as exc:
        return Failure(
            kind="actor_died",
            message=f"operator actor {actor} died: {_first_line(exc)}",
            step=key[0],
            partition=key[1],
        )
    except Exception as exc:
        return Failure(
            kind="system",
            message=f"operator actor {actor} failed: {type(exc).__name__}: {_first_line(exc)}",
            step=key[0],
            partition=key[1],
            traceback="".join(traceback.format_exception(exc)),
        )
    return outcome.failure


def _startup_failure(exc: BaseException) -> Failure:
    cause = exc
    if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
        cause = exc.cause
    return Failure(
        kind="system",
        message=f"the job could not start: {type(cause).__name__}: {_first_line(cause)}",
        traceback="".join(traceback.format_exception(cause)),
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
