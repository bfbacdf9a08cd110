"""Event-time windows for ``KeyedStream.window``: how records are grouped, what is computed.

::

    per_user.window("per_min", rf.windows.Tumbling(60.0), rf.windows.Count())
    per_user.window("sum_5m", rf.windows.Sliding(300.0, every_s=60.0),
                    rf.windows.Fold(lambda acc, e: acc + e["n"], initial=0))
    per_user.window("sessions", rf.windows.Session(gap_s=1800.0), rf.windows.Collect())

Each window emits once, ``(key, Result(start, end, value))``, when the
watermark ``W`` reaches ``end + allowed_lateness_s``; its state is then
deleted. Times are float seconds since the epoch; windows are half-open
``[start, end)``.

Windowers (which windows a record at event time ``ts`` goes into):

- ``Tumbling(size_s, offset_s=0)``: the one window with
  ``start = floor((ts - offset_s) / size_s) * size_s + offset_s``,
  ``end = start + size_s``.
- ``Sliding(size_s, every_s, offset_s=0)``: every window of length
  ``size_s`` whose start is a multiple of ``every_s`` (plus ``offset_s``)
  and that contains ``ts``: ``size_s / every_s`` windows when it divides.
- ``Session(gap_s)``: per key, a record opens ``[ts, ts + gap_s)``; sessions
  of the same key that overlap or touch it (``start <= ts + gap_s`` and
  ``ts <= end``) merge into one (``start`` = min, ``end`` = max). A record
  that falls between two sessions and reaches both bridges them into one.

A record is *late*, and goes to the step's ``.late`` stream as
``(key, record)`` without changing any state, when every window it would go
into has ``end + allowed_lateness_s <= W``. For ``Sliding``, a record some
of whose windows are closed goes only into the open ones. For ``Session``,
the window is the merged one: a record whose own ``[ts, ts + gap_s)`` is
closed is not late if it overlaps or touches a session that is still open
(it extends that session backwards).

Aggregators (what a window's ``value`` is). State is incremental: one
accumulator per window, not the records, except where noted.

- ``Count()``: the number of records.
- ``Sum(fn=None)``: the sum of ``fn(record)`` (of the records themselves
  when ``fn`` is None); the first value starts the sum.
- ``Fold(fn, initial, merge=None)``: ``fn(acc, record)`` from ``initial``
  (copied per window when mutable), in arrival order. Sessions merge
  accumulators with ``merge(earlier, later)``; without ``merge``, a
  ``Session`` window keeps its records and folds them when it fires, in
  timestamp order (ties: arrival order).
- ``Reduce(fn)``: ``fn(acc, record)`` from the first record, in arrival
  order; merging sessions combine with ``fn(earlier, later)``.
- ``Collect()``: the list of records, in timestamp order (ties: arrival
  order); it keeps the records.

Every class here is plain, immutable and picklable (user functions travel
with cloudpickle); arguments are checked when they are built.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from typing import Any, NamedTuple

from rayflow._internal.callables import arity_mismatch
from rayflow._internal.callables import describe as _describe
from rayflow.errors import BuildError

__all__ = [
    "Collect",
    "Count",
    "Fold",
    "Reduce",
    "Result",
    "Session",
    "Sliding",
    "Sum",
    "Tumbling",
]


class Result(NamedTuple):
    """One window's output: ``[start, end)`` in seconds since the epoch, and its value."""

    start: float
    end: float
    value: Any


# -- windowers ---------------------------------------------------------------------


@dataclass(frozen=True)
class Tumbling:
    """Back-to-back windows of ``size_s`` seconds, shifted by ``offset_s``.

    Boundaries are ``n * size_s + offset_s``: ``Tumbling(86400.0, offset_s=3600.0)``
    gives days that start at 01:00 UTC.
    """

    size_s: float
    _: KW_ONLY
    offset_s: float = 0.0

    def __post_init__(self) -> None:
        where = f"Tumbling(size_s={self.size_s!r}, offset_s={self.offset_s!r})"
        _set(self, "size_s", _positive(where, "size_s", self.size_s, "e.g. Tumbling(60.0)"))
        _set(self, "offset_s", _finite(where, "offset_s", self.offset_s))


