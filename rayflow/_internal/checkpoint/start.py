"""Where a run starts: one decision, in one place, before anything is deployed.

A run starts fresh, continues the job (``resume=True``), starts from a
savepoint or checkpoint folder (``restore_from=``), or is the driver
replacing a dead coordinator. For each, :func:`decide_start` settles, in
this order:

1. What the request needs and refuses (a fresh run never overwrites or
   ignores a job's checkpoints; ``resume`` needs one).
2. The lease: this run takes the next generation of the job's lease in the
   checkpoint storage; the generation is its fencing token and part of its
   run id. A live holder elsewhere refuses the start. After an *expired*
   takeover it waits until the old holder's lease has surely run out.
3. The restore point, read under the lease (so that the old holder can no
   longer add a newer checkpoint after it was chosen).
4. The first checkpoint id: above every id with anything in the storage and
   above the restored one, so that no id (and no object key) is reused.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rayflow._internal.checkpoint import lease as leases
from rayflow._internal.checkpoint.restore import (
    RestorePoint,
    highest_checkpoint_id,
    latest_checkpoint,
    list_checkpoint_ids,
    open_restore_point,
)
from rayflow._internal.storage import StorageError, open_storage
from rayflow.config import Checkpointing
from rayflow.errors import ConfigError

log = logging.getLogger("rayflow")

FRESH = "fresh"
RESUME = "resume"
RESTORE = "restore_from"
RECOVER = "recover"  # the driver replaces a dead coordinator of its own run


@dataclass(frozen=True)
class StartDecision:
    """Everything a run needs to know about where it starts."""

    how: str
    point: RestorePoint | None
    run_id: str
    lease: leases.Lease | None
    first_checkpoint_id: int
    #: Names this start among the run's (a restarted coordinator makes another): channel
    #: positions in snapshots hold only within one (runtime/task.py, local recovery).
    instance: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    @property
    def restored_id(self) -> int | None:
        return self.point.manifest.checkpoint_id if self.point else None


def decide_start(
    job: str,
    checkpoint: Checkpointing | None,
    *,
    resume: bool = False,
    restore_from: str | os.PathLike[str] | None = None,
    recover_from: RestorePoint | None = None,
    recovering: bool = False,
    holder: dict[str, Any] | None = None,
    alive: Callable[[leases.Lease], bool | None] = lambda lease: None,
) -> StartDecision:
    """Decide where a run of ``job`` starts (see the module docstring).

    ``recovering`` is the driver replacing its dead coordinator: the job
    continues from its latest checkpoint, or from ``recover_from`` (where
    the run started) if it has none yet.
    """
    # Step 1. What the request needs.
    if restore_from is not None and resume:
        raise ConfigError("pass either resume=True or restore_from=..., not both")
    how = (
        RECOVER
        if recovering
        else RESTORE
        if restore_from is not None
        else (RESUME if resume else FRESH)
    )
    given = open_restore_point(os.fspath(restore_from)) if restore_from is not None else None
    if checkpoint is None:
        if resume:
            raise ConfigError("resume=True needs checkpoint=rf.Checkpointing(storage=...)")
        restored = given.manifest.checkpoint_id if given else 0
        return StartDecision(how, given, leases.new_run_id(0), None, restored + 1)
    storage = checkpoint.storage
    if how == FRESH:
        existing = list_checkpoint_ids(storage, job)
        if existing:
            raise ConfigError(
                f"{storage} already holds {len(existing)} checkpoint(s) of job {job!r} "
                f"(the latest is {existing[-1]}). Pass resume=True to continue from the "
                "latest, give this run another job_name=..., or use another storage; "
                "rayflow never overwrites or ignores a job's checkpoints."
            )
    elif how == RESUME and not list_checkpoint_ids(storage, job):
        raise ConfigError(
            f"resume=True, but {storage} holds no complete checkpoint of job {job!r}; "
            "start it without resume=True"
        )
    # Step 2. The lease.
    store = open_storage(storage)
    try:
        lease = leases.acquire(
            store,
            job,
            ttl_s=checkpoint.lease_s,
            holder=holder or leases.holder_info(None),
            alive=(lambda _: False) if recovering else alive,
        )
    except StorageError as exc:
        raise StorageError(
            f"job {job!r}: cannot take the lease in the checkpoint storage {storage}: {exc}. "
            "Check that the storage exists and can be written (path, bucket, credentials)."
        ) from exc
    try:
        wait = lease.commit_after - time.time()
        if wait > 0:
            log.warning(
                "job %s: took over an expired lease; waiting %.1f s until the previous "
                "holder's lease has surely run out",
                job,
                wait,
            )
            time.sleep(wait)
        # Step 3. The restore point, under the lease.
        point = given
        if how in (RESUME, RECOVER):
            point = latest_checkpoint(storage, job) or recover_from
            if point is None and how == RESUME:
                raise ConfigError(
                    f"resume=True, but {storage} holds no readable checkpoint of job {job!r}"
                )
        # Step 4. The first id this run may use.
        first = max(
            highest_checkpoint_id(storage, job), point.manifest.checkpoint_id if point else 0
        )
        return StartDecision(how, point, lease.run_id, lease, first + 1)
    except BaseException:
        leases.release(store, lease)
        raise
