"""Errors raised by rayflow.

Every error derives from :class:`RayflowError`. Build and configuration
mistakes are also ``ValueError``/``TypeError`` so that ordinary ``except``
clauses catch them; a failed job raises :class:`JobFailedError`, which carries
the failing step, partition, record and original traceback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class RayflowError(Exception):
    """Base class of every rayflow error."""


class BuildError(RayflowError, ValueError):
    """The dataflow is malformed; raised while it is being built or planned."""


class ConfigError(RayflowError, ValueError):
    """An option passed to ``run``/``start`` or a connector is invalid."""


class JobAlreadyRunningError(RayflowError):
    """A job with the same name is already running on this Ray cluster."""


@dataclass(frozen=True)
class DeadLetter:
    """A record a step's function failed on, set aside (``on_error="dead_letter"``).

    ``record`` is the record as the step got it (``(key, record)`` for keyed
    steps); ``error_type`` is the exception's qualified class name.
    """

    step: str
    partition: int
    record: Any
    error_type: str
    message: str
    traceback: str


@dataclass(frozen=True)
class Failure:
    """One failure inside a running job, as plain data (picklable).

    ``kind`` is ``"user"`` for an exception raised by a user function or
    connector, ``"actor_died"`` when an operator process was lost, and
    ``"system"`` for an error of rayflow itself.
    """

    kind: str
    message: str
    step: str | None = None
    partition: int | None = None
    record: str | None = None
    error_type: str | None = None
    traceback: str | None = None

    def describe(self) -> str:
        where = ""
        if self.step is not None:
            where = f"step {self.step!r}"
            if self.partition is not None:
                where += f" (partition {self.partition})"
            where += ": "
        text = f"{where}{self.message}"
        if self.record is not None:
            text += f"\n  record: {self.record}"
        if self.traceback:
            text += "\n  original traceback:\n" + _indent(self.traceback.rstrip(), "    ")
        return text


@dataclass
class JobFailedError(RayflowError):
    """The job failed. ``failures`` lists what went wrong, root cause first."""

    job: str
    failures: list[Failure] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(str(self))

    @property
    def step(self) -> str | None:
        return self.failures[0].step if self.failures else None

    @property
    def partition(self) -> int | None:
        return self.failures[0].partition if self.failures else None

    def __str__(self) -> str:
        if not self.failures:
            return f"job {self.job!r} failed"
        head = f"job {self.job!r} failed: " + self.failures[0].describe()
        others = self.failures[1:]
        if others:
            head += "\n  also:\n" + "\n".join(_indent(f"- {f.describe()}", "    ") for f in others)
        return head

    def __reduce__(self) -> tuple[type, tuple[str, list[Failure]]]:
        return (JobFailedError, (self.job, self.failures))


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.splitlines())
