"""Windows over keyed state: assign records, aggregate incrementally, fire on the watermark.

The user-facing meaning is in :mod:`rayflow.windows`; this module is the
machinery, with no Ray in it. The precise rules:

Windows and time
    Times are float seconds. Windows are half-open ``[start, end)``.
    Tumbling: ``start = floor((ts - offset) / size) * size + offset``.
    Sliding: the windows ``[j * every + offset, j * every + offset + size)``
    (``j`` an integer) that contain ``ts``; starts are always computed from
    ``j`` so that every record names a window by the same float.
    Session: a record opens ``[ts, ts + gap)``; every session of the key
    with ``start <= ts + gap`` and ``ts <= end`` (overlapping *or touching*)
    merges with it: ``start`` = min, ``end`` = max.

Watermark and firing
    The watermark ``W`` starts at -inf and never goes back. A window fires
    when ``W >= end + lateness``: it emits ``(key, Result(start, end,
    value))`` exactly once and its state is deleted; a key left without
    windows is removed from ``values`` (state expiry). When one advance fires
    several windows they come out by window end, then (same end) in the order
    the key first entered a window with that end: deterministic for a given
    sequence of calls (after a restore, keys of the same end come in the
    order of ``values``).

Late records
    Records are handled at the current ``W`` (that of the last advance). A
    window is *closed* when ``end + lateness <= W``; since windows fire as
    soon as they are closed, a closed window never takes records again.
    Tumbling: a record is late when its window is closed. Sliding: a record
    goes into its open windows only, and is late when all of them are
    closed. Session: a record is late when its own ``[ts, ts + gap)`` is
    closed and it overlaps or touches no session of its key (every session
    held is open, so a record that reaches one extends it backwards and is
    not late; the merged session may then reach over a session that
    already fired). A late record is returned to the caller as its
    ``(key, value)`` item and changes no state.

State (``values[key]``, plain picklable data)
    Tumbling and Sliding: ``{window start: accumulator}``. Session: a list
    of ``[start, end, accumulator]`` lists, one per open session (disjoint,
    never touching). Accumulators: Count an int; Sum the running sum; Reduce
    the running value; Fold the running value, except in Session windows
    without ``merge``, where it is the list of ``(ts, record)`` (like
    Collect), folded in timestamp order (ties: arrival order) when the
    window fires; Collect the list of ``(ts, record)`` in arrival order,
    sorted by ts (stably) when it fires. When a record merges sessions,
    their accumulators combine in start order (``merge(earlier, later)``:
    addition for Count and Sum, ``fn`` for Reduce, ``merge`` for Fold,
    concatenation for record lists), then the record is added.

Indexes
    What fires when is found through indexes derived from ``values``: for
    aligned windows, a heap of window starts and, per start, the keys (in
    insertion order) that have it; for sessions, a heap of
    ``(end, seq, key, start)``. They are rebuilt by ``rebuild(values)``
    after a restore and tolerate stale entries (lazy deletion: an entry
    whose window is gone is skipped; a session whose end moved on is pushed
    again with its new end).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable
from heapq import heapify, heappop, heappush
from operator import itemgetter
from typing import Any, Protocol

from rayflow._internal.eventtime import UserFunctionError
from rayflow._internal.eventtime.combine import CombineBroken
from rayflow._internal.eventtime.timestamps import to_seconds
from rayflow.errors import BuildError
from rayflow.windows import (
    Aggregator,
    Collect,
    Count,
    Fold,
    Reduce,
    Result,
    Session,
    Sliding,
    Sum,
    Tumbling,
    Windower,
)

Items = list[Any]
_ABSENT: Any = object()
_IMMUTABLE = (int, float, complex, str, bytes, bool, type(None), tuple, frozenset)
_ts_of = itemgetter(0)
#: Builds a Result without NamedTuple's Python-level ``__new__`` (a third of firing's cost).
new_result = tuple.__new__


# -- aggregation kernels ---------------------------------------------------------------


class Kernel:
    """How one aggregator builds, extends, merges and finishes an accumulator.

    ``create``/``add`` get the record's timestamp too, for the kernels that
    keep records; ``add`` may mutate ``acc`` and returns the accumulator.
    """

    def create(self, ts: float, record: Any) -> Any:
        raise NotImplementedError

    def add(self, acc: Any, ts: float, record: Any) -> Any:
        raise NotImplementedError

    def merge(self, first: Any, second: Any) -> Any:
        raise NotImplementedError

    def result(self, acc: Any) -> Any:
        return acc


class CountKernel(Kernel):
    def create(self, ts: float, record: Any) -> Any:
        return 1

    def add(self, acc: Any, ts: float, record: Any) -> Any:
        return acc + 1

    def merge(self, first: Any, second: Any) -> Any:
        return first + second


class SumKernel(Kernel):
    def __init__(self, fn: Callable[[Any], Any] | None):
        self.fn = fn

    def create(self, ts: float, record: Any) -> Any:
        return record if self.fn is None else self.fn(record)

    def add(self, acc: Any, ts: float, record: Any) -> Any:
        return acc + (record if self.fn is None else self.fn(record))

    def merge(self, first: Any, second: Any) -> Any:
        return first + second


class FoldKernel(Kernel):
    def __init__(self, fold: Fold):
        self.fn = fold.fn
        self.initial = fold.initial
        self.merge_fn = fold.merge
        self.copy_initial = not isinstance(fold.initial, _IMMUTABLE)

    def create(self, ts: float, record: Any) -> Any:
        initial = copy.deepcopy(self.initial) if self.copy_initial else self.initial
        return self.fn(initial, record)

    def add(self, acc: Any, ts: float, record: Any) -> Any:
        return self.fn(acc, record)

    def merge(self, first: Any, second: Any) -> Any:
        assert self.merge_fn is not None, "a Fold without merge buffers its session records"
        return self.merge_fn(first, second)


class ReduceKernel(Kernel):
    def __init__(self, fn: Callable[[Any, Any], Any]):
        self.fn = fn

    def create(self, ts: float, record: Any) -> Any:
        return record

    def add(self, acc: Any, ts: float, record: Any) -> Any:
        return self.fn(acc, record)

    def merge(self, first: Any, second: Any) -> Any:
        return self.fn(first, second)


class CollectKernel(Kernel):
    """Keeps ``(ts, record)`` in arrival order; the result is sorted by ts (stable)."""

    def create(self, ts: float, record: Any) -> Any:
        return [(ts, record)]

    def add(self, acc: Any, ts: float, record: Any) -> Any:
        acc.append((ts, record))
        return acc

    def merge(self, first: Any, second: Any) -> Any:
        return first + second

    def result(self, acc: Any) -> Any:
        return [record for _, record in sorted(acc, key=_ts_of)]


class BufferedFoldKernel(CollectKernel):
    """A Fold without ``merge`` in Session windows: keeps the records, folds them at firing."""

    def __init__(self, fold: Fold):
        self.fold = FoldKernel(fold)

    def result(self, acc: Any) -> Any:
        fn = self.fold.fn
        value = copy.deepcopy(self.fold.initial) if self.fold.copy_initial else self.fold.initial
        for _, record in sorted(acc, key=_ts_of):
            value = fn(value, record)
        return value


def kernel_for(aggregator: Aggregator, *, merging: bool) -> Kernel:
    """The kernel of ``aggregator``; ``merging`` is True for Session windows."""
    if isinstance(aggregator, Count):
        return CountKernel()
    if isinstance(aggregator, Sum):
        return SumKernel(aggregator.fn)
    if isinstance(aggregator, Fold):
        if merging and aggregator.merge is None:
            return BufferedFoldKernel(aggregator)
        return FoldKernel(aggregator)
    if isinstance(aggregator, Reduce):
        return ReduceKernel(aggregator.fn)
    if isinstance(aggregator, Collect):
        return CollectKernel()
    raise BuildError(
        "the aggregator must be one of rf.windows.Count(), Sum(fn), Fold(fn, initial), "
        f"Reduce(fn), Collect(); got {type(aggregator).__name__} {aggregator!r}"
    )


# -- engines ---------------------------------------------------------------------------


class Engine(Protocol):
    """What the window operator drives; ``values`` is the operator's per-key state."""

    def add(self, items: Items, values: dict[Any, Any], watermark: float) -> Items:
        """Add ``(key, record)`` items at watermark ``watermark``; return the late ones."""
        ...

    def fire(self, values: dict[Any, Any], watermark: float, changed: set[Any] | None) -> Items:
        """Fire the windows closed at ``watermark``: ``(key, Result)`` items, by window end."""
        ...

    def rebuild(self, values: dict[Any, Any]) -> None:
        """Rebuild the indexes from ``values`` (after a restore)."""
        ...


