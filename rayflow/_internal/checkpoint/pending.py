"""A checkpoint in flight: it collects acknowledgements until it is complete."""

from __future__ import annotations

import enum
import time

from rayflow._internal.checkpoint.manifest import OperatorSnapshot
from rayflow._internal.checkpoint.snapshot import BarrierInfo

ActorKey = tuple[str, int]


class Phase(enum.IntEnum):
    """Where a checkpoint in flight is. From COMMITTING on it can no longer be abandoned:
    its manifest may be written, so whoever wants to know the job's recovery
    point must wait for the outcome."""

    TRIGGERING = 1
    ACKNOWLEDGING = 2
    COMMITTING = 3  # the manifest is being written
    NOTIFYING = 4  # the manifest is written; sinks are being told
    DONE = 5


class AckOutcome(enum.Enum):
    """What became of an acknowledgement (a value, not an exception)."""

    SUCCESS = "success"
    DUPLICATE = "duplicate"  # this operator acknowledged before
    UNKNOWN = "unknown"  # not an operator this checkpoint waits for
    DISCARDED = "discarded"  # the checkpoint was already given up


class FailureReason(enum.Enum):
    """Why a checkpoint failed; each carries its message."""

    TIMEOUT = "checkpoint {id} expired after {timeout:.1f} s; still waiting for {missing}"
    DECLINED = "checkpoint {id} was declined by {actor}: {reason}"
    MANIFEST_FAILED = "checkpoint {id}: its manifest could not be written: {reason}"
    MANIFEST_EXISTS = (
        "checkpoint {id}: another run wrote a manifest with this id in {where}; two "
        "runs of the job used the storage at once (this run stops: see the job's lease)"
    )
    MANIFEST_UNKNOWN = (
        "checkpoint {id}: could not tell whether its manifest was written ({reason}); "
        "the job stops rather than guess (resume=True continues from what the storage holds)"
    )
    LEASE = "checkpoint {id} was not committed: {reason}"
    FENCED = "checkpoint {id} was not committed: {reason}"
    TRIGGER_FAILED = "checkpoint {id} could not be started: {reason}"
    JOB_ENDING = "checkpoint {id} was abandoned because the job is ending"
    RESTARTING = "checkpoint {id} was abandoned because the job is restarting"

    def format(self, **values: object) -> str:
        return self.value.format(**values)


class PendingCheckpoint:
    def __init__(self, barrier: BarrierInfo, expected: set[ActorKey]):
        self.barrier = barrier
        self.expected = set(expected)
        self.acks: dict[ActorKey, OperatorSnapshot] = {}
        self.started = time.monotonic()
        self.started_at = time.time()
        self.failure: str | None = None
        self.failure_reason: FailureReason | None = None
        self.phase = Phase.TRIGGERING
        self.phases: dict[str, float] = {}  # phase name -> wall-clock time it ended

    @property
    def checkpoint_id(self) -> int:
        return self.barrier.checkpoint_id

    @property
    def complete(self) -> bool:
        return self.failure is None and self.expected <= set(self.acks)

    @property
    def missing(self) -> list[ActorKey]:
        return sorted(self.expected - set(self.acks))

    def acknowledge(self, key: ActorKey, snapshot: OperatorSnapshot) -> AckOutcome:
        if self.failure is not None:
            return AckOutcome.DISCARDED
        if key not in self.expected:
            return AckOutcome.UNKNOWN
        if key in self.acks:
            return AckOutcome.DUPLICATE
        self.acks[key] = snapshot
        return AckOutcome.SUCCESS

    @property
    def abandonable(self) -> bool:
        """True until the manifest write begins (then only its outcome decides)."""
        return self.phase < Phase.COMMITTING

    def fail(self, reason: FailureReason, message: str) -> None:
        if self.failure is None:
            self.failure_reason = reason
            self.failure = message
