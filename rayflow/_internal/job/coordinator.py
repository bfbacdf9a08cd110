"""The job's coordinator actor: deploys the operators, checkpoints, recovers, ends the job.

Named ``rayflow/<job>/coordinator``. The operator actors die with the
coordinator (the driver then starts a new coordinator from the latest
manifest), so a job never leaves orphaned actors behind. Those it creates
(a restarted coordinator's, replacements) it owns; those of a fresh start
the driver creates beside it, to save a start-up's worth of waiting, and
hands over without keeping a reference, so that the coordinator holds the
only one and Ray ends them when it dies (launcher.py). The coordinator
only wires its collaborators: the Ray calls are in :class:`Deployment`, the checkpoint
protocol in :class:`CheckpointCoordinator`, restoring and recovering in
:class:`Failover`, the restart policy in :class:`RestartTracker`, the lease
in ``checkpoint/lease.py`` and fault injection in :class:`FaultInjector`.

With checkpointing, a job ends with a final checkpoint: when every source
is exhausted (or stopped), the coordinator takes one more checkpoint
(preceded by a savepoint, if the stop asked for one), and only after it is
committed do the sources end their streams. So every record that reached a
sink is covered by a committed checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from typing import Any

import ray

from rayflow._internal.checkpoint import lease as leases
from rayflow._internal.checkpoint.coordinator import (
    CheckpointCoordinator,
    CheckpointFailed,
    check_savepoint_location,
    clear_savepoint,
)
from rayflow._internal.checkpoint.manifest import CHECKPOINT, SAVEPOINT, Manifest, describe_flow
from rayflow._internal.checkpoint.restore import RestorePoint
from rayflow._internal.checkpoint.start import StartDecision
from rayflow._internal.job.alerts import AlertMonitor
from rayflow._internal.job.deployment import ActorKey, Deployment
from rayflow._internal.job.failover import PING_TIMEOUT_S, Failover
from rayflow._internal.job.faults import FaultInjector
from rayflow._internal.job.ray_metrics import RayMetrics
from rayflow._internal.job.report import JobReport, JobStatus
from rayflow._internal.job.restarts import RestartTracker
from rayflow._internal.plan import Plan, decode_plan
from rayflow._internal.runtime.task import TaskOutcome
from rayflow._internal.storage import StorageError, open_storage
from rayflow._internal.storage.base import normalize_uri
from rayflow.config import Checkpointing, RestartStrategy, RuntimeConfig
from rayflow.errors import Failure
from rayflow.testing import Fault

log = logging.getLogger("rayflow")

#: After a first failure, how long to wait for others before judging the root cause.
FAILURE_GRACE_S = 0.2
#: Pause between attempts at the final checkpoint.
FINAL_RETRY_S = 0.5
#: How often the metrics are read for the alerts and the automatic interval.
MONITOR_S = 1.0

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
        checkpointing: Checkpointing | None,
        start: StartDecision,
        restart: RestartStrategy | None = None,
        faults: tuple[Fault, ...] = (),
        driver_pid: int | None = None,
        startup_timeout_s: float = 600.0,
        fault_record: str | None = None,
    ):
        self.job = job
        self._plan_blob = plan_blob
        self._config = config
        self._checkpointing = checkpointing
        self._start = start
        self.run_id = start.run_id
        self._lease = start.lease
        # The checkpoint a restart goes back to: the start point, then each completed one.
        self._recovery_point = start.point
        self._startup_timeout_s = startup_timeout_s
        self._restarts = RestartTracker(restart if checkpointing is not None else None)
        self.faults = FaultInjector(
            job, driver_pid=driver_pid, kill_actor=self._kill_actor, record=fault_record
        )
        for fault in faults:
            self.faults.arm(fault)
        self.plan: Plan | None = None
        self.deployment: Deployment | None = None
        self.checkpoints: CheckpointCoordinator | None = None
        self.failover: Failover | None = None
        self._status = JobStatus.STARTING
        self._report = JobReport(job=job, status=JobStatus.STARTING, started_at=time.time())
        self._finished: asyncio.Event | None = None
        # What the driver's long poll (``watch``) waits for: a recovery recorded or
        # timed, or the end; ``_version`` counts them.
        self._news: asyncio.Event | None = None
        self._version = 0
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._final_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._stop_when_running = False
        self._final_savepoint: str | None = None
        self._final_savepoint_id = 0
        self._sources_done: set[ActorKey] = set()
        self._fatal: list[Failure] = []
        self._fenced = False
        self._runs: dict[ActorKey, asyncio.Future[Any]] = {}
        # Partial recovery: one happened since the recovery point completed (a second
        # loss before the next checkpoint goes global). A global restart under way
        # (decided: every task starts over) voids what sources say meanwhile.
        self._partial_since_point = False
        self._partial_checkpoint_floor = 0
        self._global_under_way = False
        self._events: list[dict[str, Any]] = []  # finished checkpoints and recoveries, for traces
        self._event_seq = 0
        self.alerts = AlertMonitor(
            job,
            stall_after_s=config.stall_after_s,
            backlog_window_s=config.backlog_window_s,
            hot_share=config.hot_key_share,
        )
        # Ray's Prometheus export: fed by the monitor's poll and the finished events.
        self.ray_metrics = RayMetrics(job)

    # -- life cycle ----------------------------------------------------------

    async def start(self, operators: dict[ActorKey, Any] | None = None) -> JobReport:
        """Deploy and start every operator; returns the report (FAILED if that failed).

        ``operators``: the actors of a fresh start, which the driver created
        beside this coordinator (launcher.create_operators); else it creates them.
        """
        self._finished = asyncio.Event()
        self._news = asyncio.Event()
        self._wake = asyncio.Event()
        try:
            plan = self.plan = decode_plan(self._plan_blob)
            cp = self._checkpointing
            self.deployment = Deployment.for_job(
                self.job,
                plan,
                self._config,
                cp,
                self.run_id,
                self._start.first_checkpoint_id,
                self._start.instance,
            )
            if operators is not None:
                self.deployment.adopt(operators)
            point = self._recovery_point
            if cp is not None:
                await self._claim_lease()
                self.checkpoints = CheckpointCoordinator(
                    self.job,
                    describe_flow(plan),
                    cp,
                    self.deployment,
                    next_id=self._start.first_checkpoint_id,
                    last_completed=point.manifest if point else None,
                    lease=self._lease,
                    run_id=self.run_id,
                )
                self.checkpoints.on_completed = self._checkpoint_completed
                self.checkpoints.on_finished = self._event
                self.checkpoints.fault = self.faults.hit
            self.failover = Failover(
                self.job,
                plan,
                self.deployment,
                checkpointing=cp,
                checkpoints=self.checkpoints,
                run_id=self.run_id,
                coordinator_handle=ray.get_runtime_context().current_actor,
                fault=self.faults.hit,
                startup_timeout_s=self._startup_timeout_s,
            )
            if not self.deployment.handles:
                # A restarted coordinator: the dying actors of its predecessor free their names
                # a moment after it died.
                await self.deployment.replace(self.deployment.keys())
            await self.deployment.wait_ready(self._startup_timeout_s)
            await self._run_from(point)
            self._report.running_at = time.time()
        except Exception as exc:
            self._end(JobStatus.FAILED, [_startup_failure(exc)])
            if self.deployment is not None:
                self.deployment.kill()
            await self._release_lease()
            return self._report
        self._set_status(JobStatus.RUNNING)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._supervise()))
        if self.checkpoints is not None:
            self._tasks.append(loop.create_task(self.checkpoints.run(self._checkpoints_fatal)))
        if self._lease is not None:
            self._tasks.append(loop.create_task(self._keep_lease()))
        self._tasks.append(loop.create_task(self._monitor()))
        if self._stop_when_running:
            await self.stop(self._final_savepoint)
        return self._report

    async def _run_from(self, point: RestorePoint | None) -> None:
        assert self.failover is not None and self.deployment is not None
        restored = await self.failover.run_from(point)
        self._report.restored_checkpoint = restored.manifest.checkpoint_id if restored else None
        if restored is not point:
            self._recovery_point = restored
        self._runs = self.deployment.run_all()

    async def wait(self) -> JobReport:
        assert self._finished is not None, "start() first"
        await self._finished.wait()
        return self._report

    async def watch(self, seen: int) -> tuple[int, list[dict[str, Any]], JobReport | None]:
        """The driver's long poll: once more happened than its ``seen`` count, this
        coordinator's recoveries and the count (with the final report once the job ended).

        The driver holds every recovery as soon as it is recorded, so a coordinator
        that dies afterwards takes none with it (``JobResult.recoveries`` lists them).
        """
        assert self._finished is not None and self._news is not None, "start() first"
        while self._version <= seen and not self._finished.is_set():
            self._news.clear()
            await self._news.wait()
        report = self._report if self._finished.is_set() else None
        return self._version, [dict(r) for r in self._report.recoveries], report

    def _announce(self) -> None:
        """Something the driver's ``watch`` waits for happened."""
        self._version += 1
        if self._news is not None:
            self._news.set()

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

    async def recoveries(self) -> list[dict[str, Any]]:
        return list(self._report.recoveries)

    async def telemetry(self, since: int) -> dict[str, Any]:
        """Everything the driver exports, in one call: metrics, figures, new events."""
        return {
            "status": self._status.value,
            "metrics": await self.metrics(),
            "checkpoints": self.checkpoints.stats() if self.checkpoints else None,
            "restarts": len(self._report.recoveries),
            "events": [e for e in self._events if e["seq"] > since],
            "alerts": await self.alerts_active(),
        }

    async def alerts_active(self) -> list[dict[str, Any]]:
        return self.alerts.active() if not self._status.terminal else list(self._report.alerts)

    async def _monitor(self) -> None:
        """Read the metrics now and then: alerts fire and clear, the auto interval follows."""
        while True:
            await asyncio.sleep(MONITOR_S)
            if self._status not in (JobStatus.RUNNING, JobStatus.STOPPING):
                continue
            try:
                metrics = await self._deployed.metrics(timeout_s=2.0)
            except Exception as exc:  # a restart under way: next time
                log.debug("job %s: metrics for the alerts failed: %s", self.job, exc)
                continue
            stats = self.checkpoints.stats() if self.checkpoints else None
            for change, alert in self.alerts.observe(time.time(), metrics, stats):
                if change == "fired":
                    log.warning("job %s: alert %s: %s", self.job, alert.kind, alert.message)
                else:
                    log.info("job %s: alert %s cleared: %s", self.job, alert.kind, alert.message)
            self.ray_metrics.update(metrics, self.alerts.active())
            if self.checkpoints is not None:
                busy = [
                    (e.get("busy_ms_per_s") or 0.0) / 1000.0
                    for entries in metrics.values()
                    for e in entries
                    if "inflight_records" in e  # one entry per actor: its stage's head
                ]
                if busy:
                    self.checkpoints.load(max(busy))

    def _event(self, record: dict[str, Any]) -> None:
        self._event_seq += 1
        self._events.append({**record, "seq": self._event_seq})
        self.ray_metrics.finished(record)
        del self._events[:-1000]
        self._report.events = list(self._events)

    async def stop(self, savepoint: str | None = None) -> None:
        """Graceful stop: sources stop; with checkpoints a final one (after a savepoint) commits."""
        if savepoint is not None:
            # Refuse a bad location now, while the caller can still choose another.
            await asyncio.to_thread(check_savepoint_location, savepoint)
        self._final_savepoint = savepoint
        if self._status is JobStatus.STARTING:
            self._stop_when_running = True
            return
        self._stopping = True
        if self._status is JobStatus.RUNNING:
            self._set_status(JobStatus.STOPPING)
            await self._deployed.stop_sources()
        # While RECOVERING, the recovery stops the new sources when it is done.

    async def shutdown(self) -> None:
        """Kill whatever is left (the driver calls this once it has the result)."""
        for task in [*self._tasks, *([self._final_task] if self._final_task else [])]:
            task.cancel()
        if self.checkpoints is not None:
            self.checkpoints.close()
        if self.deployment is not None:
            self.deployment.kill()

    # -- fault injection (rf.testing) --------------------------------------------

    async def arm_fault(self, fault: Fault) -> int:
        return self.faults.arm(fault)

    async def disarm_fault(self, fault_id: int) -> bool:
        return self.faults.disarm(fault_id)

    async def fired_faults(self) -> list[dict[str, Any]]:
        return list(self.faults.fired)

    def _kill_actor(self, name: str) -> None:
        self._deployed.kill_by_name(name)

    # -- the lease -----------------------------------------------------------------

    async def _claim_lease(self) -> None:
        """Record this coordinator in the lease and renew it once, before deploying."""
        lease = self._lease
        if lease is None or self._checkpointing is None:
            return
        lease.holder = {
            **lease.holder,
            "coordinator_actor_id": ray.get_runtime_context().get_actor_id(),
        }
        await asyncio.to_thread(leases.renew, open_storage(self._checkpointing.storage), lease)

    async def _keep_lease(self) -> None:
        lease = self._lease
        assert lease is not None and self._checkpointing is not None
        # Tried once per renewal: this loop asks again every few seconds itself.
        storage = open_storage(self._checkpointing.storage).fail_fast()
        pause = lease.ttl_s / 3
        while True:
            await asyncio.sleep(pause)
            try:
                await asyncio.to_thread(leases.renew, storage, lease)
                # Due a third of the lease after this renewal *began* (its time is the
                # lease's): one that took long, its calls retried while the storage was
                # away, left a lease too old to commit under, renewed again at once.
                pause = max(0.0, lease.renewed_at + lease.ttl_s / 3 - time.time())
            except leases.LeaseLost as exc:
                self._fenced = True
                self._fatal.append(Failure(kind="checkpoint", message=str(exc)))
                assert self._wake is not None
                self._wake.set()
                return
            except (StorageError, OSError) as exc:
                log.warning("job %s: renewing the lease failed (will retry): %s", self.job, exc)
                pause = max(0.2, lease.ttl_s / 10)

    async def _release_lease(self) -> None:
        if self._lease is None or self._checkpointing is None or self._fenced:
            return
        storage = open_storage(self._checkpointing.storage)
        await asyncio.to_thread(leases.release, storage, self._lease)

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

    def _checkpoint_completed(self, manifest: Manifest) -> None:
        if manifest.kind == CHECKPOINT and manifest.checkpoint_id > self._partial_checkpoint_floor:
            self._partial_since_point = False
        if manifest.kind == CHECKPOINT and self._checkpointing is not None:
            self._recovery_point = RestorePoint(
                normalize_uri(self._checkpointing.storage), manifest
            )
            self._restarts.stable()

    async def acknowledge(self, checkpoint_id: int, key: ActorKey, snapshot: Any) -> str:
        if self.checkpoints is None:
            return "unknown"
        return self.checkpoints.acknowledge(checkpoint_id, _key(key), snapshot).value

    async def decline(self, checkpoint_id: int, key: ActorKey, reason: str) -> None:
        if self.checkpoints is not None:
            self.checkpoints.decline(checkpoint_id, _key(key), reason)

    async def source_done(self, key: ActorKey, epoch: int) -> None:
        """A source read everything (or was stopped); end the job once all have."""
        # Judged by its epoch, not by the status: a message of this epoch that comes while
        # a recovery is being decided is kept (rule P7); a global restart clears them all.
        if self._global_under_way or epoch != self._deployed.epoch:
            return  # a message from before a restart
        self._sources_done.add(_key(key))
        if self._final_task is not None or set(self._deployed.source_keys()) - self._sources_done:
            return
        self._final_task = asyncio.get_running_loop().create_task(self._final_checkpoint())

    async def _final_checkpoint(self) -> None:
        """A savepoint first if the stop asked for one (it commits nothing), then the
        final checkpoint, which commits everything: the savepoint and the final
        checkpoint cover the same records, since the sources stopped before both."""
        assert self.checkpoints is not None
        location = self._final_savepoint
        if location is not None and self._report.savepoint is None:
            # stop() checked that the location was empty: what is there now is ours.
            saved = await self._until_done(SAVEPOINT, location)
            self._final_savepoint_id = saved.checkpoint_id
            self._report.savepoint = location
        manifest = await self._until_done(CHECKPOINT, None)
        self._report.final_checkpoint = manifest.checkpoint_id
        await self._deployed.finish_sources()

    async def _until_done(self, kind: str, location: str | None) -> Manifest:
        assert self.checkpoints is not None
        while True:
            try:
                return await self.checkpoints.trigger(
                    kind, location, final=True, check_location=False
                )
            except CheckpointFailed as exc:
                log.warning("job %s: final %s failed, retrying: %s", self.job, kind, exc)
                await asyncio.sleep(FINAL_RETRY_S)

    def _checkpoints_fatal(self, reasons: list[str]) -> None:
        self._fatal.append(Failure(kind="checkpoint", message=reasons[-1]))
        assert self._wake is not None
        self._wake.set()

    # -- supervision ---------------------------------------------------------

    async def _supervise(self) -> None:
        failures = await self._watch()
        while failures:
            root = order_failures(failures)[0]
            delay = None if self._fatal else self._restarts.failed(time.time(), root)
            if delay is None:
                await self._fail(failures)
                return
            log.warning("job %s: restarting in %.1f s after: %s", self.job, delay, root.describe())
            try:
                await self._recover(failures, delay)
            except Exception as exc:
                # A failed recovery is a failure too: the strategy decides on another try.
                log.error("job %s: recovery failed: %s", self.job, exc)
                failures = [_startup_failure(exc, "the recovery failed")]
                continue
            failures = await self._watch()
        if self.checkpoints is not None:
            self.checkpoints.close()
            await self.checkpoints.wait_idle()
        self._report.metrics = await self._deployed.metrics()
        self._deployed.kill()
        await self._release_lease()
        self._end(JobStatus.STOPPED if self._stopping else JobStatus.FINISHED, [])

    async def _watch(self) -> list[Failure]:
        """Wait until every operator ended (returns []) or something failed."""
        assert self._wake is not None
        pending = {fut: key for key, fut in self._runs.items()}
        failures: list[Failure] = []
        while pending and not failures and not self._fatal:
            wake = asyncio.ensure_future(self._wake.wait())
            done, _ = await asyncio.wait([*pending, wake], return_when=asyncio.FIRST_COMPLETED)
            wake.cancel()
            self._wake.clear()
            failures.extend(self._collect({f for f in done if f in pending}, pending))
        if self._fatal:
            return [*self._fatal, *failures]
        if failures and pending:
            # Give the other actors a moment to report, then pick the root cause.
            done, _ = await asyncio.wait(pending, timeout=FAILURE_GRACE_S)
            failures.extend(self._collect(done, pending))
        return failures

    async def _fail(self, failures: list[Failure]) -> None:
        if self.checkpoints is not None:
            self.checkpoints.close()
            await self.checkpoints.wait_idle()
        self._report.metrics = await self._deployed.metrics(timeout_s=2.0)
        self._deployed.kill()
        await self._release_lease()
        history = [f for _, f in self._restarts.history]
        ordered = order_failures(failures)
        if len(history) > 1:
            # Giving up after restarts: list every failure that led here.
            earlier = [
                Failure(
                    kind=f.kind,
                    message=f"(an earlier failure) {f.message}",
                    step=f.step,
                    partition=f.partition,
                    record=f.record,
                )
                for f in history[:-1]
            ]
            summary = Failure(kind="system", message=self._restarts.give_up_message())
            ordered = [ordered[0], summary, *earlier, *ordered[1:]]
        self._end(JobStatus.FAILED, ordered)

    async def _recover(self, failures: list[Failure], delay: float) -> None:
        assert self.failover is not None
        self._set_status(JobStatus.RECOVERING)
        why_global = await self._recover_partially(failures, delay)
        if why_global is None:
            return
        # Every task starts over in a new epoch: what the sources said is void from here.
        self._global_under_way = True
        try:
            await self._recover_globally(failures, delay, why_global)
        finally:
            self._global_under_way = False

    async def _recover_globally(
        self, failures: list[Failure], delay: float, why_global: str = ""
    ) -> None:
        assert self.failover is not None
        # Step 1. Forget the end game, then quiesce: the recovery point is read only
        # once no manifest write is in flight (docs/protocol.md, rule R1).
        if self._final_task is not None:
            self._final_task.cancel()
            self._final_task = None
        if self.checkpoints is not None:
            await self.checkpoints.quiesce()
        self._sources_done.clear()
        point = self._recovery_point
        restored_id = point.manifest.checkpoint_id if point else 0
        if self._final_savepoint is not None and not (
            self._report.savepoint is not None and restored_id > self._final_savepoint_id
        ):
            # A stop's savepoint must cover what the job committed (R2). Going back
            # to a checkpoint before it, the job will commit less: take it again.
            # (Going back to the final checkpoint after it changes nothing.)
            self._report.savepoint = None
            await asyncio.to_thread(clear_savepoint, self._final_savepoint)
        record, phases, restored = await self.failover.recover(failures, delay, point)
        # The tasks of the new epoch run: what they say counts (older epochs' does not).
        self._global_under_way = False
        if restored is not point:
            self._recovery_point = restored
        self._report.restored_checkpoint = record["restored_checkpoint"]
        if self._stopping:
            # Stopped before they run, not after (rule R16): not one record past the
            # restore point, which may be the final checkpoint after the savepoint.
            await self._deployed.stop_sources()
        self._runs = self._deployed.run_all()
        if self.checkpoints is not None:
            self.checkpoints.resume(restored.manifest if restored else None)
        self._set_status(JobStatus.STOPPING if self._stopping else JobStatus.RUNNING)
        record["cause"] = order_failures(failures)[0].describe()
        if why_global:  # partial recovery was on, and could not be exact here
            record["reason"] = why_global
        self._report.recoveries.append(record)
        self._announce()
        self._tasks.append(
            asyncio.get_running_loop().create_task(self._time_recovery(record, phases))
        )

    async def _recover_partially(self, failures: list[Failure], delay: float) -> str | None:
        """Replace only the dead actors, if that can be exact (Checkpointing.recovery).

        Returns None if it did; else why not ("" when partial recovery is off), and
        the caller restarts globally."""
        assert self.failover is not None and self.deployment is not None
        dep = self.deployment
        if not dep.local_recovery or self.checkpoints is None:
            return ""
        reason = None
        if any(f.kind != "actor_died" or f.step is None for f in failures):
            reason = f"the failure is not an actor's death ({order_failures(failures)[0].kind})"
        elif self._stopping or self._final_task is not None:
            reason = "the job is ending"
        elif self._partial_since_point:
            reason = "a partition was restarted alone since the last completed checkpoint"
        dead: set[ActorKey] = set()
        if reason is None:
            dead = {(str(f.step), int(f.partition or 0)) for f in failures}
            dead = {k for k in dead if k in dep.handles}
            dead |= await dep.unresponsive(PING_TIMEOUT_S)
            if not dead:
                reason = "no actor is gone"
        if reason is None:
            lost = await dep.on_lost_nodes(dead)
            if lost:
                key, node = sorted(lost.items())[0]
                reason = (
                    f"{dep.name(key)} was lost with its node {node[:12]} (what the node "
                    "held, logs and staged output, may be gone with it)"
                )
        aborted_upto = self.checkpoints.next_id - 1
        if reason is None:
            await self.checkpoints.quiesce()
            point = self._recovery_point
            reason = self.failover.local_blocker(dead, point)
        if reason is not None:
            log.info("job %s: recovering globally: %s", self.job, reason)
            return reason
        await asyncio.sleep(delay)
        self._partial_since_point = True
        # A replaced source partition reads again from the checkpoint: its end, if it
        # had said so, is to come again (else the final checkpoint could cut its replay).
        self._sources_done -= dead
        self._partial_checkpoint_floor = aborted_upto
        try:
            record, phases = await self.failover.recover_locally(dead, point, aborted_upto)
        except Exception as exc:
            log.warning(
                "job %s: partial recovery failed (%s: %s); recovering globally",
                self.job,
                type(exc).__name__,
                _first_line(exc),
            )
            return f"the partial recovery failed: {type(exc).__name__}: {_first_line(exc)}"
        if self._stopping:  # a stop that came meanwhile (stop() leaves it to the recovery)
            await self._deployed.stop_sources()  # before the replaced ones run (R16)
        for key in dead:
            self._runs[key] = dep.run_one(key)
        self.checkpoints.resume(point.manifest if point else None)
        self._set_status(JobStatus.STOPPING if self._stopping else JobStatus.RUNNING)
        record["cause"] = order_failures(failures)[0].describe()
        self._report.recoveries.append(record)
        self._announce()
        log.warning(
            "job %s: restarted %s alone from checkpoint %s (%d records resent from logs)",
            self.job,
            ", ".join(record["replaced"]),
            record["restored_checkpoint"],
            record["records_replayed"],
        )
        self._tasks.append(
            asyncio.get_running_loop().create_task(self._time_recovery(record, phases, dead))
        )
        return None

    async def _time_recovery(
        self, record: dict[str, Any], phases: dict[str, float], keys: set[ActorKey] | None = None
    ) -> None:
        """Fill in how long it took from the failure to the first record processed again
        (by the replaced actors, after a partial recovery)."""
        epoch = self._deployed.epoch
        deadline = time.monotonic() + 120
        try:
            while time.monotonic() < deadline and self._deployed.epoch == epoch:
                firsts = await self._deployed.first_data_at(keys)
                if firsts:
                    record["recovered_in_s"] = min(firsts) - record["detected_at"]
                    phases["first_record"] = min(firsts)
                    # Where the time went: each phase's end, in s after the detection.
                    record["phases"] = {
                        name: round(at - record["detected_at"], 3) for name, at in phases.items()
                    }
                    self._announce()
                    return
                await asyncio.sleep(0.02)
        finally:
            self._event(
                {
                    "type": "recovery",
                    "started": record["detected_at"],
                    "ended": max(phases.values()),
                    "phases": phases,
                    "cause": record["cause"],
                    "restored_checkpoint": record["restored_checkpoint"],
                    "records_replayed": record["records_replayed"],
                    "replaced": record["replaced"],
                    "scope": record.get("scope", "global"),
                }
            )

    def _collect(
        self, done: set[asyncio.Future[Any]], pending: dict[asyncio.Future[Any], ActorKey]
    ) -> list[Failure]:
        failures = []
        for fut in done:
            key = pending.pop(fut)
            failure = _outcome_failure(self._deployed.name(key), key, fut)
            if failure is not None and failure.kind != "reset":
                failures.append(failure)
        return failures

    def _set_status(self, status: JobStatus) -> None:
        self._status = status
        self._report.status = status

    def _end(self, status: JobStatus, failures: list[Failure]) -> None:
        if status is not JobStatus.FAILED:
            # Ended well: nothing is stalled or failing any more (a last look clears it).
            self.alerts.observe(
                time.time(), {}, self.checkpoints.stats() if self.checkpoints else None
            )
        self._report.alerts = self.alerts.active()
        self.ray_metrics.update(self._report.metrics, self._report.alerts)
        self._set_status(status)
        self._report.failures = failures
        self._report.ended_at = time.time()
        if self.checkpoints is not None:
            self._report.checkpoints = self.checkpoints.stats()
        if failures:
            log.error("job %s failed: %s", self.job, failures[0].describe())
        assert self._finished is not None
        self._finished.set()
        self._announce()


def _key(key: Any) -> ActorKey:
    return (str(key[0]), int(key[1]))


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


def _startup_failure(exc: BaseException, what: str = "the job could not start") -> Failure:
    cause = exc
    if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
        cause = exc.cause
    return Failure(
        kind="system",
        message=f"{what}: {type(cause).__name__}: {_first_line(cause)}",
        traceback="".join(traceback.format_exception(cause)),
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
