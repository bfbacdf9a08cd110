"""Helpers for tests: an in-memory source and an in-memory, exactly-once sink."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from rayflow._internal import naming
from rayflow.errors import ConfigError
from rayflow.sinks import Sink, SinkContext, SinkWriter
from rayflow.sources import Source, SourceReader

__all__ = ["Collect", "Discard", "Faults", "from_items"]


@dataclass(frozen=True)
class Faults:
    """Faults to inject into a job, for tests: ``rf.start(flow, faults=Faults(...))``.

    - ``crash_coordinator_before_manifest``: the coordinator process exits
      once every operator acknowledged that checkpoint, before its manifest
      is written (the snapshots exist; the checkpoint must not).
    """

    crash_coordinator_before_manifest: int | None = None


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

    def open(self, ctx: SinkContext) -> SinkWriter:
        return _CollectWriter(ctx)

    def __repr__(self) -> str:
        return "Collect()"


class _CollectWriter(SinkWriter):
    def __init__(self, ctx: SinkContext):
        self._ctx = ctx
        self._pending: list[Any] = []
        self._collector: Any = None

    def write(self, items: list[Any]) -> None:
        self._pending.extend(items)

    def prepare_commit(self, checkpoint_id: int) -> Any:
        staged, self._pending = self._pending, []
        return (self._ctx.partition, checkpoint_id, staged)

    def commit(self, committable: Any) -> None:
        import ray

        partition, checkpoint_id, records = committable
        if self._collector is None:
            self._collector = ray.get_actor(
                naming.collector_actor(self._ctx.job), namespace=naming.NAMESPACE
            )
        ref = self._collector.commit.remote(self._ctx.step, partition, checkpoint_id, records)
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
