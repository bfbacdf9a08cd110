"""Helpers for tests: an in-memory source and an in-memory, exactly-once sink."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from rayflow._internal import naming
from rayflow.errors import ConfigError
from rayflow.sinks import Sink, SinkContext, SinkWriter
from rayflow.sources import Source, SourceReader

__all__ = [
    "FAULT_ACTIONS",
    "FAULT_POINTS",
    "Chaos",
    "Collect",
    "Discard",
    "Fault",
    "Faults",
    "chaos",
    "fired_faults",
    "from_items",
]

#: Named moments of the checkpoint and recovery protocol where a fault can strike.
#: ``triggered``: barriers injected, snapshots under way; ``before_manifest``:
#: every snapshot acknowledged, no manifest yet; ``after_manifest``: the
#: manifest written, sinks not told; ``after_notify``: sinks told to commit
#: (some may be committing). ``final_*``: the same for the checkpoint a job
#: ends with; ``savepoint_*`` for savepoints; ``during_restore``: a restart
#: is restoring state (sinks set up, operators loading).
FAULT_POINTS = (
    "triggered",
    "before_manifest",
    "after_manifest",
    "after_notify",
    "final_triggered",
    "final_before_manifest",
    "final_after_manifest",
    "final_after_notify",
    "savepoint_triggered",
    "savepoint_before_manifest",
    "savepoint_after_manifest",
    "during_restore",
)
#: ``kill_operator`` kills the operator actor named by ``target`` (any stage,
#: sinks and sources included); ``kill_coordinator`` ends the job's
#: coordinator process; ``kill_driver`` kills the driver process (SIGKILL).
FAULT_ACTIONS = ("kill_operator", "kill_coordinator", "kill_driver")


@dataclass(frozen=True)
class Fault:
    """One fault: at ``point`` (see ``FAULT_POINTS``), do ``action``.

    It fires the ``nth`` time the point is reached (only counting
    checkpoint ``checkpoint_id``, if given), once.
    """

    point: str
    action: str = "kill_operator"
    target: str | None = None
    checkpoint_id: int | None = None
    nth: int = 1


@dataclass(frozen=True)
class Faults:
    """Faults to inject into a job, for tests: ``rf.start(flow, faults=Faults(...))``.

    - ``crash_coordinator_before_manifest``: the coordinator process exits
      once every operator acknowledged that checkpoint, before its manifest
      is written (the snapshots exist; the checkpoint must not).
    - ``at``: any :class:`Fault` s, armed when the job starts.
    - ``record``: a file (on the coordinator's machine) that each fault of
      the job (these, and those :func:`chaos` arms at points) is appended to
      as a JSON line when it fires, before it strikes, so a test can tell
      which fired even after the coordinator died of one (:func:`fired_faults`
      reads it).
    """

    crash_coordinator_before_manifest: int | None = None
    at: tuple[Fault, ...] = ()
    record: str | None = None

    def all(self) -> tuple[Fault, ...]:
        faults = list(self.at)
        if self.crash_coordinator_before_manifest is not None:
            faults.append(
                Fault(
                    "before_manifest",
                    "kill_coordinator",
                    checkpoint_id=self.crash_coordinator_before_manifest,
                )
            )
        return tuple(faults)


def fired_faults(record: str) -> list[Fault]:
    """The faults written to ``Faults(record=...)``, in the order they fired."""
    import json

    try:
        with open(record) as f:
            lines = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []
    # Each line is the fault's fields (asdict) and what the injector adds (id, time).
    names = [f.name for f in fields(Fault)]
    return [Fault(**{name: d[name] for name in names}) for d in lines]


class _Items(Source):
    def __init__(self, chunks: list[list[Any]]):
        self.chunks = chunks

    def partitions(self) -> int:
        return len(self.chunks)

    def open(self, partition: int, offset: Any | None) -> SourceReader:
        return _ItemsReader(self.chunks[partition], int(offset or 0))

    def __repr__(self) -> str:
        return f"from_items({sum(map(len, self.chunks))} items, partitions={len(self.chunks)})"


class _ItemsReader(SourceReader):
    def __init__(self, items: list[Any], offset: int):
        self._items = items
        self._next = offset

    def read(self, max_items: int) -> list[Any] | None:
        if self._next >= len(self._items):
            return None
        out = self._items[self._next : self._next + max_items]
        self._next += len(out)
        return out

    def offset(self) -> int:
        return self._next


def from_items(items: Iterable[Any], *, partitions: int = 1) -> Source:
    """A bounded source over ``items``, split into ``partitions`` contiguous runs.

    Partition ``p`` holds the ``p``-th run of the items in their order, so
    with one partition the records arrive exactly in the given order.
    """
    if not isinstance(partitions, int) or partitions < 1:
        raise ConfigError(f"from_items partitions must be an int >= 1; got {partitions!r}")
    data = list(items)
    size, extra = divmod(len(data), partitions)
    chunks, start = [], 0
    for p in range(partitions):
        end = start + size + (1 if p < extra else 0)
        chunks.append(data[start:end])
        start = end
    return _Items(chunks)


class Collect(Sink):
    """Keeps committed records in memory; read them with ``JobResult.output(step)``.

    Records become visible only when a checkpoint (or, without checkpointing,
    the end of the input) commits them, so the collected output is
    exactly-once like a real transactional sink's.
    """

    #: (collector actor, key of the job start): set on the copy that ``rf.start`` ships.
    _into: tuple[str, str] | None = None

    def open(self, ctx: SinkContext) -> SinkWriter:
        if self._into is None:
            raise ConfigError(
                f"step {ctx.step!r}: rf.testing.Collect() collects only in a job that "
                "rf.run or rf.start runs"
            )
        return _CollectWriter(ctx, *self._into)

    def __repr__(self) -> str:
        return "Collect()"


class _CollectWriter(SinkWriter):
    def __init__(self, ctx: SinkContext, collector: str, key: str):
        self._ctx = ctx
        self._name, self._key = collector, key
        self._pending: list[Any] = []
        self._collector: Any = None

    def write(self, items: list[Any]) -> None:
        self._pending.extend(items)

    def prepare_commit(self, checkpoint_id: int) -> Any:
        staged, self._pending = self._pending, []
        return (self._ctx.partition, self._ctx.run_id, checkpoint_id, staged)

    def commit(self, committable: Any) -> None:
        import ray

        partition, run, checkpoint_id, records = committable
        if self._collector is None:
            self._collector = ray.get_actor(self._name, namespace=naming.NAMESPACE)
        ref = self._collector.commit.remote(
            self._key, self._ctx.step, partition, run, checkpoint_id, records
        )
        # Commits run in a worker thread; wait on the future, not ray.get,
        # which Ray reports as blocking when the process runs an event loop.
        ref.future().result()


class Discard(Sink):
    """Drops every record (for benchmarks and for flows whose metrics are the point)."""

    def open(self, ctx: SinkContext) -> SinkWriter:
        return _DiscardWriter()

    def __repr__(self) -> str:
        return "Discard()"


class _DiscardWriter(SinkWriter):
    def write(self, items: list[Any]) -> None:
        pass


CHAOS_TARGETS = ("operators", "sources", "sinks", "coordinator", "driver")


class Chaos(threading.Thread):
    """Random faults against a running job; see :func:`chaos`.

    ``kills`` lists what was done: ``{"time", "target", "action", "point"}``.
    ``error`` holds an exception the harness itself ran into (re-raised by
    :meth:`check`).
    """

    def __init__(
        self,
        handle: Any,
        *,
        seed: int,
        kills: int,
        targets: Sequence[str],
        points: Sequence[str] | None,
        every_s: float,
        point_timeout_s: float,
    ):
        super().__init__(daemon=True, name=f"rayflow-chaos-{handle.job}")
        self.handle = handle
        self.rng = random.Random(seed)
        self.wanted = kills
        self.targets = tuple(targets)
        self.points = tuple(points) if points else None
        self.every_s = every_s
        self.point_timeout_s = point_timeout_s
        self.kills: list[dict[str, Any]] = []
        self.missed: list[dict[str, Any]] = []  # armed at a point the job never reached
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def stop(self) -> None:
        """Stop injecting faults (a fault armed at a point is disarmed)."""
        self._halt.set()

    def check(self, timeout: float = 30.0) -> Chaos:
        """Wait for the harness to finish and raise what it ran into, if anything."""
        self.join(timeout)
        if self.error is not None:
            raise self.error
        return self

    def run(self) -> None:
        try:
            while len(self.kills) < self.wanted and not self._halt.is_set():
                if self._halt.wait(self.rng.uniform(0.5, 1.5) * self.every_s):
                    return
                status = self.handle.status()
                if status.terminal:
                    return
                if status.value != "RUNNING":
                    continue  # let the last recovery finish first
                kind = self.rng.choice(self.targets)
                point = self.rng.choice(self.points) if self.points else None
                action, target = self._pick(kind)
                if point is None:
                    self._strike(action, target, None)
                else:
                    self._arm_and_wait(point, action, target)
        except BaseException as exc:  # surfaced by check()
            self.error = exc

    def _names(self, kind: str) -> list[str]:
        from rayflow._internal.spec import StepKind

        plan = self.handle.plan
        names: list[str] = []
        for stage in plan.stages:
            kinds = {plan.step(s).kind for s in stage.steps}
            if kind == "sources" and StepKind.SOURCE not in kinds:
                continue
            if kind == "sinks" and StepKind.SINK not in kinds:
                continue
            names.extend(
                naming.operator_actor(self.handle.job, stage.name, p)
                for p in range(stage.parallelism)
            )
        return names

    def _pick(self, kind: str) -> tuple[str, str | None]:
        if kind == "coordinator":
            return "kill_coordinator", None
        if kind == "driver":
            return "kill_driver", None
        names = self._names(kind)
        if not names:
            raise ConfigError(f"chaos: the job has no {kind} to kill")
        return "kill_operator", self.rng.choice(names)

    def _record(self, action: str, target: str | None, point: str | None) -> None:
        self.kills.append({"time": time.time(), "action": action, "target": target, "point": point})

    def _strike(self, action: str, target: str | None, point: str | None) -> None:
        import ray

        self._record(action, target, point)
        if action == "kill_driver":
            os.kill(os.getpid(), signal.SIGKILL)
        name = target if action == "kill_operator" else naming.coordinator_actor(self.handle.job)
        assert name is not None
        try:
            ray.kill(ray.get_actor(name, namespace=naming.NAMESPACE), no_restart=True)
        except ValueError:
            self.kills.pop()  # gone already (a recovery is replacing it)

    def _arm_and_wait(self, point: str, action: str, target: str | None) -> None:
        import ray

        handle = self.handle
        coordinator = handle._coordinator
        fault_id = handle._call("arm_fault", Fault(point, action, target))
        if coordinator is None:  # it was being replaced: the new one was armed
            coordinator = handle._coordinator
        if point == "during_restore":
            # A restore happens after a failure: cause one.
            _, victim = self._pick("operators")
            self._strike("kill_operator", victim, None)
        deadline = time.monotonic() + self.point_timeout_s
        while time.monotonic() < deadline and not self._halt.is_set():
            if handle._coordinator is not coordinator or handle.status().terminal:
                fired = action == "kill_coordinator" or handle.status().terminal
                break
            if coordinator is None:
                time.sleep(0.05)
                continue
            try:
                # Ask the coordinator the fault was armed in. handle._call would wait
                # for a replacement coordinator and ask that one, which never had the
                # fault: a kill that fired would be missed whenever the replacement came
                # after the deadline (the slow restart of tests/chaos/test_protocol.py's
                # during-restore-coordinator).
                listed = ray.get(coordinator.fired_faults.remote(), timeout=10)
                fired = any(f["id"] == fault_id for f in listed)
            except ray.exceptions.GetTimeoutError:
                fired = False
            except Exception:  # RayActorError: the one it was armed in died; a kill struck
                fired = action == "kill_coordinator"
                break
            if fired:
                break
            time.sleep(0.05)
        else:
            fired = False
        if fired:
            self._record(action, target, point)
            return
        with contextlib.suppress(Exception):
            if handle._coordinator is coordinator:
                handle._call("disarm_fault", fault_id)
        self.missed.append({"action": action, "target": target, "point": point})


def chaos(
    handle: Any,
    *,
    seed: int,
    kills: int = 3,
    targets: Sequence[str] = ("operators",),
    points: Sequence[str] | None = None,
    every_s: float = 1.0,
    point_timeout_s: float = 10.0,
) -> Chaos:
    """Inject random faults into a running job; returns the started :class:`Chaos` thread.

    Every ``every_s`` seconds or so (seeded: the same ``seed`` makes the same
    choices), while the job is RUNNING, it picks a target from ``targets``
    (``"operators"``, ``"sources"``, ``"sinks"``, ``"coordinator"``,
    ``"driver"``) and kills it, ``kills`` times in all. With ``points`` (names
    from ``FAULT_POINTS``), each kill strikes at one of those protocol points
    instead of at a random moment: it is armed in the coordinator and fires
    when the job gets there (within ``point_timeout_s``, else it is dropped
    and listed in ``missed``). ``"during_restore"`` kills an operator to cause a
    restore: under ``Checkpointing(recovery="partial")`` it may restart alone,
    which restores nothing, and the point is missed; ``recovery="global"``
    reaches it. Killing the driver kills this process: use it
    from a driver process of its own and resume the job from another.
    """
    unknown = sorted(set(targets) - set(CHAOS_TARGETS))
    if unknown or not targets:
        raise ConfigError(f"chaos targets must be some of {CHAOS_TARGETS}; got {list(targets)}")
    for point in points or ():
        if point not in FAULT_POINTS:
            raise ConfigError(f"chaos point {point!r} is not one of {FAULT_POINTS}")
    if not isinstance(kills, int) or kills < 0:
        raise ConfigError(f"chaos kills must be an int >= 0; got {kills!r}")
    if handle.checkpointing is None:
        raise ConfigError("chaos needs a job with checkpointing: without it a kill fails the job")
    harness = Chaos(
        handle,
        seed=seed,
        kills=kills,
        targets=targets,
        points=points,
        every_s=every_s,
        point_timeout_s=point_timeout_s,
    )
    harness.start()
    return harness