def check_lateness(step: str, allowed_lateness_s: Any) -> float:
    if (
        not isinstance(allowed_lateness_s, (int, float))
        or isinstance(allowed_lateness_s, bool)
        or not math.isfinite(allowed_lateness_s)
        or allowed_lateness_s < 0
    ):
        raise BuildError(
            f"step {step!r}: allowed_lateness_s must be a finite number of seconds >= 0; "
            f"got {allowed_lateness_s!r}"
        )
    return float(allowed_lateness_s)


def make_engine(
    step: str,
    windower: Windower,
    aggregator: Aggregator,
    allowed_lateness_s: float,
    ts_fn: Callable[[Any], Any],
) -> Engine:
    """The engine for one window step; arguments are checked here too."""
    lateness = check_lateness(step, allowed_lateness_s)
    if not callable(ts_fn):
        raise BuildError(f"step {step!r}: the timestamp function is not callable: {ts_fn!r}")
    if isinstance(windower, (Tumbling, Sliding)):
        return AlignedWindows(
            step, windower, kernel_for(aggregator, merging=False), lateness, ts_fn
        )
    if isinstance(windower, Session):
        return SessionWindows(step, windower, kernel_for(aggregator, merging=True), lateness, ts_fn)
    raise BuildError(
        f"step {step!r}: the windower must be rf.windows.Tumbling(size_s), "
        f"Sliding(size_s, every_s) or Session(gap_s); got {type(windower).__name__} {windower!r}"
    )


