"""The job's lease in its checkpoint storage: one run at a time may commit.

Layout: ``<job>/lease/<generation, 10 digits>.json``. A run takes the lease
by *creating* the next generation's object (create-if-absent, so of two
drivers racing for it exactly one wins); the holder renews it by rewriting
its own object. The generation is the run's fencing token: the run id, and
with it every object key the run writes, carries it.

Rules (the protocol relies on each):

1. A run may take generation g+1 only if generation g was released, or its
   holder is known to be dead (same Ray cluster, coordinator actor gone), or
   g was not renewed for ``ttl_s`` (it expired).
2. The holder may write a manifest only while ``now < renewed_at + ttl_s -
   margin`` and no higher generation exists (checked at every renewal, both
   before and after the write, so a takeover is noticed within one renewal).
3. A run that took over an *expired* lease (whose holder may still be alive,
   say on another cluster behind a partition) writes no manifest before
   ``ttl_s`` after it took it: by then the old holder's last renewal has run
   out, by rule 2. Taking over a released or known-dead holder needs no wait.

Clocks are wall clocks (``time.time()``) of the machines involved; their
drift must stay well below ``margin`` (a quarter of ``ttl_s``).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from rayflow._internal.storage import Storage, StorageError
from rayflow._internal.storage.base import ObjectNotFound
from rayflow.errors import JobAlreadyRunningError, RayflowError

log = logging.getLogger("rayflow")

#: Generations older than the current one minus this are deleted on takeover.
KEEP_GENERATIONS = 3


class LeaseLost(RayflowError):
    """Another run took the job's lease: this run must not commit anything more."""


class LeaseExpired(RayflowError):
    """The lease could not be renewed in time; no manifest until it is again."""


def lease_prefix(job: str) -> str:
    return f"{job}/lease/"


def lease_key(job: str, generation: int) -> str:
    return f"{lease_prefix(job)}{generation:010d}.json"


def new_run_id(generation: int) -> str:
    """A run id: the lease generation (the fencing token) and a random tag."""
    return f"r{generation:06d}{secrets.token_hex(3)}"


def holder_info(ray_cluster: str | None) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "ray_cluster": ray_cluster}


@dataclass
class Lease:
    """One generation of a job's lease, as held by this process."""

    job: str
    generation: int
    run_id: str
    ttl_s: float
    holder: dict[str, Any] = field(default_factory=dict)
    acquired_at: float = 0.0
    renewed_at: float = 0.0  # wall clock at the start of the last successful renewal
    commit_after: float = 0.0  # rule 3: no manifest before this time
    released: bool = False

    @property
    def key(self) -> str:
        return lease_key(self.job, self.generation)

    @property
    def margin_s(self) -> float:
        return self.ttl_s / 4.0

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @staticmethod
    def from_json(data: bytes) -> Lease:
        doc = json.loads(data)
        return Lease(
            job=doc["job"],
            generation=int(doc["generation"]),
            run_id=doc["run_id"],
            ttl_s=float(doc["ttl_s"]),
            holder=dict(doc.get("holder") or {}),
            acquired_at=float(doc.get("acquired_at", 0.0)),
            renewed_at=float(doc.get("renewed_at", 0.0)),
            commit_after=float(doc.get("commit_after", 0.0)),
            released=bool(doc.get("released", False)),
        )

    def describe(self, now: float) -> str:
        h = self.holder
        where = f"host {h.get('host', '?')} (pid {h.get('pid', '?')}"
        if h.get("ray_cluster"):
            where += f", Ray cluster {h['ray_cluster']}"
        where += ")"
        return (
            f"run {self.run_id} on {where}, last renewed {now - self.renewed_at:.1f} s ago; "
            f"its lease expires in {max(0.0, self.renewed_at + self.ttl_s - now):.1f} s"
        )


def _generations(storage: Storage, job: str) -> list[int]:
    gens = []
    prefix = lease_prefix(job)
    for key in storage.list(prefix):
        name = key[len(prefix) :]
        if name.endswith(".json") and name[:-5].isdigit():
            gens.append(int(name[:-5]))
    return sorted(gens)


def current(storage: Storage, job: str) -> Lease | None:
    """The highest generation of the job's lease, or None if it never had one."""
    gens = _generations(storage, job)
    for gen in reversed(gens):
        try:
            return Lease.from_json(storage.get(lease_key(job, gen)))
        except ObjectNotFound:
            continue
        except (ValueError, KeyError) as exc:
            # A generation object is written whole (one PUT); an unreadable one
            # is corrupt: count it as expired, so that rule 3's wait applies.
            log.warning("lease %s of job %s is unreadable: %s", gen, job, exc)
            return Lease(job, gen, "?", ttl_s=60.0, renewed_at=0.0)
    return None