@dataclass(frozen=True)
class Sliding:
    """Windows of ``size_s`` seconds, one starting every ``every_s`` seconds.

    A record belongs to every window that contains it (about
    ``size_s / every_s`` of them); ``every_s == size_s`` is ``Tumbling``.
    """

    size_s: float
    every_s: float
    _: KW_ONLY
    offset_s: float = 0.0

    def __post_init__(self) -> None:
        where = (
            f"Sliding(size_s={self.size_s!r}, every_s={self.every_s!r}, offset_s={self.offset_s!r})"
        )
        size = _positive(where, "size_s", self.size_s, "e.g. Sliding(300.0, every_s=60.0)")
        every = _positive(where, "every_s", self.every_s, "e.g. Sliding(300.0, every_s=60.0)")
        if every > size:
            raise BuildError(
                f"{where}: every_s must be <= size_s (windows of {size:g} s every {every:g} s "
                "would skip the records between them); use a smaller every_s, or "
                f"Tumbling({size!r}) for back-to-back windows"
            )
        _set(self, "size_s", size)
        _set(self, "every_s", every)
        _set(self, "offset_s", _finite(where, "offset_s", self.offset_s))


@dataclass(frozen=True)
class Session:
    """Per key, records closer than ``gap_s`` seconds to each other form one window.

    A session ends ``gap_s`` after its last record: ``[first, last + gap_s)``.
    """

    gap_s: float

    def __post_init__(self) -> None:
        where = f"Session(gap_s={self.gap_s!r})"
        _set(self, "gap_s", _positive(where, "gap_s", self.gap_s, "e.g. Session(gap_s=1800.0)"))


Windower = Tumbling | Sliding | Session


# -- aggregators -------------------------------------------------------------------


@dataclass(frozen=True)
class Count:
    """The number of records in the window."""


@dataclass(frozen=True)
class Sum:
    """The sum of ``fn(record)`` over the window (of the records when ``fn`` is None)."""

    fn: Callable[[Any], Any] | None = None

    def __post_init__(self) -> None:
        if self.fn is not None:
            _check_function("Sum", "fn", self.fn, 1, "a function record -> number")


@dataclass(frozen=True)
class Fold:
    """``fn(acc, record)`` over the window's records, starting from ``initial``.

    ``merge(acc1, acc2)`` combines the accumulators of two sessions that a
    record bridges; without it a ``Session`` window keeps its records and
    folds them (in timestamp order) when it fires.
    """

    fn: Callable[[Any, Any], Any]
    initial: Any
    _: KW_ONLY
    merge: Callable[[Any, Any], Any] | None = None

    def __post_init__(self) -> None:
        _check_function("Fold", "fn", self.fn, 2, "a function (acc, record) -> new acc")
        if self.merge is not None:
            _check_function("Fold", "merge", self.merge, 2, "a function (acc1, acc2) -> acc")


@dataclass(frozen=True)
class Reduce:
    """``fn(acc, record)`` over the window's records, starting from the first one."""

    fn: Callable[[Any, Any], Any]

    def __post_init__(self) -> None:
        _check_function("Reduce", "fn", self.fn, 2, "a function (acc, record) -> new acc")


@dataclass(frozen=True)
class Collect:
    """The list of the window's records, in timestamp order (ties: arrival order)."""


Aggregator = Count | Sum | Fold | Reduce | Collect


# -- checks ------------------------------------------------------------------------


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # a frozen dataclass normalizing its own fields


def _number(where: str, what: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise BuildError(f"{where}: {what} must be a number of seconds; got {_describe(value)}")
    if not math.isfinite(value):
        raise BuildError(f"{where}: {what} must be a finite number of seconds; got {value!r}")
    return float(value)


def _positive(where: str, what: str, value: Any, example: str) -> float:
    seconds = _number(where, what, value)
    if seconds <= 0:
        raise BuildError(f"{where}: {what} must be > 0 seconds; got {value!r} ({example})")
    return seconds


def _finite(where: str, what: str, value: Any) -> float:
    return _number(where, what, value)


def _check_function(cls: str, what: str, fn: Any, arity: int, expected: str) -> None:
    if not callable(fn):
        raise BuildError(f"{cls}: {what} must be {expected}; got {_describe(fn)}")
    mismatch = arity_mismatch(fn, arity)
    if mismatch is not None:
        raise BuildError(
            f"{cls}: {what} must be {expected}, taking {arity} argument"
            f"{'s' if arity > 1 else ''}; {mismatch}"
        )