class AlignedWindows:
    """Tumbling and Sliding windows: ``values[key] = {window start: accumulator}``.

    Index: ``_starts``, a heap of the window starts that have keys, and
    ``_keys[start]``, those keys (a dict used as an insertion-ordered set).
    """

    def __init__(
        self,
        step: str,
        windower: Tumbling | Sliding,
        kernel: Kernel,
        lateness: float,
        ts_fn: Callable[[Any], Any],
    ):
        self.step = step
        self.size = windower.size_s
        self.every = windower.every_s if isinstance(windower, Sliding) else windower.size_s
        self.offset = windower.offset_s
        self.close = self.size + lateness  # [start, start + size) closes at W >= start + close
        self.kernel = kernel
        self.ts_fn = ts_fn
        self._starts: list[float] = []
        self._keys: dict[float, dict[Any, None]] = {}
        self.partials = 0  # partials merged by add_combined, and the records in them
        self.folded = 0

    def add(self, items: Items, values: dict[Any, Any], watermark: float) -> Items:
        if self.every != self.size:
            return self._add_sliding(items, values, watermark)
        if type(self.kernel) is CountKernel:
            return self._add_tumbling_count(items, values, watermark)
        return self._add_tumbling(items, values, watermark)

    def add_combined(self, items: Items, values: dict[Any, Any], watermark: float) -> Items:
        """``add`` for a window fed by combining senders (eventtime/combine.py):
        partials are merged into their windows, runs of records added as ``add``
        does, in order (a failing record's ``index`` is its place in ``items``).
        Returns the late records; ``partials`` and ``folded`` count the partials
        merged and the records they stood for."""
        late: Items = []
        begin = 0  # the first record of the run not added yet
        for i, kv in enumerate(items):
            if len(kv) == 2:
                continue  # a record
            if begin < i:
                late += self._add_run(items, begin, i, values, watermark, late)
            begin = i + 1
            self.folded += self._merge_partial(kv, values, watermark)
            self.partials += 1
        if begin < len(items):
            late += self._add_run(items, begin, len(items), values, watermark, late)
        return late

    def _add_run(
        self,
        items: Items,
        begin: int,
        end: int,
        values: dict[Any, Any],
        watermark: float,
        late: Items,
    ) -> Items:
        run = items[begin:end]
        try:
            return self.add(run, values, watermark)
        except UserFunctionError as exc:
            if exc.index is not None:
                exc.index += begin
            exc.partial = late + exc.partial
            raise

    def _merge_partial(
        self, partial: tuple[Any, float, Any, int], values: dict[Any, Any], watermark: float
    ) -> int:
        key, start, acc, n = partial
        if start + self.close <= watermark:
            # The sender combines only what cannot be closed here (combine.py):
            # failing beats counting records as on time that a window missed.
            raise CombineBroken(
                f"step {self.step!r}: a partial of {n} records for window "
                f"[{start}, {start + self.size}) came after it closed at watermark "
                f"{watermark}; combining before the shuffle broke its rule"
            )
        windows = values.get(key)
        if windows is None:
            values[key] = {start: acc}
        else:
            have = windows.get(start, _ABSENT)
            if have is not _ABSENT:
                try:
                    windows[start] = self.kernel.merge(have, acc)
                except Exception as exc:
                    raise CombineBroken(
                        f"step {self.step!r}: cannot add the partial sum {acc!r} of {n} "
                        f"records (combined before the shuffle) to {have!r} for key {key!r}: "
                        f"{type(exc).__name__}: {exc}; with combine=True the values of a "
                        "Sum must add up with each other; use combine=False to have "
                        "on_error set such records aside one by one"
                    ) from exc
                return n
            windows[start] = acc
        self._index(key, start)
        return n

    def _index(self, key: Any, start: float) -> None:
        keys = self._keys.get(start)
        if keys is None:
            self._keys[start] = {key: None}
            heappush(self._starts, start)
        else:
            keys[key] = None

    def _add_tumbling_count(self, items: Items, values: dict[Any, Any], watermark: float) -> Items:
        # The hot path of the benchmark: everything bound locally, no call per record
        # but the user's timestamp function.
        ts_fn, step = self.ts_fn, self.step
        size, offset, close = self.size, self.offset, self.close
        get = values.get
        index = self._keys
        index_get = index.get
        starts = self._starts
        late: Items = []
        kv: Any = None
        try:
            for kv in items:
                key, record = kv
                t = ts_fn(record)
                if t.__class__ is not float or t - t:  # not a float, or NaN/inf
                    t = to_seconds(t, step)
                start = (t - offset) // size * size + offset
                if start + close <= watermark:
                    late.append(kv)
                    continue
                windows = get(key)
                if windows is None:
                    values[key] = {start: 1}
                else:
                    n = windows.get(start)
                    if n is not None:
                        windows[start] = n + 1
                        continue
                    windows[start] = 1
                keys = index_get(start)
                if keys is None:
                    index[start] = {key: None}
                    heappush(starts, start)
                else:
                    keys[key] = None
        except Exception as exc:
            raise UserFunctionError.in_batch(items, kv, exc, late) from exc
        return late

    def _add_tumbling(self, items: Items, values: dict[Any, Any], watermark: float) -> Items:
        ts_fn, step = self.ts_fn, self.step
        size, offset, close = self.size, self.offset, self.close
        create, add = self.kernel.create, self.kernel.add
        get = values.get
        index = self._keys
        index_get = index.get
        starts = self._starts
        late: Items = []
        kv: Any = None
        try:
            for kv in items:
                key, record = kv
                t = ts_fn(record)
                if t.__class__ is not float or t - t:
                    t = to_seconds(t, step)
                start = (t - offset) // size * size + offset
                if start + close <= watermark:
                    late.append(kv)
                    continue
                windows = get(key)
                if windows is None:
                    values[key] = {start: create(t, record)}
                else:
                    acc = windows.get(start, _ABSENT)
                    if acc is not _ABSENT:
                        windows[start] = add(acc, t, record)
                        continue
                    windows[start] = create(t, record)
                keys = index_get(start)
                if keys is None:
                    index[start] = {key: None}
                    heappush(starts, start)
                else:
                    keys[key] = None
        except Exception as exc:
            raise UserFunctionError.in_batch(items, kv, exc, late) from exc
        return late

    def _add_sliding(self, items: Items, values: dict[Any, Any], watermark: float) -> Items:
        ts_fn, step = self.ts_fn, self.step
        size, every, offset, close = self.size, self.every, self.offset, self.close
        create, add = self.kernel.create, self.kernel.add
        counting = type(self.kernel) is CountKernel
        index = self._keys
        starts = self._starts
        late: Items = []
        kv: Any = None
        try:
            for kv in items:
                key, record = kv
                t = ts_fn(record)
                if t.__class__ is not float or t - t:
                    t = to_seconds(t, step)
                j = (t - offset) // every  # the latest window containing t starts at j
                start = j * every + offset
                if start + close <= watermark:  # the latest window is closed: all are
                    late.append(kv)
                    continue
                windows = values.get(key)
                if windows is None:
                    windows = values[key] = {}
                while True:
                    acc = windows.get(start, _ABSENT)
                    if counting and acc is not _ABSENT:
                        windows[start] = acc + 1  # Count without a call per window
                    elif acc is _ABSENT:
                        windows[start] = create(t, record)
                        keys = index.get(start)
                        if keys is None:
                            index[start] = {key: None}
                            heappush(starts, start)
                        else:
                            keys[key] = None
                    else:
                        windows[start] = add(acc, t, record)
                    j -= 1
                    start = j * every + offset
                    if start + size <= t or start + close <= watermark:
                        break  # past the first window holding t, or closed (so all before)
        except Exception as exc:
            raise UserFunctionError.in_batch(items, kv, exc, late) from exc
        return late

    def fire(self, values: dict[Any, Any], watermark: float, changed: set[Any] | None) -> Items:
        starts = self._starts
        close = self.close
        if not starts or starts[0] + close > watermark:
            return []
        size = self.size
        index = self._keys
        result = None if type(self.kernel) is CountKernel else self.kernel.result
        get = values.get
        out: Items = []
        append = out.append
        while starts and starts[0] + close <= watermark:
            start = heappop(starts)
            keys = index.pop(start, None)
            if not keys:
                continue
            end = start + size
            for key in keys:
                windows = get(key)
                if windows is None:
                    continue  # stale
                acc = windows.pop(start, _ABSENT)
                if acc is _ABSENT:
                    continue  # stale
                if not windows:
                    del values[key]
                if changed is not None:
                    changed.add(key)
                if result is not None:
                    try:
                        acc = _finish(result, acc, key, start, end, out)
                    except UserFunctionError:
                        # The keys after this one still have this window: keep them
                        # indexed, so that advancing again goes on with them.
                        rest = list(keys)
                        rest = rest[rest.index(key) + 1 :]
                        if rest:
                            index[start] = dict.fromkeys(rest)
                            heappush(starts, start)
                        raise
                append((key, new_result(Result, (start, end, acc))))
        return out

    def rebuild(self, values: dict[Any, Any]) -> None:
        index: dict[float, dict[Any, None]] = {}
        for key, windows in values.items():
            for start in windows:
                keys = index.get(start)
                if keys is None:
                    index[start] = {key: None}
                else:
                    keys[key] = None
        self._keys = index
        self._starts = list(index)
        heapify(self._starts)


