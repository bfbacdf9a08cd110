"""The job's coordinator actor: deploys the operators, supervises them, ends the job.

Named ``rayflow/<job>/coordinator``. The operator actors are created by the
coordinator and therefore owned by it: if it dies they die with it, and a
job never leaves orphaned actors behind. The coordinator stays thin; the
Ray calls are in :class:`Deployment`, and failure triage is a small pure
function.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from typing import Any

import ray

from rayflow._internal.job.deployment import ActorKey, Deployment
from rayflow._internal.job.report import JobReport, JobStatus
from rayflow._internal.plan import decode_plan
from rayflow._internal.runtime.task import TaskOutcome
from rayflow.config import RuntimeConfig
from rayflow.errors import Failure

log = logging.getLogger("rayflow")

#: After a first failure, how long to wait for others before judging the root cause.
FAILURE_GRACE_S = 0.5

# Root causes first: a user error explains an actor's exit; a lost actor explains
# the broken channels of its neighbours.
_SEVERITY = {"user": 0, "system": 1, "actor_died": 2, "channel": 3}


def order_failures(failures: list[Failure]) -> list[Failure]:
    return sorted(failures, key=lambda f: _SEVERITY.get(f.kind, 9))


class JobCoordinator:
    def __init__(
        self,
        job: str,
        plan_blob: bytes,
        config: RuntimeConfig,
        startup_timeout_s: float = 600.0,
    ):
        self.job = job
        self._plan_blob = plan_blob
        self._config = config
        self.deployment: Deployment | None = None
        self._startup_timeout_s = startup_timeout_s
        self._status = JobStatus.STARTING
        self._report = JobReport(job=job, status=JobStatus.STARTING, started_at=time.time())
        self._finished: asyncio.Event | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stop_when_running = False

    async def start(self) -> JobReport:
        """Deploy and start every operator; returns the report (FAILED if that failed)."""
        self._finished = asyncio.Event()
        try:
            plan = decode_plan(self._plan_blob)
            self.deployment = Deployment(self.job, plan, self._config)
            self.deployment.create()
            await self.deployment.wait_ready(self._startup_timeout_s)
            await self.deployment.connect()
            runs = self.deployment.run_all()
            self._report.running_at = time.time()
        except Exception as exc:
            self._end(JobStatus.FAILED, [_startup_failure(exc)])
            if self.deployment is not None:
                self.deployment.kill()
            return self._report
        self._set_status(JobStatus.RUNNING)
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise(runs))
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

    async def stop(self) -> None:
        """Graceful stop: sources end their streams, everything drains and commits."""
        if self._status is JobStatus.STARTING:
            self._stop_when_running = True
        elif self._status is JobStatus.RUNNING:
            self._set_status(JobStatus.STOPPING)
            await self._deployed.stop_sources()

    async def shutdown(self) -> None:
        """Kill whatever is left (the driver calls this once it has the result)."""
        if self._supervisor is not None and not self._supervisor.done():
            self._supervisor.cancel()
        if self.deployment is not None:
            self.deployment.kill()

    # -- supervision ---------------------------------------------------------

    async def _supervise(self, runs: dict[ActorKey, asyncio.Future[Any]]) -> None:
        pending = {fut: key for key, fut in runs.items()}
        failures: list[Failure] = []
        while pending and not failures:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            failures.extend(self._collect(done, pending))
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