def acquire(
    storage: Storage,
    job: str,
    *,
    ttl_s: float,
    holder: dict[str, Any],
    alive: Callable[[Lease], bool | None],
) -> Lease:
    """Take the next generation of the job's lease, or raise if a live run holds it.

    ``alive(lease)`` says whether the holder of ``lease`` is alive: True,
    False (known dead: take over at once) or None (unknown: wait for expiry).
    """
    now = time.time()
    previous = current(storage, job)
    wait_for_old = False
    if previous is not None and not previous.released:
        expired = now > previous.renewed_at + previous.ttl_s
        verdict = alive(previous)
        if verdict is True or (verdict is None and not expired):
            raise JobAlreadyRunningError(
                f"job {job!r} is held by another run: {previous.describe(now)}. Only one "
                "run of a job may use its checkpoint storage at a time: stop that run "
                f"first (rayflow stop {job}), or, if its driver is gone, start again once "
                "its lease has expired."
            )
        # Rule 3: an expired holder might still be alive somewhere: let its
        # last renewal run out before this run commits anything.
        wait_for_old = verdict is None
    generation = previous.generation + 1 if previous is not None else 1
    lease = Lease(
        job=job,
        generation=generation,
        run_id=new_run_id(generation),
        ttl_s=ttl_s,
        holder=holder,
        acquired_at=now,
        renewed_at=now,
        commit_after=now + (previous.ttl_s if wait_for_old and previous else 0.0),
    )
    if not storage.put_if_absent(lease.key, lease.to_json()):
        raise JobAlreadyRunningError(
            f"job {job!r}: another driver took its lease (generation {generation}) at the "
            "same moment; only one run of a job may use its checkpoint storage at a time"
        )
    if previous is not None:
        log.info("job %s: lease generation %d taken over from %s", job, generation, previous.run_id)
        old = [
            lease_key(job, g)
            for g in _generations(storage, job)
            if g < generation - KEEP_GENERATIONS
        ]
        try:
            storage.delete(old)
        except StorageError as exc:
            log.debug("old lease generations of %s not deleted: %s", job, exc)
    return lease


def renew(storage: Storage, lease: Lease) -> None:
    """Renew ``lease``; raise :class:`LeaseLost` if a newer generation exists.

    The newer-generation check runs before and after the write: a run that
    took over after the first check is seen by the second (rule 2).
    """
    started = time.time()
    _check_not_superseded(storage, lease)
    renewed = Lease(**{**asdict(lease), "renewed_at": started})
    storage.put(lease.key, renewed.to_json())
    _check_not_superseded(storage, lease)
    lease.renewed_at = started


def _check_not_superseded(storage: Storage, lease: Lease) -> None:
    newer = [g for g in _generations(storage, lease.job) if g > lease.generation]
    if newer:
        try:
            other = Lease.from_json(storage.get(lease_key(lease.job, newer[-1])))
            who = other.describe(time.time())
        except (StorageError, ValueError, KeyError):
            who = f"generation {newer[-1]}"
        raise LeaseLost(
            f"job {lease.job!r}: run {lease.run_id} lost its lease to {who}; it stops "
            "committing (the newer run continues from the latest checkpoint)"
        )


def check_can_commit(lease: Lease, now: float | None = None) -> None:
    """Rule 2 and 3 on this side: may the holder write a manifest now?"""
    now = time.time() if now is None else now
    if now < lease.commit_after:
        raise LeaseExpired(
            f"run {lease.run_id} took over an expired lease; it commits from "
            f"{lease.commit_after - now:.1f} s from now, when the previous holder's lease "
            "has surely run out"
        )
    if now >= lease.renewed_at + lease.ttl_s - lease.margin_s:
        raise LeaseExpired(
            f"the lease of run {lease.run_id} was last renewed {now - lease.renewed_at:.1f} s "
            f"ago (lease_s={lease.ttl_s:g}); no checkpoint is committed until it is renewed"
        )


def release(storage: Storage, lease: Lease) -> None:
    """Give the lease up (the job ended): the next run may start at once."""
    try:
        _check_not_superseded(storage, lease)
        lease.released = True
        storage.put(lease.key, lease.to_json())
    except (LeaseLost, StorageError) as exc:
        log.debug("lease of %s not released: %s", lease.job, exc)