class SessionWindows:
    """Session windows: ``values[key] = [[start, end, accumulator], ...]`` (open sessions).

    Index: a heap of ``(end, seq, key, start)``, a session being known by its
    key and start. A session that grows forwards keeps its entry (the entry
    is pushed again with the new end when it comes up); one that grows
    backwards gets a new entry, the old one going stale.
    """

    def __init__(
        self,
        step: str,
        windower: Session,
        kernel: Kernel,
        lateness: float,
        ts_fn: Callable[[Any], Any],
    ):
        self.step = step
        self.gap = windower.gap_s
        self.lateness = lateness
        self.kernel = kernel
        self.ts_fn = ts_fn
        self._heap: list[tuple[float, int, Any, float]] = []
        self._seq = itertools.count()

    def add(self, items: Items, values: dict[Any, Any], watermark: float) -> Items:
        ts_fn, step = self.ts_fn, self.step
        gap, lateness = self.gap, self.lateness
        create, add = self.kernel.create, self.kernel.add
        get = values.get
        heap, seq = self._heap, self._seq
        late: Items = []
        kv: Any = None
        try:
            for kv in items:
                key, record = kv
                t = ts_fn(record)
                if t.__class__ is not float or t - t:
                    t = to_seconds(t, step)
                hi = t + gap
                sessions = get(key)
                hit = None
                more: list[list[Any]] | None = None
                if sessions is not None:
                    for s in sessions:
                        if s[0] <= hi and t <= s[1]:
                            if hit is None:
                                hit = s
                            elif more is None:
                                more = [s]
                            else:
                                more.append(s)
                if hit is None:
                    if hi + lateness <= watermark:
                        late.append(kv)
                        continue
                    session = [t, hi, create(t, record)]
                    if sessions is None:
                        values[key] = [session]
                    else:
                        sessions.append(session)
                    heappush(heap, (hi, next(seq), key, t))
                    continue
                if more is not None:
                    assert sessions is not None
                    hit = self._merge(sessions, [hit, *more])
                hit[2] = add(hit[2], t, record)
                if hi > hit[1]:
                    hit[1] = hi
                if t < hit[0]:
                    hit[0] = t
                    heappush(heap, (hit[1], next(seq), key, t))
        except Exception as exc:
            raise UserFunctionError.in_batch(items, kv, exc, late) from exc
        return late

    def _merge(self, sessions: list[list[Any]], group: list[list[Any]]) -> list[Any]:
        """Merge ``group`` (sessions of one key) into its earliest one, which stays
        in ``sessions`` (so its heap entry stays valid); the others are removed."""
        group.sort(key=_ts_of)
        first = group[0]
        merge = self.kernel.merge
        acc = first[2]
        for s in group[1:]:
            acc = merge(acc, s[2])
            if s[1] > first[1]:
                first[1] = s[1]
        first[2] = acc
        gone = {id(s) for s in group[1:]}
        sessions[:] = [s for s in sessions if id(s) not in gone]
        return first

    def fire(self, values: dict[Any, Any], watermark: float, changed: set[Any] | None) -> Items:
        heap = self._heap
        lateness = self.lateness
        if not heap or heap[0][0] + lateness > watermark:
            return []
        result = self.kernel.result
        seq = self._seq
        get = values.get
        out: Items = []
        while heap and heap[0][0] + lateness <= watermark:
            end, _, key, start = heappop(heap)
            sessions = get(key)
            if sessions is None:
                continue  # stale
            for i in range(len(sessions)):
                s = sessions[i]
                if s[0] == start:
                    break
            else:
                continue  # stale: merged into an earlier session, or grew backwards
            if s[1] != end:  # it grew: come back at its real end, in end order
                heappush(heap, (s[1], next(seq), key, start))
                continue
            del sessions[i]
            if not sessions:
                del values[key]
            if changed is not None:
                changed.add(key)
            value = _finish(result, s[2], key, start, end, out)
            out.append((key, new_result(Result, (start, end, value))))
        return out

    def rebuild(self, values: dict[Any, Any]) -> None:
        self._seq = seq = itertools.count()
        self._heap = [(s[1], next(seq), key, s[0]) for key, ss in values.items() for s in ss]
        heapify(self._heap)


def _finish(
    result: Callable[[Any], Any], acc: Any, key: Any, start: float, end: float, out: Items
) -> Any:
    """The window's value; on a user error, ``out`` (what fired before) goes with it."""
    try:
        return result(acc)
    except Exception as exc:
        raise UserFunctionError(
            key, exc, what=f"firing the window [{start!r}, {end!r}) of key {key!r}", partial=out
        ) from exc
