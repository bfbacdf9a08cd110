"""The checkpoint coordinator: triggers checkpoints and commits them.

It is thin: a :class:`TriggerPolicy` says when, a :class:`PendingCheckpoint`
collects acknowledgements, a :class:`CompletedCheckpointStore` keeps the
retained manifests, a :class:`CheckpointFailureManager` counts failures,
and the job's :class:`~rayflow._internal.checkpoint.lease.Lease` says
whether this run may commit at all. It talks to the operators only through
a :class:`Gateway`, so it runs without Ray in unit tests.

One checkpoint, step by step (``docs/protocol.md`` has the whole protocol):

1. Trigger: allocate the next id (ids are never reused); the sources get
   barrier *n* (they record their offsets and send it in-band downstream).
2. Collect: every operator partition snapshots, creates its object (a key
   that names the run, create-if-absent) and acknowledges with key, size and
   sha256, or declines with a reason.
3. Commit: check the lease, then create the manifest (create-if-absent; an
   unknown outcome is read back until known). The manifest is the commit
   point. From the start of this step the checkpoint cannot be abandoned:
   :meth:`quiesce` waits for its outcome.
4. Notify: for a checkpoint (never a savepoint) the recovery point moves to
   *n*, then the sinks of the current epoch publish what they staged up to
   *n* (two-phase commit).
5. Retention: delete what no retained checkpoint needs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from rayflow._internal.checkpoint import lease as leases
from rayflow._internal.checkpoint.failures import CheckpointFailureManager
from rayflow._internal.checkpoint.interval import IntervalChooser
from rayflow._internal.checkpoint.manifest import (
    CHECKPOINT,
    MANIFEST_NAME,
    SAVEPOINT,
    Manifest,
    OperatorSnapshot,
    checkpoint_dir,
    manifest_key,
)
from rayflow._internal.checkpoint.pending import (
    AckOutcome,
    ActorKey,
    FailureReason,
    PendingCheckpoint,
    Phase,
)
from rayflow._internal.checkpoint.policy import TriggerPolicy
from rayflow._internal.checkpoint.snapshot import BarrierInfo
from rayflow._internal.checkpoint.store import CompletedCheckpointStore
from rayflow._internal.storage import StorageError, open_storage
from rayflow._internal.storage.base import create_once
from rayflow.config import Checkpointing
from rayflow.errors import RayflowError

log = logging.getLogger("rayflow")

#: How long the end of a job waits for the final checkpoint's retention pass.
RETENTION_WAIT_S = 60.0
#: Leftovers of killed uploads older than this are deleted by retention.
TEMPORARY_MAX_AGE_S = 600.0
#: While backing off for longer than this, ask the storage this often whether it is back.
PROBE_S = 2.0


class CheckpointFailed(RayflowError):
    """A checkpoint (or savepoint) did not complete; the message says why.

    ``fatal`` failures end the job at once: this run may no longer commit
    (it lost its lease, or another run wrote its manifest), or the outcome
    of a manifest write could not be learned.
    """

    def __init__(self, message: str, *, fatal: bool = False, counts: bool = True):
        super().__init__(message)
        self.fatal = fatal
        self.counts = counts  # against max_consecutive_failures

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_failed, (str(self), self.fatal, self.counts))


def _rebuild_failed(message: str, fatal: bool, counts: bool) -> CheckpointFailed:
    return CheckpointFailed(message, fatal=fatal, counts=counts)


class Gateway(Protocol):
    """What the coordinator needs from the operators."""

    def actor_keys(self) -> list[ActorKey]: ...

    async def trigger_sources(self, barrier: BarrierInfo) -> None: ...

    async def notify_complete(self, checkpoint_id: int, *, wait: bool) -> None: ...


def fault_point(kind: str, final: bool, phase: str) -> str:
    """The name of a protocol point, as fault injection knows it."""
    prefix = "savepoint_" if kind == SAVEPOINT else ("final_" if final else "")
    return prefix + phase


async def _no_fault(point: str, checkpoint_id: int | None) -> None:
    return None


@dataclass
class _Request:
    kind: str
    location: str | None
    final: bool
    future: asyncio.Future[Manifest]


class CheckpointCoordinator:
    def __init__(
        self,
        job: str,
        flow: dict[str, Any],
        config: Checkpointing,
        gateway: Gateway,
        *,
        next_id: int = 1,
        last_completed: Manifest | None = None,
        lease: leases.Lease | None = None,
        run_id: str = "",
    ):
        self.job = job
        self.flow = flow
        self.config = config
        self.gateway = gateway
        self.lease = lease
        self.run_id = run_id or (lease.run_id if lease else "")
        self.storage = open_storage(config.storage)
        self.store = CompletedCheckpointStore(self.storage, job, config.retain)
        if last_completed is not None and last_completed.kind == CHECKPOINT:
            # Resumed in the same storage: keep retaining what the last run retained.
            self.store.recover(last_completed.checkpoint_id)
            if self.store.latest() != last_completed:
                self.store.add(last_completed)
        self.chooser: IntervalChooser | None = None
        if config.interval_s == "auto":
            self.chooser = IntervalChooser(config.max_replay_s, config.max_overhead)
            interval = self.chooser.interval_s
        else:
            interval = float(config.interval_s)
        self.policy = TriggerPolicy(interval, config.min_pause_s)
        self.failures = CheckpointFailureManager(
            config.max_consecutive_failures, config.max_checkpoint_gap_s
        )
        self.next_id = next_id
        # The newest *checkpoint* (not savepoint) of this job's chain.
        self.last_checkpoint_id = last_completed.checkpoint_id if last_completed else 0
        self.pending: PendingCheckpoint | None = None
        self._final_requested = False
        self.periodic = True
        self.suspended = False
        self._requests: deque[_Request] = deque()
        self._wake = asyncio.Event()
        self._done = asyncio.Event()
        self._idle = asyncio.Event()  # set while no checkpoint is in flight
        self._idle.set()
        self._closed = False
        self._gc_task: asyncio.Task[Any] | None = None
        self._gc_wanted = False
        # Hooks for the job coordinator.
        self.on_started: Callable[[int], None] = lambda checkpoint_id: None
        self.on_completed: Callable[[Manifest], None] = lambda manifest: None
        self.on_finished: Callable[[dict[str, Any]], None] = lambda record: None
        self.fault: Callable[[str, int | None], Awaitable[None]] = _no_fault
        self.completed = 0
        self.unaligned_completed = 0  # of them, with in-flight data (unaligned)
        self.last: dict[str, Any] | None = None
        self.last_failure: dict[str, Any] | None = None

    # -- requests --------------------------------------------------------------

    async def trigger(
        self,
        kind: str = CHECKPOINT,
        location: str | None = None,
        *,
        final: bool = False,
        check_location: bool = True,
    ) -> Manifest:
        """Take a checkpoint (or a savepoint at ``location``) now; return its manifest.

        A savepoint's location must be empty (``check_location=False``: the
        caller checked it and owns what is there since).
        """
        if kind == SAVEPOINT:
            assert location is not None
            if check_location:
                await asyncio.to_thread(check_savepoint_location, location)
        if self._closed:
            raise CheckpointFailed("the job is ending", counts=False)
        if self._final_requested and not final:
            # R14: nothing starts after the final checkpoint was asked for; behind it
            # the sources finish and the operators close their sinks.
            raise CheckpointFailed(
                "the job is ending (its final checkpoint is under way)", counts=False
            )
        future: asyncio.Future[Manifest] = asyncio.get_running_loop().create_future()
        self._requests.append(_Request(kind, location, final, future))
        if final:
            self.periodic = False
            self._final_requested = True
        self._wake.set()
        return await future

    def acknowledge(self, checkpoint_id: int, key: ActorKey, snap: OperatorSnapshot) -> AckOutcome:
        pending = self.pending
        if pending is None or pending.checkpoint_id != checkpoint_id:
            return AckOutcome.DISCARDED
        outcome = pending.acknowledge(key, snap)
        if pending.complete:
            self._done.set()
        return outcome

    def decline(self, checkpoint_id: int, key: ActorKey, reason: str) -> None:
        pending = self.pending
        if pending is None or pending.checkpoint_id != checkpoint_id:
            return
        actor = f"rayflow/{self.job}/{key[0]}/{key[1]}"
        pending.fail(
            FailureReason.DECLINED,
            FailureReason.DECLINED.format(id=checkpoint_id, actor=actor, reason=reason),
        )
        self._done.set()

    async def quiesce(self) -> Manifest | None:
        """A restart begins: stop checkpointing and return the recovery point.

        A checkpoint still collecting acknowledgements is abandoned; one whose
        manifest is being written is waited for, since only the outcome of
        that write says which checkpoint the job must go back to. Returns the
        latest completed checkpoint (never a savepoint), or None.
        """
        self.suspended = True
        pending = self.pending
        if pending is not None and pending.abandonable:
            pending.fail(
                FailureReason.RESTARTING, FailureReason.RESTARTING.format(id=pending.checkpoint_id)
            )
            self._done.set()
        while self._requests:
            request = self._requests.popleft()
            if not request.future.done():
                request.future.set_exception(
                    CheckpointFailed("the job is restarting", counts=False)
                )
        await self._idle.wait()
        return self.store.latest()

    def resume(self, restored: Manifest | None) -> None:
        """The job restarted from ``restored``: checkpoints go on from there."""
        if restored is not None and restored.kind == CHECKPOINT:
            self.last_checkpoint_id = restored.checkpoint_id
        self.failures.restarted()
        self.periodic = True
        self._final_requested = False  # the sources run again; they ask for it again
        self.suspended = False
        self.policy.started(time.monotonic())
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        pending = self.pending
        if pending is not None and pending.abandonable:
            pending.fail(
                FailureReason.JOB_ENDING, FailureReason.JOB_ENDING.format(id=pending.checkpoint_id)
            )
            self._done.set()
        while self._requests:
            request = self._requests.popleft()
            if not request.future.done():
                request.future.set_exception(CheckpointFailed("the job is ending", counts=False))

    async def wait_idle(self) -> None:
        """Until no checkpoint is in flight (a manifest write resolves before the job ends)."""
        await self._idle.wait()

    # -- the loop ------------------------------------------------------------

    async def run(self, on_fatal: Callable[[list[str]], None]) -> None:
        """Trigger periodic and requested checkpoints until closed."""
        while not self._closed:
            now = time.monotonic()
            if self.suspended:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._requests:
                request = self._requests.popleft()
                try:
                    manifest = await self._perform(request.kind, request.location, request.final)
                except CheckpointFailed as exc:
                    if not request.future.done():
                        request.future.set_exception(exc)
                    verdict = self._register_failure(exc)
                    if verdict is not None:
                        on_fatal([verdict])
                else:
                    if not request.future.done():
                        request.future.set_result(manifest)
                continue
            due = self.policy.next_due(now)
            if self.periodic and now >= due:
                try:
                    await self._perform(CHECKPOINT, None, False)
                except CheckpointFailed as exc:
                    verdict = self._register_failure(exc)
                    if verdict is not None:
                        on_fatal([verdict])
                continue
            self._wake.clear()
            timeout = max(0.0, due - now) if self.periodic else None
            probing = self.periodic and self.policy.backoff_s > PROBE_S
            if probing:
                timeout = min(timeout or PROBE_S, PROBE_S)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                if probing and await self._storage_answers():
                    # Backing off after failures, and the storage answers again: try now
                    # rather than at the end of a long backoff.
                    self.policy.backoff_s = 0.0

    def _register_failure(self, exc: CheckpointFailed) -> str | None:
        """Count a failure and back off; the reason to fail the job, if it must."""
        reason = str(exc)
        log.warning("job %s: %s", self.job, reason)
        self.last_failure = {"reason": reason, "time": time.time()}
        if exc.fatal:
            return reason
        if self._closed or self.suspended or not exc.counts:
            return None  # given up for a restart or the end: not the storage's fault
        verdict = self.failures.failed(reason)
        self.policy.backoff(self.failures.consecutive, self.config.max_backoff_s)
        return verdict

    async def _perform(self, kind: str, location: str | None, final: bool) -> Manifest:
        checkpoint_id = self.next_id
        self.next_id += 1
        # Only a periodic or requested checkpoint may go unaligned (exactly-once mode).
        may_unalign = kind == CHECKPOINT and not final and self.config.mode != "at_least_once"
        if kind == SAVEPOINT:
            assert location is not None
            # Objects in a folder of the attempt: a failed one is removed whole.
            storage_uri, prefix = location, f"{checkpoint_id:010d}/"
        else:
            storage_uri, prefix = self.config.storage, checkpoint_dir(self.job, checkpoint_id) + "/"
        barrier = BarrierInfo(
            checkpoint_id=checkpoint_id,
            kind=kind,
            storage=storage_uri,
            last_completed=self.last_checkpoint_id,
            object_prefix=prefix,
            run_id=self.run_id,
            triggered_at=time.time(),
            unaligned=may_unalign and self.config.unaligned,
            aligned_timeout_s=self.config.aligned_timeout_s if may_unalign else None,
        )
        pending = PendingCheckpoint(barrier, set(self.gateway.actor_keys()))
        self.pending = pending
        self._idle.clear()
        self._done.clear()
        self.policy.started(time.monotonic())
        self.on_started(checkpoint_id)
        manifest: Manifest | None = None
        try:
            manifest = await self._complete(pending, final)
            return manifest
        except CheckpointFailed:
            if kind == SAVEPOINT and not pending.abandonable and pending.phase < Phase.NOTIFYING:
                raise  # the manifest's outcome is unknown: leave everything as it is
            if kind == SAVEPOINT:
                await asyncio.to_thread(_remove_attempt, storage_uri, prefix)
            raise
        finally:
            pending.phase = Phase.DONE
            self.pending = None
            self._idle.set()
            self.policy.ended(time.monotonic())
            self.on_finished(
                {
                    "type": "checkpoint",
                    "id": checkpoint_id,
                    "kind": kind,
                    "started": pending.started_at,
                    "ended": time.time(),
                    "phases": dict(pending.phases),
                    "outcome": "completed" if manifest is not None else "failed",
                    "reason": pending.failure,
                    "written_bytes": manifest.written_bytes if manifest else None,
                    "state_bytes": manifest.state_bytes if manifest else None,
                }
            )

    async def _complete(self, pending: PendingCheckpoint, final: bool) -> Manifest:
        cid = pending.checkpoint_id
        kind = pending.barrier.kind
        # Step 1. Trigger the sources.
        try:
            await self.gateway.trigger_sources(pending.barrier)
            pending.phases["triggered"] = time.time()
        except Exception as exc:
            pending.fail(
                FailureReason.TRIGGER_FAILED,
                FailureReason.TRIGGER_FAILED.format(id=cid, reason=f"{type(exc).__name__}: {exc}"),
            )
        pending.phase = Phase.ACKNOWLEDGING
        await self.fault(fault_point(kind, final, "triggered"), cid)
        # Step 2. Collect the acknowledgements.
        if pending.failure is None and not pending.complete:
            remaining = self.config.timeout_s - (time.monotonic() - pending.started)
            try:
                await asyncio.wait_for(self._done.wait(), max(0.0, remaining))
            except asyncio.TimeoutError:
                missing = ", ".join(f"{s}/{p}" for s, p in pending.missing[:5])
                pending.fail(
                    FailureReason.TIMEOUT,
                    FailureReason.TIMEOUT.format(
                        id=cid, timeout=self.config.timeout_s, missing=missing
                    ),
                )
        if pending.failure is None:
            await self.fault(fault_point(kind, final, "before_manifest"), cid)
        # The last moment at which the checkpoint may be abandoned: decided
        # here, in one step with no await, against quiesce() and close().
        if pending.failure is not None:
            raise CheckpointFailed(pending.failure)
        pending.phase = Phase.COMMITTING
        pending.phases["acknowledged"] = time.time()
        # Step 3. Commit: check the lease, create the manifest.
        manifest = Manifest(
            job=self.job,
            checkpoint_id=cid,
            kind=kind,
            created_at=time.time(),
            duration_ms=(time.monotonic() - pending.started) * 1000.0,
            flow=self.flow,
            operators=tuple(pending.acks[k] for k in sorted(pending.acks)),
            run_id=self.run_id,
        )
        await self._write_manifest(manifest, pending)
        pending.phases["manifest_written"] = time.time()
        # Step 4. The recovery point moves, then sinks publish what it covers.
        pending.phase = Phase.NOTIFYING
        if kind == CHECKPOINT:
            self.last_checkpoint_id = cid
        self.store.add(manifest)
        self.failures.succeeded()
        self.policy.backoff(0, self.config.max_backoff_s)
        if self.chooser is not None and kind == CHECKPOINT:
            self.policy.interval_s = self.chooser.checkpoint_took(manifest.duration_ms / 1000.0)
        self.on_completed(manifest)
        self.completed += 1
        unaligned = any(op.inflight for op in manifest.operators)
        self.unaligned_completed += int(unaligned)
        self.last = {
            "id": cid,
            "kind": manifest.kind,
            "unaligned": unaligned,
            "duration_ms": manifest.duration_ms,
            "written_bytes": manifest.written_bytes,
            "state_bytes": manifest.state_bytes,
            "time": manifest.created_at,
        }
        await self.fault(fault_point(kind, final, "after_manifest"), cid)
        if kind == CHECKPOINT:
            # A savepoint commits nothing: what sinks staged for it stays staged
            # and is committed by the next checkpoint (docs/protocol.md, S2).
            try:
                await self.gateway.notify_complete(cid, wait=final)
            except Exception as exc:  # the checkpoint stands; a restore re-issues commits
                log.warning("job %s: notifying checkpoint %d failed: %s", self.job, cid, exc)
            pending.phases["sinks_notified"] = time.time()
            await self.fault(fault_point(kind, final, "after_notify"), cid)
            # Step 5. Retention, in the background. A pass already running goes round
            # once more rather than skip this checkpoint; the final checkpoint's pass
            # ends before the job does, so a stopped job leaves only what it retains.
            self._gc_wanted = True
            if self._gc_task is None or self._gc_task.done():
                self._gc_task = asyncio.get_running_loop().create_task(self._retention())
            if final:
                try:
                    await asyncio.wait_for(asyncio.shield(self._gc_task), RETENTION_WAIT_S)
                except Exception as exc:  # a timeout or a storage error: the next run retries
                    log.warning("job %s: final checkpoint retention: %r", self.job, exc)
        return manifest

    async def _retention(self) -> None:
        while self._gc_wanted:
            self._gc_wanted = False
            await asyncio.to_thread(self._collect_garbage)

    def _collect_garbage(self) -> None:
        self.store.collect_garbage()
        try:
            self.storage.collect_temporaries(
                f"{self.job}/", max(TEMPORARY_MAX_AGE_S, 2 * self.config.timeout_s)
            )
        except (StorageError, OSError) as exc:
            log.debug("job %s: temporaries not collected: %s", self.job, exc)

    async def _write_manifest(self, manifest: Manifest, pending: PendingCheckpoint) -> None:
        cid = manifest.checkpoint_id
        if manifest.kind == SAVEPOINT:
            storage = open_storage(pending.barrier.storage)
            key = MANIFEST_NAME
        else:
            storage, key = self.storage, manifest_key(self.job, cid)
        if self.lease is not None:
            try:
                leases.check_can_commit(self.lease)
            except leases.LeaseExpired as exc:
                raise CheckpointFailed(FailureReason.LEASE.format(id=cid, reason=exc)) from exc
        data = manifest.to_json()
        try:
            # While the storage cannot say whether the manifest was created, keep
            # asking (R6), as long as the job may go without a checkpoint.
            ours = await asyncio.to_thread(
                create_once, storage, key, data, resolve_s=self._resolve_s()
            )
        except StorageError as exc:
            # Every try failed: the manifest may or may not have been created.
            raise CheckpointFailed(
                FailureReason.MANIFEST_UNKNOWN.format(id=cid, reason=exc), fatal=True
            ) from exc
        if not ours:
            raise CheckpointFailed(
                FailureReason.MANIFEST_EXISTS.format(id=cid, where=storage.describe(key)),
                fatal=True,
            )

    def load(self, busy_fraction: float) -> None:
        """The busiest step's busy share, for the automatic interval."""
        if self.chooser is not None:
            self.policy.interval_s = self.chooser.load(busy_fraction)

    async def _storage_answers(self) -> bool:
        """A cheap question to the checkpoint storage: is it back?"""
        try:
            await asyncio.to_thread(self.storage.fail_fast().list, leases.lease_prefix(self.job))
        except (StorageError, OSError):
            return False
        return True

    def _resolve_s(self) -> float:
        gap = self.config.max_checkpoint_gap_s
        return max(10.0, self.config.timeout_s, gap if gap is not None else 3600.0)

    # -- observation -----------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "completed": self.completed,
            "unaligned_completed": self.unaligned_completed,
            "failed": self.failures.total,
            "consecutive_failures": self.failures.consecutive,
            "seconds_since_completed": time.monotonic() - self.failures.last_success,
            "backoff_s": self.policy.backoff_s,
            "in_progress": self.pending.checkpoint_id if self.pending else None,
            "last": self.last,
            "last_failure": self.last_failure,
            "storage": self.config.storage,
            "run_id": self.run_id,
            "next_id": self.next_id,
            "interval_s": self.policy.interval_s,
            "interval_auto": self.chooser is not None,
            "interval_bound": self.chooser.bound if self.chooser is not None else "configured",
        }


def check_savepoint_location(location: str) -> None:
    """A savepoint goes into an empty place only: its objects are never overwritten."""
    storage = open_storage(location)
    try:
        existing = storage.list("")
    except StorageError as exc:
        raise CheckpointFailed(f"savepoint location {location} cannot be read: {exc}") from exc
    if existing:
        raise CheckpointFailed(
            f"savepoint location {location} is not empty (it holds {len(existing)} "
            f"object(s), e.g. {existing[0]!r}); a savepoint needs a new, empty path so that "
            "no earlier savepoint is overwritten",
            counts=False,
        )


def _remove_attempt(location: str, prefix: str) -> None:
    """Delete the objects of a failed savepoint attempt (best effort)."""
    try:
        storage = open_storage(location)
        storage.delete(storage.list(prefix))
    except StorageError as exc:
        log.debug("objects of a failed savepoint in %s not removed: %s", location, exc)


def clear_savepoint(location: str) -> None:
    """Delete everything in a savepoint location that this job alone wrote to."""
    storage = open_storage(location)
    keys = storage.list("")
    # The manifest first: from that moment the savepoint does not exist.
    storage.delete([k for k in keys if k == MANIFEST_NAME])
    storage.delete([k for k in keys if k != MANIFEST_NAME])
