"""Reading checkpoint storage for people and tools (the ``rayflow checkpoints`` command)."""

from __future__ import annotations

from typing import Any

from rayflow._internal.checkpoint.manifest import (
    MANIFEST_NAME,
    Manifest,
    checkpoint_dir,
    checkpoint_id_of,
    describe_offset,
    manifest_key,
)
from rayflow._internal.checkpoint.restore import RestorePoint, open_restore_point
from rayflow._internal.storage import StorageError, open_storage
from rayflow._internal.storage.base import ObjectNotFound, normalize_uri
from rayflow.errors import ConfigError


def _row(job: str, uri: str, manifest: Manifest) -> dict[str, Any]:
    return {
        "job": job,
        "id": manifest.checkpoint_id,
        "kind": manifest.kind,
        "time": manifest.created_at,
        "state_bytes": manifest.state_bytes,
        "written_bytes": manifest.written_bytes,
        "steps": len(manifest.flow.get("steps", [])),
        "uri": uri,
    }


def list_checkpoints(uri: str, job: str | None = None) -> list[dict[str, Any]]:
    """Every complete checkpoint in a storage (of one job, or of all), oldest first.

    ``uri`` may also be a savepoint folder: then that one savepoint is listed.
    """
    root = normalize_uri(uri)
    storage = open_storage(root)
    try:
        single = Manifest.from_json(storage.get(MANIFEST_NAME))
    except ObjectNotFound:  # not a savepoint folder (an unreachable storage raises)
        single = None
    if single is not None:
        return [_row(single.job, root, single)]
    prefix = f"{job}/checkpoints/" if job else ""
    rows = []
    for key in storage.list(prefix):
        parts = key.split("/")
        if len(parts) != 4 or parts[1] != "checkpoints" or parts[3] != MANIFEST_NAME:
            continue
        owner = parts[0]
        if checkpoint_id_of(key, owner) is None:
            continue
        try:
            manifest = Manifest.from_json(storage.get(key))
        except (StorageError, ValueError, KeyError):
            continue  # unreadable: not a usable checkpoint
        rows.append(_row(owner, f"{root}/{owner}/checkpoints/{parts[2]}", manifest))
    return sorted(rows, key=lambda r: (r["job"], r["id"]))


def _open(uri: str) -> RestorePoint:
    try:
        return open_restore_point(uri)
    except ConfigError as exc:
        raise LookupError(str(exc)) from None


def describe(uri: str) -> dict[str, Any]:
    """One checkpoint or savepoint, as plain data."""
    point = _open(uri)
    m = point.manifest
    return {
        **_row(m.job, normalize_uri(uri), m),
        "duration_ms": m.duration_ms,
        "max_parallelism": m.flow.get("max_parallelism"),
        "steps": [
            {
                "step": s["name"],
                "kind": s["kind"],
                "parallelism": s["parallelism"],
                "stage": s["stage"],
            }
            for s in m.flow.get("steps", [])
        ],
        # Offsets as recorded (plain JSON, or the repr of a pickled one): a tool
        # that only reads a checkpoint never unpickles anything.
        "offsets": [
            {"step": step, "partition": int(sp), "offset": describe_offset(enc)}
            for step, parts in sorted(m.encoded_sources().items())
            for sp, enc in sorted(parts.items(), key=lambda item: int(item[0]))
        ],
        "objects": [
            {
                "stage": op.stage,
                "partition": op.partition,
                "key": info.key,
                "size": info.size,
                "mode": info.mode,
                "sha256": info.sha256[:16],
            }
            for op in m.operators
            for info in dict.fromkeys((*op.chain, op.object))
        ],
    }


def delete(uri: str) -> list[str]:
    """Delete a savepoint, or one checkpoint and the objects no other checkpoint needs."""
    point = _open(uri)
    manifest = point.manifest
    storage = open_storage(point.storage)
    target = normalize_uri(uri)
    if target == point.storage:  # a savepoint folder: everything in it goes
        keys = storage.list("")
        storage.delete([k for k in keys if k != MANIFEST_NAME] + [MANIFEST_NAME])
        return keys
    job, cid = manifest.job, manifest.checkpoint_id
    keep: set[str] = set()
    for key in storage.list(f"{job}/checkpoints/"):
        other = checkpoint_id_of(key, job)
        if key.endswith("/" + MANIFEST_NAME) and other is not None and other != cid:
            keep |= Manifest.from_json(storage.get(key)).object_keys()
    own = set(storage.list(checkpoint_dir(job, cid) + "/")) | manifest.object_keys()
    doomed = sorted(k for k in own if k not in keep and k != manifest_key(job, cid))
    # The manifest first: from that moment the checkpoint does not exist.
    storage.delete([manifest_key(job, cid)])
    storage.delete(doomed)
    return [manifest_key(job, cid), *doomed]
