"""Plain data that the coordinator hands to the driver."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from rayflow.errors import Failure


class JobStatus(str, enum.Enum):
    """Where a job is in its life."""

    STARTING = "STARTING"
    RUNNING = "RUNNING"
    RECOVERING = "RECOVERING"  # restarting from the last checkpoint after a failure
    STOPPING = "STOPPING"
    FINISHED = "FINISHED"  # every source ended and everything was committed
    STOPPED = "STOPPED"  # stopped on request, after draining
    FAILED = "FAILED"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.FINISHED, JobStatus.STOPPED, JobStatus.FAILED)

    def __str__(self) -> str:
        return self.value


@dataclass
class JobReport:
    job: str
    status: JobStatus
    started_at: float
    running_at: float | None = None  # when every operator was deployed and running
    ended_at: float | None = None
    failures: list[Failure] = field(default_factory=list)
    metrics: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    checkpoints: dict[str, Any] | None = None  # checkpoint statistics, if checkpointing
    final_checkpoint: int | None = None  # the checkpoint the job ended with
    savepoint: str | None = None  # where the final savepoint went, if the stop asked for one
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    restored_checkpoint: int | None = None  # what the job (last) started from
    events: list[dict[str, Any]] = field(default_factory=list)  # for traces
    alerts: list[dict[str, Any]] = field(default_factory=list)  # active when the job ended
