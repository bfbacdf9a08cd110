"""Snapshot objects: what one operator partition writes for a checkpoint.

An object is ``MAGIC`` followed by a pickle of a dict::

    {"stage", "partition", "checkpoint_id",
     "sources": {step: {source partition: offset}},
     "keyed": {"step", "mode": "full"|"delta", "values": {key: value}, "deleted": [keys]},
     "sinks": {step: [(checkpoint id, committable), ...]}}   # not yet committed

Its sha256 goes into the acknowledgement and the manifest; an object whose
bytes do not match is refused on restore. Objects hold pickles, so a
checkpoint storage must be as trusted as the code that runs the job.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from typing import Any

from rayflow._internal.checkpoint.manifest import ObjectInfo
from rayflow._internal.pickling import dumps_value
from rayflow.errors import RayflowError

MAGIC = b"RFSNAP1\n"

#: Keyed states smaller than this are always snapshotted in full: writing a few
#: thousand keys costs less than tracking every record's key between checkpoints.
INCREMENTAL_MIN_KEYS = 5_000


class CorruptSnapshot(RayflowError):
    """A snapshot object is not what its manifest says (checksum or format)."""


@dataclass(frozen=True)
class BarrierInfo:
    """What travels with a barrier: which checkpoint, what kind, where to write.

    ``last_completed`` is the newest checkpoint that was complete when this
    one was triggered; operators use it to tell which of their earlier
    snapshots became part of the committed chain. ``run_id`` names the run
    (the lease generation): it is part of every object key the run writes.
    """

    checkpoint_id: int
    kind: str  # "checkpoint" or "savepoint"
    storage: str  # where the objects go (the checkpoint storage, or the savepoint folder)
    last_completed: int
    object_prefix: str  # key prefix of the objects of this checkpoint
    run_id: str = ""
    triggered_at: float = 0.0  # wall clock at the sources (for the aligned timeout)
    unaligned: bool = False  # overtakes queued data (set once a task took it unaligned)
    # Aligned barriers turn unaligned once under way this long (None: never). A
    # savepoint or a job's final checkpoint is always aligned: it must cover
    # (and its sinks commit) every record before it.
    aligned_timeout_s: float | None = None

    def object_key(self, stage: str, partition: int) -> str:
        suffix = f"-{self.run_id}" if self.run_id else ""
        return f"{self.object_prefix}{stage}-{partition}{suffix}.snapshot"


def encode(doc: dict[str, Any]) -> bytes:
    return MAGIC + dumps_value(doc)


def encode_with_inflight(state: bytes, inflight: dict[str, Any]) -> bytes:
    """An unaligned snapshot: the state pickled when it was taken (``state``,
    from :func:`dumps_value`), and the in-flight data gathered after."""
    return MAGIC + dumps_value({"snapshot": state, "inflight": inflight})


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode(data: bytes, info: ObjectInfo) -> dict[str, Any]:
    """Check an object against its manifest entry, then load it."""
    if len(data) != info.size or sha256(data) != info.sha256:
        raise CorruptSnapshot(
            f"snapshot {info.key} does not match its manifest (size {len(data)} vs "
            f"{info.size}, sha256 {sha256(data)[:12]}... vs {info.sha256[:12]}...); "
            "it will not be restored"
        )
    if not data.startswith(MAGIC):
        raise CorruptSnapshot(f"snapshot {info.key} is not a rayflow snapshot object")
    doc: dict[str, Any] = pickle.loads(data[len(MAGIC) :])
    if "snapshot" in doc:  # unaligned: the state, then what was in flight
        inner: dict[str, Any] = pickle.loads(doc["snapshot"])
        inner["inflight"] = doc["inflight"]
        return inner
    return doc


class IncrementalTracker:
    """Decides full or delta snapshots of one keyed step and keeps its chain.

    The chain is the list of objects the state needs: a full snapshot and
    the deltas after it. A delta holds every key changed or deleted since the
    last *completed* checkpoint's chain, so a checkpoint that failed (or
    whose outcome is unknown) never leaves a hole. Every ``full_every``-th
    link is a full snapshot, which bounds the chain.
    """

    def __init__(self, full_every: int):
        self.full_every = full_every
        self.committed_chain: list[ObjectInfo] = []
        # checkpoint id -> (its chain once written, the keys changed since the
        # previous snapshot; None if they were not tracked)
        self._pending: dict[int, tuple[list[ObjectInfo] | None, set[Any] | None]] = {}
        self.force_full = True

    def reset(self, chain: list[ObjectInfo] | None) -> None:
        """After a restore: continue ``chain``, or start with a full snapshot."""
        self._pending.clear()
        self.committed_chain = list(chain or [])
        self.force_full = not chain

    def take(
        self,
        checkpoint_id: int,
        last_completed: int,
        values: dict[Any, Any],
        changed: set[Any] | None,
    ) -> dict[str, Any]:
        """The keyed part of the snapshot for ``checkpoint_id``.

        ``changed`` holds the keys touched since the previous snapshot, or is
        None when changes were not tracked (then the snapshot is full). The
        result refers to the live values: encode it before processing more records.
        """
        failed_keys: set[Any] = set()
        unknown = changed is None
        for n in sorted(self._pending):
            chain, keys = self._pending.pop(n)
            if n <= last_completed and chain is not None:
                self.committed_chain = chain
            elif keys is None:
                unknown = True  # a failed snapshot whose changes nobody tracked
            else:
                failed_keys |= keys
        keys = None if unknown else (changed or set()) | failed_keys
        full = (
            keys is None
            or self.force_full
            or not self.committed_chain
            or len(self.committed_chain) >= self.full_every
        )
        self._pending[checkpoint_id] = (None, keys)
        if full:
            return {"mode": "full", "values": values, "deleted": []}
        assert keys is not None
        present = {k: values[k] for k in keys if k in values}
        deleted = [k for k in keys if k not in values]
        return {"mode": "delta", "values": present, "deleted": deleted}

    def written(self, checkpoint_id: int, info: ObjectInfo) -> list[ObjectInfo]:
        """Record the object of ``checkpoint_id``; return the chain it completes."""
        chain = [info] if info.mode == "full" else [*self.committed_chain, info]
        if checkpoint_id in self._pending:  # else a later snapshot already gave it up
            self._pending[checkpoint_id] = (chain, self._pending[checkpoint_id][1])
            self.force_full = False
        return chain


def apply_chain(docs: list[dict[str, Any]], keep: Any = None) -> dict[Any, Any]:
    """Rebuild keyed values from a chain of decoded objects (oldest first).

    ``keep(key) -> bool`` filters keys, for a restore at another parallelism.
    """
    values: dict[Any, Any] = {}
    for doc in docs:
        keyed = doc.get("keyed")
        if keyed is None:
            continue
        if keyed["mode"] == "full":
            values = {}
        for key in keyed["deleted"]:
            values.pop(key, None)
        if keep is None:
            values.update(keyed["values"])
        else:
            values.update((k, v) for k, v in keyed["values"].items() if keep(k))
    return values
