"""Event-time steps: ``WindowOp`` (``KeyedStream.window``) and ``ProcessOp`` (``.process``).

Both are keyed steps whose input items are ``(key, record)`` pairs and whose
state is ``self.state.values`` (one plain value per key, snapshotted per key
like any keyed step's). The logic is in :mod:`rayflow._internal.eventtime`;
these classes adapt it to the operator API. The runtime drives them with:

- ``feed(items)``: records, handled at the current watermark. A window step
  emits nothing here (results come at watermark time) and sends its late
  records, as ``(key, record)``, to ``late_downstream`` (counted in
  ``records_late``). A process step emits what ``on_record`` returned.
- ``advance(watermark)``: raise ``watermark`` (never lower it) and fire what
  is due: ``(key, rf.windows.Result(start, end, value))`` items, or
  ``(key, output)`` from ``on_timer``. Keys whose state changed or was
  deleted are recorded for incremental snapshots.
- Errors of user functions are ``UserCodeError``s naming the step. From
  ``feed``: ``index`` is the failing record's position in the batch and
  ``partial`` what the records before it produced (their late records are
  already sent), as the other steps do, so that ``on_error`` can set the
  record aside and feed the rest. From ``advance`` (an aggregator's result,
  ``on_timer``): what fired before is emitted, the failing window or timer
  is dropped, and calling ``advance`` again goes on with the rest.
- ``watermark``: restored by the runtime with the state; after replacing
  ``state.values`` it calls ``restored()``, which rebuilds the indexes
  (heaps of what fires when) from the values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from rayflow._internal.eventtime import UserFunctionError
from rayflow._internal.eventtime.timers import KeyedTimers, OnRecord, OnTimer
from rayflow._internal.eventtime.windowing import AlignedWindows, Engine, make_engine
from rayflow._internal.runtime.operators import Feed, KeyedOp, UserCodeError
from rayflow.errors import BuildError
from rayflow.windows import Aggregator, Windower


class _EventTimeOp(KeyedOp):
    """What both steps share: a watermark, late records, user errors named by step."""

    __slots__ = ("_logic", "late_downstream", "records_late", "watermark")

    def __init__(self, name: str, logic: Engine | KeyedTimers):
        super().__init__(name)
        self._logic = logic  # what fires on the watermark: windows, or timers
        self.watermark = -math.inf
        self.late_downstream: list[Feed] = []
        self.records_late = 0

    def advance(self, watermark: float) -> None:
        if watermark > self.watermark:
            self.watermark = watermark
        try:
            out = self._logic.fire(self.state.values, self.watermark, self._changed)
        except UserFunctionError as exc:
            self._fired_before(exc)
            raise self._user_error(exc, []) from exc.cause
        if out:
            self.emit(out)

    def restored(self) -> None:
        self._logic.rebuild(self.state.values)

    def _late(self, late: list[Any]) -> None:
        self.records_late += len(late)
        for target in self.late_downstream:
            target(late)

    def _fired_before(self, error: UserFunctionError) -> None:
        """A user function failed while firing: emit what fired before it. The
        failing window (or timer) is gone; ``advance`` may be called again to go on."""
        if error.partial:
            self.emit(error.partial)

    def _user_error(self, error: UserFunctionError, partial: list[Any]) -> UserCodeError:
        return UserCodeError(
            self.name,
            error.record,
            error.cause,
            what=error.what,
            index=error.index,
            partial=partial,
        )


class WindowOp(_EventTimeOp):
    """Aggregates each key's records per event-time window; emits a Result per window."""

    __slots__ = ("_combined", "_engine")

    def __init__(
        self,
        name: str,
        windower: Windower,
        aggregator: Aggregator,
        allowed_lateness_s: float,
        ts_fn: Callable[[Any], Any],
        combined: bool = False,
    ):
        self._engine: Engine = make_engine(name, windower, aggregator, allowed_lateness_s, ts_fn)
        # Fed partials by combining senders (eventtime/combine.py): Tumbling windows only.
        self._combined: AlignedWindows | None = None
        if combined:
            assert isinstance(self._engine, AlignedWindows)
            self._combined = self._engine
        super().__init__(name, self._engine)

    @property
    def partials_in(self) -> int | None:
        """How many partials came (metrics); None for a window that takes none."""
        return self._combined.partials if self._combined is not None else None

    def no_partials(self) -> None:
        """No partial can come: the window runs in its senders' actor (no shuffle before
        it), and skips looking for them."""
        self._combined = None

    def apply(self, items: list[Any]) -> list[Any]:
        try:
            if self._combined is not None:
                late = self._add_combined(self._combined, items)
            else:
                late = self._engine.add(items, self.state.values, self.watermark)
        except UserFunctionError as exc:
            if exc.partial:  # the late records before the failing one are out already
                self._late(exc.partial)
            raise self._user_error(exc, []) from exc.cause
        if late:
            self._late(late)
        return []

    def _add_combined(self, engine: AlignedWindows, items: list[Any]) -> list[Any]:
        folded, partials = engine.folded, engine.partials
        try:
            return engine.add_combined(items, self.state.values, self.watermark)
        finally:
            # records_in counts records, not partials: each one stood for several.
            self.records_in += (engine.folded - folded) - (engine.partials - partials)


class ProcessOp(_EventTimeOp):
    """Runs ``on_record`` per record and ``on_timer`` per due event-time timer.

    It has no late records (``on_record`` sees every record, and can compare
    ``ctx.timestamp`` with ``ctx.watermark``); ``late_downstream`` stays unused.
    """

    __slots__ = ("_timers",)

    def __init__(
        self,
        name: str,
        on_record: OnRecord,
        on_timer: OnTimer,
        ts_fn: Callable[[Any], Any],
    ):
        for what, fn in (("on_record", on_record), ("on_timer", on_timer), ("ts_fn", ts_fn)):
            if not callable(fn):
                raise BuildError(f"step {name!r}: {what} must be a function; got {fn!r}")
        self._timers = KeyedTimers(name, on_record, on_timer, ts_fn)
        super().__init__(name, self._timers)

    def apply(self, items: list[Any]) -> list[Any]:
        try:
            return self._timers.add(items, self.state.values, self.watermark)
        except UserFunctionError as exc:
            raise self._user_error(exc, exc.partial) from exc.cause
