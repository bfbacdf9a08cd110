"""Completed checkpoints: the retained ones, the latest, and what may be deleted."""

from __future__ import annotations

import logging
from collections import deque

from rayflow._internal.checkpoint.manifest import (
    CHECKPOINT,
    Manifest,
    checkpoint_id_of,
    checkpoints_prefix,
    manifest_key,
)
from rayflow._internal.storage import Storage, StorageError

log = logging.getLogger("rayflow")


class CompletedCheckpointStore:
    """Keeps the last ``retain`` manifests; deletes what none of them needs."""

    def __init__(self, storage: Storage, job: str, retain: int):
        self.storage = storage
        self.job = job
        self.retain = retain
        self._retained: deque[Manifest] = deque()

    def latest(self) -> Manifest | None:
        return self._retained[-1] if self._retained else None

    def retained(self) -> list[Manifest]:
        return list(self._retained)

    def recover(self, up_to: int) -> None:
        """Take up the job's retained checkpoints from storage (a restarted coordinator).

        Without this, the first retention pass after a restart would delete
        the older checkpoints that retention is meant to keep.
        """
        ids = sorted(
            {
                cid
                for key in self.storage.list(checkpoints_prefix(self.job))
                if key.endswith("/manifest.json")
                and (cid := checkpoint_id_of(key, self.job)) is not None
                and cid <= up_to
            }
        )
        for cid in ids[-self.retain :]:
            try:
                self.add(Manifest.from_json(self.storage.get(manifest_key(self.job, cid))))
            except (StorageError, ValueError, KeyError) as exc:
                log.warning("checkpoint %d of %s is unreadable: %s", cid, self.job, exc)

    def add(self, manifest: Manifest) -> None:
        if manifest.kind != CHECKPOINT:
            return  # savepoints live elsewhere and are never deleted by retention
        self._retained.append(manifest)
        while len(self._retained) > self.retain:
            self._retained.popleft()

    def garbage(self) -> tuple[list[str], list[str]]:
        """(manifests, objects) under the job's checkpoints that no kept checkpoint needs.

        Only checkpoints older than the latest complete one are considered, so
        the objects of a checkpoint still in flight are never touched.
        """
        latest = self.latest()
        if latest is None:
            return [], []
        keep = {manifest_key(self.job, m.checkpoint_id) for m in self._retained}
        for m in self._retained:
            keep |= m.object_keys()
        manifests: list[str] = []
        objects: list[str] = []
        for key in self.storage.list(checkpoints_prefix(self.job)):
            cid = checkpoint_id_of(key, self.job)
            if cid is None or cid > latest.checkpoint_id or key in keep:
                continue
            (manifests if key.endswith("/manifest.json") else objects).append(key)
        return manifests, objects

    def collect_garbage(self) -> int:
        """Delete what no kept checkpoint needs: manifests first, then objects."""
        try:
            manifests, objects = self.garbage()
            # A checkpoint stops existing when its manifest goes, before its objects do.
            self.storage.delete(manifests)
            self.storage.delete(objects)
        except StorageError as exc:
            log.warning("checkpoint retention for %s failed (will retry): %s", self.job, exc)
            return 0
        return len(manifests) + len(objects)
