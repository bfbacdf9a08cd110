"""Event-time timers for ``KeyedStream.process(name, on_record, on_timer)``.

The user writes two functions::

    on_record(state, record, ctx) -> (state, outputs)
    on_timer(state, timestamp, ctx) -> (state, outputs)

``state`` is the key's value (None when the key has none); returning None
deletes it. ``outputs`` is an iterable of records, each emitted as
``(key, output)``. ``ctx`` (:class:`TimerContext`) carries ``key``,
``timestamp`` (the record's event time in ``on_record``, the timer's time
in ``on_timer``), ``watermark``, and ``set_timer(ts)`` /
``delete_timer(ts)`` for the current key.

Rules:

- ``values[key]`` is ``(user_state, timers)``: ``timers`` a set of float
  timestamps, or None when the key has none. A key whose state is None and
  that has no timers is removed from ``values``.
- A timer is one per (key, timestamp): setting it twice is one timer.
  It fires once, when the watermark ``W >= ts``. Timers due at one advance
  fire in timestamp order, then in the order they were set (deterministic
  for a given sequence of calls; after a restore, timers of the same time
  fire in the order of ``values``).
- A timer set at or before the current ``W`` fires at the next advance (in
  ``on_record``: the next watermark; in ``on_timer``: the same advance,
  which loops until no timer is due). An advance in which ``on_timer`` sets
  more than :data:`MAX_REARMS` such timers fails with a
  :class:`TimerLoopError`, rather than spinning forever on a timer that
  re-arms itself.
- Timer timestamps are converted like record timestamps (int, float or
  datetime); ``float("inf")`` is also allowed: it fires when the input ends.
- Every record is passed to ``on_record``, however late: the function
  decides with ``ctx.watermark``.
- The heap of ``(ts, seq, key)`` is derived from ``values``: rebuilt by
  :meth:`KeyedTimers.rebuild`; entries of deleted timers are skipped when they
  come up.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from heapq import heapify, heappop, heappush
from typing import Any

from rayflow._internal.eventtime import UserFunctionError
from rayflow._internal.eventtime.timestamps import to_seconds
from rayflow._internal.runtime import nondeterminism

Items = list[Any]
OnRecord = Callable[[Any, Any, "TimerContext"], tuple[Any, Iterable[Any]]]
OnTimer = Callable[[Any, float, "TimerContext"], tuple[Any, Iterable[Any]]]

#: Timers ``on_timer`` may set at or before the watermark in one advance.
MAX_REARMS = 10_000


class TimerLoopError(RuntimeError):
    """``on_timer`` kept setting timers that were already due."""


class TimerContext:
    """What ``on_record`` and ``on_timer`` get as ``ctx``; one per operator, reused."""

    __slots__ = ("_firing", "_owner", "_timers", "key", "timestamp", "watermark")

    def __init__(self, owner: KeyedTimers):
        self._owner = owner
        self._timers: set[float] | None = None
        self._firing = False
        self.key: Any = None
        self.timestamp: float = -math.inf
        self.watermark: float = -math.inf

    def set_timer(self, ts: Any) -> None:
        """Fire ``on_timer`` for this key when the watermark reaches ``ts``."""
        owner = self._owner
        when = math.inf if ts == math.inf else to_seconds(ts, owner.step, "set_timer got")
        timers = self._timers
        if timers is None:
            timers = self._timers = set()
        elif when in timers:
            return
        timers.add(when)
        heappush(owner.heap, (when, next(owner.seq), self.key))
        if self._firing and when <= self.watermark:
            owner.rearms += 1
            if owner.rearms > MAX_REARMS:
                raise TimerLoopError(
                    f"step {owner.step!r}: on_timer set more than {MAX_REARMS} timers at or "
                    f"before the watermark {self.watermark!r} in one advance (the last one "
                    f"at {when!r} for key {self.key!r}); a timer set at or before "
                    "ctx.watermark fires at once: set the next one after ctx.watermark"
                )

    def now(self) -> float:
        """The wall-clock time (seconds since the epoch). Use this, not ``time.time()``:
        after a partition is restarted alone, the replay gets the same values back."""
        return nondeterminism.CURRENT.now()

    def random(self) -> float:
        """A random float in [0, 1), replayed like :meth:`now`."""
        return nondeterminism.CURRENT.random()

    def delete_timer(self, ts: Any) -> None:
        """Cancel this key's timer at ``ts``, if there is one."""
        if self._timers:
            when = (
                math.inf if ts == math.inf else to_seconds(ts, self._owner.step, "delete_timer got")
            )
            self._timers.discard(when)

    def __repr__(self) -> str:
        return (
            f"TimerContext(key={self.key!r}, timestamp={self.timestamp!r}, "
            f"watermark={self.watermark!r}, timers={sorted(self._timers or ())!r})"
        )


