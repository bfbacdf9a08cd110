"""The checkpoint manifest: the commit point of a checkpoint, as JSON.

Layout in the storage (keys relative to its root)::

    <job>/checkpoints/<id, 10 digits>/manifest.json       the commit point
    <job>/checkpoints/<id, 10 digits>/<stage>-<partition>-<run>.snapshot
    <job>/lease/<generation, 10 digits>.json              who may commit

A savepoint is a folder of its own holding ``manifest.json`` and its
snapshot objects. Object keys in a manifest are relative to the storage
root the manifest belongs to (the checkpoint storage, or the savepoint
folder). A checkpoint whose manifest is missing does not exist. Every
object is created only if absent and its key names the run that wrote it,
so no run ever overwrites another's objects.

The manifest carries a sha256 of its own content (``"sha256"``, over the
JSON document without that field), checked on every read: source offsets
that are not plain JSON are stored pickled, and nothing unchecked is ever
unpickled.
"""

from __future__ import annotations

import base64
import hashlib
import json
import pickle
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from rayflow._internal.pickling import dumps_value
from rayflow._internal.plan import Plan

FORMAT_VERSION = 2
#: Formats this version reads (1 had no checksum and no run id).
READABLE_FORMATS = (1, 2)
MANIFEST_NAME = "manifest.json"
CHECKPOINT = "checkpoint"
SAVEPOINT = "savepoint"

_ID = re.compile(r"^(\d{10})$")


def checkpoints_prefix(job: str) -> str:
    return f"{job}/checkpoints/"


def checkpoint_dir(job: str, checkpoint_id: int) -> str:
    return f"{job}/checkpoints/{checkpoint_id:010d}"


def manifest_key(job: str, checkpoint_id: int) -> str:
    return f"{checkpoint_dir(job, checkpoint_id)}/{MANIFEST_NAME}"


def checkpoint_id_of(key: str, job: str) -> int | None:
    """The checkpoint id of a key under ``<job>/checkpoints/``, else None."""
    prefix = checkpoints_prefix(job)
    if not key.startswith(prefix):
        return None
    match = _ID.match(key[len(prefix) :].split("/", 1)[0])
    return int(match.group(1)) if match else None


def encode_offset(offset: Any) -> dict[str, Any]:
    """Offsets go into JSON as themselves when that round-trips, else pickled."""
    try:
        if json.loads(json.dumps(offset)) == offset and type(
            json.loads(json.dumps(offset))
        ) is type(offset):
            return {"json": offset}
    except (TypeError, ValueError):
        pass
    return {"pickle": base64.b64encode(dumps_value(offset)).decode(), "repr": repr(offset)}


def decode_offset(data: dict[str, Any]) -> Any:
    """An offset from :func:`encode_offset`; only call it on a checked manifest."""
    if "json" in data:
        return data["json"]
    return pickle.loads(base64.b64decode(data["pickle"]))


def describe_offset(data: dict[str, Any]) -> Any:
    """An offset for people: itself if plain JSON, else its repr (never unpickled)."""
    return data["json"] if "json" in data else data.get("repr", "<pickled>")


class CorruptManifest(ValueError):
    """A manifest whose content does not match its own checksum."""


