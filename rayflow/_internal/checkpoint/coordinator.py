"""The checkpoint coordinator: triggers checkpoints and commits them.

It is thin: a :class:`TriggerPolicy` says when, a :class:`PendingCheckpoint`
collects acknowledgements, a :class:`CompletedCheckpointStore` keeps the
retained manifests, a :class:`CheckpointFailureManager` counts failures.
It talks to the operators only through a :class:`Gateway`, so it runs
without Ray in unit tests.

One checkpoint, step by step:

1. Trigger: the sources get barrier *n* (they record their offsets and send
   it in-band downstream).
2. Collect: every operator partition snapshots, uploads its object and
   acknowledges with key, size and sha256 (or declines with a reason).
3. Commit: when all acknowledgements are in, write the manifest with
   create-if-absent. The manifest is the commit point.
4. Notify: sinks publish what they staged for *n* (two-phase commit).
5. Retention: delete what no retained checkpoint needs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from rayflow._internal.checkpoint.failures import CheckpointFailureManager
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
)
from rayflow._internal.checkpoint.policy import TriggerPolicy
from rayflow._internal.checkpoint.snapshot import BarrierInfo
from rayflow._internal.checkpoint.store import CompletedCheckpointStore
from rayflow._internal.storage import StorageError, open_storage
from rayflow.config import Checkpointing
from rayflow.errors import RayflowError

log = logging.getLogger("rayflow")


class CheckpointFailed(RayflowError):
    """A checkpoint (or savepoint) did not complete; the message says why."""


class Gateway(Protocol):
    """What the coordinator needs from the operators."""

    def actor_keys(self) -> list[ActorKey]: ...

    async def trigger_sources(self, barrier: BarrierInfo) -> None: ...

    async def notify_complete(self, checkpoint_id: int, *, wait: bool) -> None: ...


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
        crash_before_manifest: int | None = None,
    ):
        self.job = job
        self.flow = flow
        self.config = config
        self.gateway = gateway
        self.storage = open_storage(config.storage)
        self.store = CompletedCheckpointStore(self.storage, job, config.retain)
        if last_completed is not None and last_completed.kind == CHECKPOINT:
            # Resumed in the same storage: keep retaining what the last run retained.
            self.store.recover(last_completed.checkpoint_id)
            if self.store.latest() != last_completed:
                self.store.add(last_completed)
        self.policy = TriggerPolicy(config.interval_s, config.min_pause_s)
        self.failures = CheckpointFailureManager(config.max_consecutive_failures)
        self.next_id = next_id
        # The newest *checkpoint* (not savepoint) of this job's chain.
        self.last_checkpoint_id = last_completed.checkpoint_id if last_completed else 0
        self.pending: PendingCheckpoint | None = None
        self.periodic = True
        self.suspended = False
        self._requests: deque[_Request] = deque()
        self._wake = asyncio.Event()
        self._done = asyncio.Event()
        self._closed = False
        self._crash_before_manifest = crash_before_manifest
        self._gc_task: asyncio.Task[Any] | None = None
        # Hooks for the job coordinator (recovery bookkeeping).
        self.on_started: Callable[[int], None] = lambda checkpoint_id: None
        self.on_completed: Callable[[Manifest], None] = lambda manifest: None
        self.on_finished: Callable[[dict[str, Any]], None] = lambda record: None
        self.completed = 0
        self.last: dict[str, Any] | None = None
        self.last_failure: dict[str, Any] | None = None

    # -- requests --------------------------------------------------------------

    async def trigger(
        self, kind: str = CHECKPOINT, location: str | None = None, *, final: bool = False
    ) -> Manifest:
        """Take a checkpoint (or a savepoint at ``location``) now; return its manifest."""
        future: asyncio.Future[Manifest] = asyncio.get_running_loop().create_future()
        self._requests.append(_Request(kind, location, final, future))
        if final:
            self.periodic = False
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

    def suspend(self) -> None:
        """A restart begins: give up the checkpoint in flight and trigger none until resumed."""
        self.suspended = True
        pending = self.pending
        if pending is not None:
            pending.fail(
                FailureReason.RESTARTING, FailureReason.RESTARTING.format(id=pending.checkpoint_id)
            )
            self._done.set()
        while self._requests:
            request = self._requests.popleft()
            if not request.future.done():
                request.future.set_exception(CheckpointFailed("the job is restarting"))

    def resume(self, restored: Manifest | None) -> None:
        """The job restarted from ``restored``: checkpoints go on from there."""
        if restored is not None and restored.kind == CHECKPOINT:
            self.last_checkpoint_id = restored.checkpoint_id
        self.periodic = True
        self.suspended = False
        self.policy.started(time.monotonic())
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self.pending is not None:
            pending = self.pending
            pending.fail(
                FailureReason.JOB_ENDING, FailureReason.JOB_ENDING.format(id=pending.checkpoint_id)
            )
            self._done.set()
        while self._requests:
            request = self._requests.popleft()
            if not request.future.done():
                request.future.set_exception(CheckpointFailed("the job is ending"))

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
                    if self._register_failure(str(exc)):
                        on_fatal(list(self.failures.reasons))
                else:
                    if not request.future.done():
                        request.future.set_result(manifest)
                continue
            due = self.policy.next_due(now)
            if self.periodic and now >= due:
                try:
                    await self._perform(CHECKPOINT, None, False)
                except CheckpointFailed as exc:
                    if self._register_failure(str(exc)):
                        on_fatal(list(self.failures.reasons))
                continue
            self._wake.clear()
            timeout = max(0.0, due - now) if self.periodic else None
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    def _register_failure(self, reason: str) -> bool:
        log.warning("job %s: %s", self.job, reason)
        self.last_failure = {"reason": reason, "time": time.time()}
        if self._closed or self.suspended:
            return False  # given up for a restart or the end: not the storage's fault
        return self.failures.failed(reason)

    async def _perform(self, kind: str, location: str | None, final: bool) -> Manifest:
        checkpoint_id = self.next_id
        self.next_id += 1
        if kind == SAVEPOINT:
            assert location is not None
            storage_uri, prefix = location, ""
        else:
            storage_uri, prefix = self.config.storage, checkpoint_dir(self.job, checkpoint_id) + "/"
        barrier = BarrierInfo(
            checkpoint_id=checkpoint_id,
            kind=kind,
            storage=storage_uri,
            last_completed=self.last_checkpoint_id,
            object_prefix=prefix,
        )
        pending = PendingCheckpoint(barrier, set(self.gateway.actor_keys()))
        self.pending = pending
        self._done.clear()
        self.policy.started(time.monotonic())
        self.on_started(checkpoint_id)
        manifest: Manifest | None = None
        try:
            manifest = await self._complete(pending, final)
            return manifest
        finally:
            self.pending = None
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
        # Step 1. Trigger the sources.
        try:
            await self.gateway.trigger_sources(pending.barrier)
            pending.phases["triggered"] = time.time()
        except Exception as exc:
            pending.fail(
                FailureReason.TRIGGER_FAILED,
                FailureReason.TRIGGER_FAILED.format(id=cid, reason=f"{type(exc).__name__}: {exc}"),
            )
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
        if pending.failure is not None:
            raise CheckpointFailed(pending.failure)
        pending.phases["acknowledged"] = time.time()
        # Step 3. Commit: write the manifest, create-if-absent.
        manifest = Manifest(
            job=self.job,
            checkpoint_id=cid,
            kind=pending.barrier.kind,
            created_at=time.time(),
            duration_ms=(time.monotonic() - pending.started) * 1000.0,
            flow=self.flow,
            operators=tuple(pending.acks[k] for k in sorted(pending.acks)),
        )
        if self._crash_before_manifest == cid:
            log.error("fault injection: coordinator of %s exits before manifest %d", self.job, cid)
            os._exit(1)
        await self._write_manifest(manifest, pending)
        pending.phases["manifest_written"] = time.time()
        # Step 4. Sinks publish what this checkpoint covers.
        if manifest.kind == CHECKPOINT:
            self.last_checkpoint_id = cid
        self.store.add(manifest)
        self.failures.succeeded()
        self.on_completed(manifest)
        self.completed += 1
        self.last = {
            "id": cid,
            "kind": manifest.kind,
            "duration_ms": manifest.duration_ms,
            "written_bytes": manifest.written_bytes,
            "state_bytes": manifest.state_bytes,
            "time": manifest.created_at,
        }
        try:
            await self.gateway.notify_complete(cid, wait=final)
        except Exception as exc:  # the checkpoint stands; a restore re-issues commits
            log.warning("job %s: notifying checkpoint %d failed: %s", self.job, cid, exc)
        pending.phases["sinks_notified"] = time.time()
        # Step 5. Retention, in the background.
        if manifest.kind == CHECKPOINT and (self._gc_task is None or self._gc_task.done()):
            self._gc_task = asyncio.get_running_loop().create_task(
                asyncio.to_thread(self.store.collect_garbage)
            )
        return manifest

    async def _write_manifest(self, manifest: Manifest, pending: PendingCheckpoint) -> None:
        cid = manifest.checkpoint_id
        if manifest.kind == SAVEPOINT:
            storage = open_storage(pending.barrier.storage)
            key = MANIFEST_NAME
        else:
            storage, key = self.storage, manifest_key(self.job, cid)
        try:
            created = await asyncio.to_thread(storage.put_if_absent, key, manifest.to_json())
        except StorageError as exc:
            raise CheckpointFailed(
                FailureReason.MANIFEST_FAILED.format(id=cid, reason=exc)
            ) from exc
        if not created:
            raise CheckpointFailed(
                FailureReason.MANIFEST_EXISTS.format(id=cid, where=storage.describe(key))
            )

    # -- observation -----------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "completed": self.completed,
            "failed": self.failures.total,
            "consecutive_failures": self.failures.consecutive,
            "in_progress": self.pending.checkpoint_id if self.pending else None,
            "last": self.last,
            "last_failure": self.last_failure,
            "storage": self.config.storage,
        }