class KeyedTimers:
    """Runs ``on_record``/``on_timer`` over ``values`` and keeps the timer heap."""

    def __init__(
        self, step: str, on_record: OnRecord, on_timer: OnTimer, ts_fn: Callable[[Any], Any]
    ):
        self.step = step
        self.on_record = on_record
        self.on_timer = on_timer
        self.ts_fn = ts_fn
        self.heap: list[tuple[float, int, Any]] = []
        self.seq = itertools.count()
        self.rearms = 0
        self.ctx = TimerContext(self)

    def add(self, items: Items, values: dict[Any, Any], watermark: float) -> Items:
        """Run ``on_record`` on ``(key, record)`` items; return ``(key, output)`` items."""
        ts_fn, step, on_record = self.ts_fn, self.step, self.on_record
        get = values.get
        ctx = self.ctx
        ctx.watermark = watermark
        ctx._firing = False
        out: Items = []
        kv: Any = None
        try:
            for kv in items:
                key, record = kv
                t = ts_fn(record)
                if t.__class__ is not float or t - t:
                    t = to_seconds(t, step)
                entry = get(key)
                state, timers = (None, None) if entry is None else entry
                ctx.key = key
                ctx.timestamp = t
                ctx._timers = timers
                state, outputs = _pair("on_record", on_record(state, record, ctx))
                _store(values, key, state, ctx._timers)
                if outputs:
                    out.extend([(key, o) for o in outputs])
        except Exception as exc:
            raise UserFunctionError.in_batch(items, kv, exc, out) from exc
        finally:
            ctx._timers = None
        return out

    def fire(self, values: dict[Any, Any], watermark: float, changed: set[Any] | None) -> Items:
        """Fire the timers due at ``watermark`` (and those they set that are due too)."""
        heap = self.heap
        if not heap or heap[0][0] > watermark:
            return []
        on_timer = self.on_timer
        get = values.get
        ctx = self.ctx
        ctx.watermark = watermark
        ctx._firing = True
        self.rearms = 0
        out: Items = []
        key: Any = None
        ts = -math.inf
        try:
            while heap and heap[0][0] <= watermark:
                ts, _, key = heappop(heap)
                entry = get(key)
                if entry is None:
                    continue  # stale: the key is gone
                state, timers = entry
                if not timers or ts not in timers:
                    continue  # stale: deleted, or already fired
                timers.discard(ts)
                ctx.key = key
                ctx.timestamp = ts
                ctx._timers = timers
                state, outputs = _pair("on_timer", on_timer(state, ts, ctx))
                _store(values, key, state, ctx._timers)
                if changed is not None:
                    changed.add(key)
                if outputs:
                    out.extend([(key, o) for o in outputs])
        except Exception as exc:
            raise UserFunctionError(
                key,
                exc,
                what=f"on_timer at {ts!r} for key {key!r} (watermark {watermark!r})",
                partial=out,
            ) from exc
        finally:
            ctx._firing = False
            ctx._timers = None
        return out

    def rebuild(self, values: dict[Any, Any]) -> None:
        self.seq = seq = itertools.count()
        self.heap = [
            (ts, next(seq), key)
            for key, (_, timers) in values.items()
            if timers
            for ts in sorted(timers)
        ]
        heapify(self.heap)


def _pair(what: str, result: Any) -> tuple[Any, Any]:
    try:
        state, outputs = result
    except (TypeError, ValueError):
        raise TypeError(
            f"the {what} function must return a pair (new_state_or_None, outputs); "
            f"it returned {_short(result)}"
        ) from None
    return state, outputs


def _store(values: dict[Any, Any], key: Any, state: Any, timers: set[float] | None) -> None:
    if not timers:
        timers = None
    if state is None and timers is None:
        values.pop(key, None)
    else:
        values[key] = (state, timers)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
