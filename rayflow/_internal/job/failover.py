"""Putting the job in the state of a checkpoint and running it: at start and after failures.

Recovery, step by step (global failover: every operator goes back to the
checkpoint, since records may have crossed every channel since):

1. Quiesce: no new checkpoint; one still collecting acknowledgements is
   abandoned, one whose manifest is being written is waited for. Only then
   is the recovery point read: it is the latest *completed checkpoint* (a
   savepoint never is one, since it commits nothing).
2. A new epoch: batches and commit notifications of the old one are
   dropped wherever they arrive.
3. Reset the living operators (a fresh task of the new epoch; commits in
   flight finish first, queued ones are dropped) and replace the dead ones,
   same names, from the plan.
4. Sinks set up for the recovery point (dropping what was staged after it);
   every operator restores its share (state, source offsets) and the sinks
   re-issue the commits the checkpoint covers (commit is idempotent).
5. Reconnect the channels and run; checkpoints resume, with ids above
   every id used before (ids are never reused).

Partial recovery (:meth:`Failover.recover_locally`; docs/protocol.md, "Local
recovery") replaces only the dead actors while the others keep running:
checkpoints in flight are aborted, each dead partition's receivers drop
what it sent and they did not take (and hand back its causal log), the new
actor restores its own snapshot and channel positions, and its senders
resend from their logs what they sent after the checkpoint.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from rayflow._internal.checkpoint.coordinator import CheckpointCoordinator
from rayflow._internal.checkpoint.restore import RestorePoint, assign
from rayflow._internal.checkpoint.snapshot import CorruptSnapshot
from rayflow._internal.job.deployment import ActorKey, Deployment
from rayflow._internal.plan import Plan
from rayflow._internal.runtime.causal import order_since
from rayflow._internal.spec import StepKind
from rayflow._internal.storage.base import ObjectNotFound, StorageError
from rayflow.config import Checkpointing
from rayflow.errors import Failure
from rayflow.sinks import Sink, TransientSinkError

log = logging.getLogger("rayflow")

#: An actor that does not answer a ping this fast during a recovery is replaced.
PING_TIMEOUT_S = 1.0

FaultHook = Callable[[str, int | None], Awaitable[None]]


class Failover:
    def __init__(
        self,
        job: str,
        plan: Plan,
        deployment: Deployment,
        *,
        checkpointing: Checkpointing | None,
        checkpoints: CheckpointCoordinator | None,
        run_id: str,
        coordinator_handle: Any,
        fault: FaultHook,
        startup_timeout_s: float,
    ):
        self.job = job
        self.plan = plan
        self.deployment = deployment
        self.checkpointing = checkpointing
        self.checkpoints = checkpoints
        self.run_id = run_id
        self._handle = coordinator_handle
        self._fault = fault
        self._startup_timeout_s = startup_timeout_s

    async def run_from(self, point: RestorePoint | None) -> RestorePoint | None:
        """Sinks set up, operators restore ``point`` (if any), connect and run.

        If an object of ``point`` is missing or fails its checksum, the
        previous retained checkpoint is used instead (with a warning: output
        that sinks committed after it may then appear twice). Returns the
        point actually restored.
        """
        dep = self.deployment
        candidates = [point]
        if point is not None and self.checkpoints is not None:
            candidates.extend(
                RestorePoint(point.storage, m)
                for m in reversed(self.checkpoints.store.retained())
                if m.checkpoint_id < point.manifest.checkpoint_id
            )
        candidate = point
        for i, candidate in enumerate(candidates):
            try:
                await self._restore_when_reachable(candidate)
                break
            except Exception as exc:
                if i + 1 == len(candidates) or not _unusable_checkpoint(exc):
                    raise
                assert candidate is not None
                nxt = candidates[i + 1]
                assert nxt is not None
                log.warning(
                    "job %s: checkpoint %d cannot be restored (%s); falling back to "
                    "checkpoint %d (output committed after it may repeat)",
                    self.job,
                    candidate.manifest.checkpoint_id,
                    _first_line(exc),
                    nxt.manifest.checkpoint_id,
                )
                # Start the operators over from a clean slate before the next try.
                dep.epoch += 1
                await dep.reset(list(dep.handles), None)
        await dep.connect(self._handle)
        return candidate

    async def _restore_when_reachable(self, point: RestorePoint | None) -> None:
        """Restore ``point``; while the storage (or a sink's destination) cannot be
        reached, start over with backoff, for as long as the job may go without a
        checkpoint (an outage is not a new failure each time)."""
        gap = self.checkpointing.max_checkpoint_gap_s if self.checkpointing else None
        deadline = time.monotonic() + (gap if gap is not None else 3600.0)
        pause = 0.5
        while True:
            try:
                await self._restore(point)
                return
            except Exception as exc:
                if not _unreachable(exc) or time.monotonic() + pause > deadline:
                    raise
                log.warning(
                    "job %s: restoring waits for the storage (%s); trying again in %.1f s",
                    self.job,
                    _first_line(exc),
                    pause,
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 10.0)
            dep = self.deployment
            dep.epoch += 1  # start the operators over before the next try
            await dep.reset(list(dep.handles), None)

    async def _restore(self, point: RestorePoint | None) -> None:
        restored_id = point.manifest.checkpoint_id if point else None
        for step in self.plan.flow.steps:
            if step.kind is StepKind.SINK:
                await asyncio.to_thread(
                    setup_sink, step.connector, self.job, step.name, self.run_id, restored_id
                )
        await self._fault("during_restore", restored_id)
        if point is not None:
            cp = self.checkpointing
            await self.deployment.restore(
                assign(self.plan, point, continue_in=cp.storage if cp else None)
            )

    async def recover(
        self, failures: list[Failure], delay: float, point: RestorePoint | None
    ) -> tuple[dict[str, Any], dict[str, float], RestorePoint | None]:
        """Steps 2-5 of a recovery to ``point`` (step 1 is the caller's: it owns the
        recovery point). Returns the recovery record, its phase times and the
        point actually restored."""
        detected = time.time()
        dep = self.deployment
        restore_to = point.manifest.checkpoint_id if point else None
        await asyncio.sleep(delay)
        phases = {"backoff": time.time()}
        # Step 2 and 3. A new epoch; reset the living, replace the dead.
        dead: set[ActorKey] = {
            (f.step, f.partition)
            for f in failures
            if f.kind == "actor_died" and f.step is not None and f.partition is not None
        }
        dead = {k for k in dead if k in dep.handles} | await dep.unresponsive(PING_TIMEOUT_S)
        dep.epoch += 1
        dep.gens.clear()  # a new epoch: every channel starts afresh
        replayed = 0
        results = await dep.reset([k for k in dep.handles if k not in dead], restore_to)
        for key, result in results.items():
            if isinstance(result, BaseException):
                dead.add(key)
            else:
                replayed += result
        phases["reset_living"] = time.time()
        dep.kill(dead)
        await dep.replace(sorted(dead))
        await dep.wait_ready(self._startup_timeout_s, dead)
        phases["replaced_dead"] = time.time()
        # Steps 4 and 5. Restore the checkpoint, reconnect, run.
        restored = await self.run_from(point)
        phases["restored_and_running"] = time.time()
        record = self._record(detected, "global", dead, restored, replayed)
        return record, phases, restored

    def _record(
        self,
        detected: float,
        scope: str,
        dead: set[ActorKey],
        restored: RestorePoint | None,
        replayed: int,
    ) -> dict[str, Any]:
        """A recovery's entry in ``handle.recoveries()`` (recovered_in_s comes later)."""
        return {
            "detected_at": detected,
            "scope": scope,
            "replaced": sorted(self.deployment.name(k) for k in dead),
            "restored_checkpoint": restored.manifest.checkpoint_id if restored else None,
            "records_replayed": replayed,
            "recovered_in_s": None,
        }

    def local_blocker(self, dead: set[ActorKey], point: RestorePoint | None) -> str | None:
        """Why the loss of ``dead`` cannot be recovered partially (None: it can)."""
        dep = self.deployment
        if not dep.local_recovery:
            return "partial recovery is off"
        for key in dead:
            head = self.plan.step(self.plan.stage(key[0]).steps[0])
            if head.kind is StepKind.SOURCE and not head.connector.replays_in_order:
                return (
                    f"{dep.name(key)} reads {head.connector!r}, which does not read the same "
                    "records in the same order again (rule P6)"
                )
            cut = cut_dependent(self.plan, key[0])
            if cut is not None:
                return f"{dep.name(key)} {cut}, which a restart does not repeat (rule P6)"
            neighbours = {s for _, _, s in dep.senders_of(key)}
            neighbours |= {r for _, _, r in dep.receivers_of(key)}
            lost = sorted(neighbours & dead)
            if lost:
                return (
                    f"{dep.name(key)} and its neighbour {dep.name(lost[0])} were lost together "
                    "(the log of one is the input of the other)"
                )
            if point is not None:
                snapshot = _snapshot_of(point, key)
                if snapshot is None or snapshot.positions is None:
                    cid = point.manifest.checkpoint_id
                    return f"checkpoint {cid} has no channel positions of {dep.name(key)}"
        return None

    async def recover_locally(
        self, dead: set[ActorKey], point: RestorePoint | None, aborted_upto: int
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """Replace only ``dead``, from ``point``; returns the recovery record and phase times."""
        detected = time.time()
        dep = self.deployment
        restore_to = point.manifest.checkpoint_id if point else 0
        living = [k for k in dep.handles if k not in dead]
        # The new actors take longest (a worker process starts): begin with them.
        dep.kill(dead)
        creating = asyncio.ensure_future(self._replace(dead))
        try:
            # Checkpoints in flight may have passed the dead partitions: given up everywhere.
            await dep.abort_checkpoints(aborted_upto, living)
            phases = {"aborted_checkpoints": time.time()}
            gen = max(dep.gens.values(), default=0) + 1
            resets: list[tuple[ActorKey, Awaitable[dict[Any, Any]]]] = []
            for key in sorted(dead):
                dep.gens[key] = gen
                by_receiver: dict[ActorKey, list[tuple[int, int]]] = {}
                for edge_id, _, receiver in dep.receivers_of(key):
                    by_receiver.setdefault(receiver, []).append((edge_id, key[1]))
                resets.extend(
                    (key, dep.reset_input(receiver, channels, gen))
                    for receiver, channels in by_receiver.items()
                )
            found_logs = await asyncio.gather(*(call for _, call in resets))
            forced: dict[ActorKey, list[Any]] = {key: [] for key in dead}
            for (key, _), logs in zip(resets, found_logs, strict=True):
                for found in logs.values():
                    # The receivers' logs are prefixes of one order: the longest covers all.
                    order = order_since(found, restore_to)
                    if order is not None and len(order) > len(forced[key]):
                        forced[key] = order
            phases["receivers_reset"] = time.time()
            for key in sorted(dead):  # what a dead sink partition staged after the checkpoint
                for name in self.plan.stage(key[0]).steps:
                    step = self.plan.step(name)
                    if step.kind is StepKind.SINK:
                        await asyncio.to_thread(
                            setup_sink,
                            step.connector,
                            self.job,
                            name,
                            self.run_id,
                            restore_to,
                            key[1],
                        )
        finally:
            await creating  # never leave a creation running behind a failure
        phases["replaced_dead"] = time.time()
        assignments: dict[ActorKey, Any] = {}
        if point is not None:
            cp = self.checkpointing
            assignments = assign(self.plan, point, continue_in=cp.storage if cp else None)
        await asyncio.gather(
            *(
                dep.restore_one(
                    key,
                    assignments.get(key),
                    {
                        "positions": (s.positions if (s := _snapshot_of(point, key)) else None),
                        "forced": forced[key],
                        "aborted_upto": aborted_upto,
                    },
                )
                for key in dead
            )
        )
        await dep.connect(self._handle, keys=dead)
        resent = await asyncio.gather(
            *(
                dep.reconnect(sender, edge_id, key, restore_to)
                for key in sorted(dead)
                for edge_id, _, sender in dep.senders_of(key)
            )
        )
        replayed = sum(resent)
        phases["restored_and_running"] = time.time()
        return self._record(detected, "partial", dead, point, replayed), phases

    async def _replace(self, dead: set[ActorKey]) -> None:
        await self.deployment.replace(sorted(dead))
        await self.deployment.wait_ready(self._startup_timeout_s, dead)


def _snapshot_of(point: RestorePoint | None, key: ActorKey) -> Any:
    if point is None:
        return None
    for snapshot in point.manifest.operators:
        if (snapshot.stage, snapshot.partition) == key:
            return snapshot
    return None


def setup_sink(
    sink: Sink,
    job: str,
    step: str,
    run_id: str,
    restored: int | None,
    partition: int | None = None,
) -> None:
    """Call ``sink.setup`` with what its signature takes (older sinks take fewer arguments).

    With ``partition`` (one partition restarted alone), only a sink whose setup
    takes ``partition`` is called: one that does not would clean up after
    every partition, the running ones too (what the dead one staged then
    stays behind, never committed)."""
    params = inspect.signature(sink.setup).parameters
    offered: dict[str, Any] = {"step": step, "run_id": run_id, "restored_checkpoint": restored}
    if partition is not None:
        if "partition" not in params:
            return
        offered["partition"] = partition
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = offered
    else:
        kwargs = {k: v for k, v in offered.items() if k in params}
    sink.setup(job, **kwargs)


def _causes(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    for _ in range(10):  # Ray wraps causes; follow a few links
        if current is None:
            break
        seen.append(current)
        current = getattr(current, "cause", None) or current.__cause__
    return seen


def _unreachable(exc: BaseException) -> bool:
    """A restore that failed because the storage or a sink could not be reached now."""
    for cause in _causes(exc):
        if isinstance(cause, (CorruptSnapshot, ObjectNotFound)):
            return False
        if isinstance(cause, (StorageError, TransientSinkError)):
            return True
    return False


def _unusable_checkpoint(exc: BaseException) -> bool:
    """A restore that failed because the checkpoint's objects are missing or corrupt."""
    seen: BaseException | None = exc
    for _ in range(10):  # Ray wraps causes; follow a few links
        if seen is None:
            break
        if isinstance(seen, (CorruptSnapshot, ObjectNotFound)):
            return True
        seen = getattr(seen, "cause", None) or seen.__cause__
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def cut_dependent(plan: Plan, stage: str) -> str | None:
    """What in ``stage`` emits according to where its input was cut, if anything.

    A partition is restarted alone only if everything it emits is a function of
    the records it takes, in their order (docs/protocol.md, P1 and P6): its
    receivers drop what they consumed by record index. Two kinds of step see
    the cut instead:

    - ``map_batches`` on records: its batches are the partition's slices, cut
      by its cost per record, and it may return any number of rows (a count
      per batch). Chunks of columns are cut alike on a replay: not these.
    - a window or ``process`` step on a ``with_event_time`` of the same stage:
      that watermark moves between reads and slices, so which records are late
      and where windows fire depend on the cut. Fed by another stage's
      watermarks, a step gets them in the logged order: not these.
    - the sender of a window with ``combine=True``: it sends one partial per
      key and window of each slice (eventtime/combine.py).

    Each let a partition restarted alone emit another stream (found
    2026-11-29: tests/chaos/test_map_batches.py, test_event_time_chaos.py).
    """
    kinds = {name: plan.step(name).kind for name in plan.stage(stage).steps}
    for name, kind in kinds.items():
        if kind is StepKind.MAP_BATCHES and name not in plan.chunk_steps:
            return (
                f"runs map_batches step {name!r} on records, whose batches are cut where "
                "the partition's work is sliced"
            )
    for name, kind in kinds.items():
        if kind in (StepKind.WINDOW, StepKind.PROCESS) and plan.event_time_before(name):
            return (
                f"runs {name!r} on a watermark made in its own stage, which moves "
                "between reads and slices"
            )
    for edge_id in plan.stage(stage).outputs:
        edge = plan.edges[edge_id]
        if plan.combines(edge):
            return (
                f"combines its records per slice for window {edge.dst_step!r} (combine=True) "
                "before the shuffle"
            )
    return None