def _digest(doc: dict[str, Any]) -> str:
    body = {k: v for k, v in doc.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ObjectInfo:
    """One snapshot object: where it is and how to check it."""

    key: str
    size: int
    sha256: str
    checkpoint_id: int
    mode: str  # "full" or "delta" (keyed state in it), or "plain" (none)

    @staticmethod
    def from_json(data: dict[str, Any]) -> ObjectInfo:
        return ObjectInfo(
            key=data["key"],
            size=int(data["size"]),
            sha256=data["sha256"],
            checkpoint_id=int(data["checkpoint_id"]),
            mode=data["mode"],
        )


@dataclass(frozen=True)
class OperatorSnapshot:
    """What one operator partition acknowledged for a checkpoint."""

    stage: str
    partition: int
    object: ObjectInfo  # written for this checkpoint
    keyed_step: str | None = None
    key_groups: tuple[int, int] | None = None  # [start, stop) of the keyed state
    chain: tuple[ObjectInfo, ...] = ()  # every object the keyed state needs, oldest first
    sources: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    inflight: bool = False  # the object holds in-flight data (an unaligned snapshot)
    # Watermarks of an event-time job (runtime/event_time.py), JSON-safe.
    event_time: dict[str, Any] | None = None
    # Where its channels were at the barrier (local recovery; runtime/task.py), JSON-safe.
    positions: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.event_time is not None:
            extra["event_time"] = self.event_time
        if self.positions is not None:
            extra["positions"] = self.positions
        return {
            **extra,
            "stage": self.stage,
            "partition": self.partition,
            "object": asdict(self.object),
            "keyed_step": self.keyed_step,
            "key_groups": list(self.key_groups) if self.key_groups else None,
            "chain": [asdict(o) for o in self.chain],
            "sources": self.sources,
            "inflight": self.inflight,
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> OperatorSnapshot:
        groups = data.get("key_groups")
        return OperatorSnapshot(
            stage=data["stage"],
            partition=int(data["partition"]),
            object=ObjectInfo.from_json(data["object"]),
            keyed_step=data.get("keyed_step"),
            key_groups=(int(groups[0]), int(groups[1])) if groups else None,
            chain=tuple(ObjectInfo.from_json(o) for o in data.get("chain", [])),
            sources=data.get("sources", {}),
            inflight=bool(data.get("inflight", False)),
            event_time=data.get("event_time"),
            positions=data.get("positions"),
        )


@dataclass(frozen=True)
class Manifest:
    job: str
    checkpoint_id: int
    kind: str
    created_at: float
    duration_ms: float
    flow: dict[str, Any]
    operators: tuple[OperatorSnapshot, ...]
    format: int = FORMAT_VERSION
    run_id: str = ""  # the run that wrote it (empty in format 1)

    @property
    def sources(self) -> dict[str, dict[int, Any]]:
        """Source step -> source partition -> offset (decoded)."""
        merged: dict[str, dict[int, Any]] = {}
        for op in self.operators:
            for step, parts in op.sources.items():
                for sp, enc in parts.items():
                    merged.setdefault(step, {})[int(sp)] = decode_offset(enc)
        return merged

    def object_keys(self) -> set[str]:
        """Every object this checkpoint needs."""
        keys = set()
        for op in self.operators:
            keys.add(op.object.key)
            keys.update(o.key for o in op.chain)
        return keys

    @property
    def written_bytes(self) -> int:
        """Bytes of the objects written for this checkpoint (not the reused ones)."""
        return sum(op.object.size for op in self.operators)

    @property
    def state_bytes(self) -> int:
        """Bytes of every object needed to restore this checkpoint."""
        sizes = {}
        for op in self.operators:
            sizes[op.object.key] = op.object.size
            for o in op.chain:
                sizes[o.key] = o.size
        return sum(sizes.values())

    def encoded_sources(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Source step -> source partition -> encoded offset (nothing unpickled)."""
        merged: dict[str, dict[str, dict[str, Any]]] = {}
        for op in self.operators:
            for step, parts in op.sources.items():
                merged.setdefault(step, {}).update(parts)
        return merged

    def step_parallelism(self, step: str) -> int | None:
        for s in self.flow.get("steps", []):
            if s["name"] == step:
                return int(s["parallelism"])
        return None

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "job": self.job,
            "run_id": self.run_id,
            "checkpoint_id": self.checkpoint_id,
            "kind": self.kind,
            "created_at": self.created_at,
            "duration_ms": self.duration_ms,
            "written_bytes": self.written_bytes,
            "state_bytes": self.state_bytes,
            "flow": self.flow,
            "sources": self.encoded_sources(),
            "operators": [op.to_json() for op in self.operators],
        }
        doc["sha256"] = _digest(doc)
        return json.dumps(doc, indent=1, sort_keys=False).encode()

    @staticmethod
    def from_json(data: bytes) -> Manifest:
        doc = json.loads(data)
        fmt = int(doc.get("format", 0))
        if fmt not in READABLE_FORMATS:
            raise ValueError(
                f"checkpoint manifest format {fmt} is not supported by this rayflow "
                f"(it reads formats {', '.join(map(str, READABLE_FORMATS))})"
            )
        if fmt >= 2 and doc.get("sha256") != _digest(doc):
            raise CorruptManifest(
                f"manifest of checkpoint {doc.get('checkpoint_id')} of job {doc.get('job')!r} "
                "does not match its checksum; it is not used"
            )
        return Manifest(
            job=doc["job"],
            checkpoint_id=int(doc["checkpoint_id"]),
            kind=doc["kind"],
            created_at=float(doc["created_at"]),
            duration_ms=float(doc["duration_ms"]),
            flow=doc["flow"],
            operators=tuple(OperatorSnapshot.from_json(o) for o in doc["operators"]),
            format=fmt,
            run_id=str(doc.get("run_id", "")),
        )


def describe_flow(plan: Plan) -> dict[str, Any]:
    """The flow's steps, stages and parallelism, for the manifest."""
    return {
        "name": plan.name,
        "max_parallelism": plan.flow.max_parallelism,
        "steps": [
            {
                "name": s.name,
                "kind": s.kind.value,
                "parallelism": s.parallelism,
                "inputs": list(s.inputs),
                "stage": plan.stage_of[s.name],
            }
            for s in plan.flow.steps
        ],
        "stages": [
            {"name": st.name, "parallelism": st.parallelism, "steps": list(st.steps)}
            for st in plan.stages
        ],
    }
