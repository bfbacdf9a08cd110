"""Executable steps: each takes a list of records and feeds its outputs on.

Records move through a fused chain as Python lists; every step processes a
whole batch in one tight loop (no per-record dispatch). An exception from a
user function is wrapped in :class:`UserCodeError`, which remembers the step
and the record that failed.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import operator
import pickle
import time
import traceback
from collections import Counter
from collections.abc import Callable
from typing import Any

from rayflow._internal.eventtime.timestamps import to_seconds
from rayflow._internal.keygroups import stable_hash
from rayflow._internal.runtime.batches import batch_function
from rayflow._internal.runtime.columns import (
    ColumnKey,
    Columns,
    ColumnSum,
    count_rows,
    has_columns,
    rows_in,
    running_sum,
)
from rayflow._internal.spec import MISSING, StepKind, StepSpec, window_params
from rayflow.errors import DeadLetter, Failure
from rayflow.sinks import Sink, SinkContext, SinkWriter

Feed = Callable[[list[Any]], None]

_IMMUTABLE = (int, float, complex, str, bytes, bool, type(None), tuple, frozenset)


def short_repr(value: Any, limit: int = 200) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ must not hide the real error
        text = f"<unrepresentable {type(value).__name__}: {exc}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class UserCodeError(Exception):
    """A user function (or connector) raised while handling a record."""

    def __init__(
        self,
        step: str,
        record: Any,
        cause: BaseException,
        *,
        what: str = "",
        index: int | None = None,
        partial: list[Any] | None = None,
    ):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.step = step
        self.record = record
        self.cause = cause
        self.what = what
        # Where in its batch the failing record was, and what the records before
        # it produced (a step that sets bad records aside goes on from there).
        self.index = index
        self.partial = partial or []

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle their args; ours are keywords and objects that may not
        # pickle (a record, a cause holding a socket). Keep what travels.
        args = (self.step, _portable(self.record), _portable_error(self.cause), self.what)
        return (_rebuild_user_error, args)

    def failure(self, partition: int) -> Failure:
        record = self.what or short_repr(self.record)
        return Failure(
            kind="user",
            message=f"{type(self.cause).__name__}: {self.cause}",
            step=self.step,
            partition=partition,
            record=record,
            error_type=f"{type(self.cause).__module__}.{type(self.cause).__qualname__}",
            traceback="".join(traceback.format_exception(self.cause)),
        )


def _rebuild_user_error(step: str, record: Any, cause: BaseException, what: str) -> UserCodeError:
    return UserCodeError(step, record, cause, what=what)


def _portable(value: Any) -> Any:
    """``value`` if it pickles, else its short repr."""
    try:
        pickle.dumps(value)
        return value
    except Exception:
        return short_repr(value)


def _portable_error(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        error = RuntimeError(f"{type(exc).__qualname__}: {exc}")
        error.__traceback__ = exc.__traceback__
        return error


class Op:
    """One step in an actor; ``downstream`` holds the feeds of what reads it.

    ``on_error`` says what a record the step's function fails on does:
    ``"fail"`` the task, ``"skip"`` it, or ``"dead_letter"`` it (to
    ``dead_downstream``, as a :class:`DeadLetter`); both count in
    ``records_failed``.
    """

    __slots__ = (
        "dead_downstream",
        "downstream",
        "name",
        "on_error",
        "partition",
        "records_failed",
        "records_in",
        "records_out",
    )

    def __init__(self, name: str):
        self.name = name
        self.records_in = 0
        self.records_out = 0
        self.records_failed = 0
        self.downstream: list[Feed] = []
        self.dead_downstream: list[Feed] = []
        self.on_error = "fail"
        self.partition = 0

    def feed(self, items: list[Any]) -> None:
        self.records_in += rows_in(items)
        out = self.apply(items) if self.on_error == "fail" else self._apply_guarded(items)
        if out:
            self.emit(out)

    @property
    def takes_columns(self) -> bool:
        """Whether the step takes chunks of columns (runtime/columns.py) as they are; a
        step that does not gets their rows (the task wires it behind ``exploding``)."""
        return False

    def _feed_chunks(self, items: list[Any], fn: Callable[[Columns], Columns]) -> None:
        """``fn`` on each chunk of a batch of chunks, one chunk out per chunk in; a chunk
        ``fn`` fails on fails the task, or has its rows set aside (``on_error``)."""
        self.records_in += count_rows(items)
        out: list[Any] = []
        for chunk in items:
            try:
                out.append(fn(chunk))
            except Exception as exc:
                what = f"a chunk of {len(chunk)} rows ({short_repr(chunk)})"
                if self.on_error == "fail":
                    raise UserCodeError(self.name, chunk, exc, what=what) from exc
                for record in chunk.rows():
                    self._set_aside(UserCodeError(self.name, record, exc))
        if out:
            self.emit(out)

    def _apply_guarded(self, items: list[Any]) -> list[Any]:
        """``apply``, setting aside every record the function fails on."""
        out: list[Any] = []
        while True:
            try:
                out.extend(self.apply(items))
                return out
            except UserCodeError as exc:
                if exc.step != self.name:
                    raise  # not ours (a fused step downstream failed)
                i = exc.index if exc.index is not None else _index_of(items, exc.record)
                out.extend(exc.partial)
                self._set_aside(exc)
                items = items[i + 1 :]

    def _set_aside(self, exc: UserCodeError) -> None:
        self.records_failed += 1
        if self.on_error != "dead_letter":
            return
        cause = exc.cause
        letter = DeadLetter(
            step=self.name,
            partition=self.partition,
            record=exc.record,
            error_type=f"{type(cause).__module__}.{type(cause).__qualname__}",
            message=str(cause),
            traceback="".join(traceback.format_exception(cause)),
        )
        for target in self.dead_downstream:
            target([letter])

    def emit(self, out: list[Any]) -> None:
        self.records_out += rows_in(out)
        for target in self.downstream:
            target(out)

    def apply(self, items: list[Any]) -> list[Any]:
        return items

    @property
    def state_size(self) -> int | None:
        return None


class MapOp(Op):
    __slots__ = ("fn",)

    def __init__(self, name: str, fn: Callable[[Any], Any]):
        super().__init__(name)
        self.fn = fn

    def apply(self, items: list[Any]) -> list[Any]:
        fn = self.fn
        out: list[Any] = []
        append = out.append
        x = None
        try:
            for x in items:
                append(fn(x))
        except Exception as exc:
            raise UserCodeError(self.name, x, exc, index=len(out), partial=out) from exc
        return out


class MapBatchesOp(Op):
    """``map_batches``: the function takes a batch of a format and returns one.

    A failure concerns the whole batch (no record of it is to blame), so with
    ``on_error`` "skip" the batch is dropped and with "dead_letter" each of its
    records becomes a dead letter with the batch's error.
    """

    __slots__ = ("batch_format", "fn", "user_fn")

    def __init__(self, name: str, fn: Callable[[Any], Any], batch_format: str):
        super().__init__(name)
        self.fn = batch_function(fn, batch_format)
        self.user_fn = fn
        self.batch_format = batch_format

    @property
    def takes_columns(self) -> bool:
        return self.batch_format != "list"

    def feed(self, items: list[Any]) -> None:
        if not has_columns(items):
            super().feed(items)
            return
        # Chunks stay chunks: one chunk in, one out (the same cut on a replay).
        self._feed_chunks(items, self._map_chunk)

    def _map_chunk(self, chunk: Columns) -> Columns:
        result = self.user_fn(chunk.to_format(self.batch_format))
        return Columns.of(result, f"the function of step {self.name!r}")

    def apply(self, items: list[Any]) -> list[Any]:
        try:
            return self.fn(items)
        except Exception as exc:
            raise UserCodeError(
                self.name,
                items[0],
                exc,
                what=f"a batch of {len(items)} records, the first being {short_repr(items[0])}",
            ) from exc

    def _apply_guarded(self, items: list[Any]) -> list[Any]:
        try:
            return self.apply(items)
        except UserCodeError as exc:
            if exc.step != self.name:
                raise
            for record in items:
                self._set_aside(UserCodeError(self.name, record, exc.cause))
            return []


class FilterOp(MapOp):
    __slots__ = ()

    def apply(self, items: list[Any]) -> list[Any]:
        fn = self.fn
        out: list[Any] = []
        append = out.append
        x = None
        try:
            for x in items:
                if fn(x):
                    append(x)
        except Exception as exc:
            raise UserCodeError(self.name, x, exc, partial=out) from exc
        return out


class FlatMapOp(MapOp):
    __slots__ = ()

    def apply(self, items: list[Any]) -> list[Any]:
        fn = self.fn
        out: list[Any] = []
        extend = out.extend
        x = None
        result: Any = _UNSET
        try:
            for x in items:
                result = fn(x)
                extend(result)
        except TypeError as exc:
            # Either fn raised, or it returned something extend() cannot take;
            # only in the second case is ``result`` this record's (non-iterable) result.
            error: Exception = exc
            if result is not _UNSET and not _iterable(result):
                error = TypeError(
                    "the flat_map function must return an iterable of records; "
                    f"it returned {short_repr(result, 80)}"
                )
            raise UserCodeError(self.name, x, error, partial=out) from exc
        except Exception as exc:
            raise UserCodeError(self.name, x, exc, partial=out) from exc
        return out


class KeyByOp(MapOp):
    __slots__ = ()

    def apply(self, items: list[Any]) -> list[Any]:
        fn = self.fn
        out: list[Any] = []
        append = out.append
        x = None
        try:
            for x in items:
                append((fn(x), x))
        except Exception as exc:
            raise UserCodeError(self.name, x, exc, index=len(out), partial=out) from exc
        return out


class KeyByColumnOp(KeyByOp):
    """``key_by`` on a column: a chunk keeps its columns and names the key column;
    a dict record becomes ``(record[column], record)`` (``KeyByOp`` with a ``ColumnKey``).
    A batch is all chunks or all records (``Plan.chunk_steps``)."""

    __slots__ = ("column",)

    @property
    def takes_columns(self) -> bool:
        return True

    def __init__(self, name: str, column: str):
        super().__init__(name, ColumnKey(column))
        self.column = column

    def apply(self, items: list[Any]) -> list[Any]:
        if not has_columns(items):
            return super().apply(items)
        column = self.column
        out: list[Any] = []
        for x in items:
            if column not in x.data:
                error = KeyError(f"no column {column!r} to key by; the columns are {list(x.data)}")
                raise UserCodeError(self.name, x, error, index=len(out), partial=out)
            out.append(Columns(x.data, column, x.n))
        return out


class KeyedState:
    """A keyed operator's state: one value per key."""

    __slots__ = ("values",)

    def __init__(self) -> None:
        self.values: dict[Any, Any] = {}


#: A keyed step counts the keys of one batch in this many, one record in
#: ``HOT_KEY_STRIDE`` of it (for the hot_key alert: 1/32 of the records).
HOT_KEY_SAMPLE_EVERY = 4
HOT_KEY_STRIDE = 8
#: Sampled records a window covers before it is judged and a new one starts.
HOT_KEY_WINDOW = 5_000
#: Rows sampled from one chunk of columns, at most (about).
HOT_KEY_CHUNK_SAMPLE = 1_024


class KeyedOp(Op):
    """A step with keyed state; it can record which keys each batch touched.

    Change tracking is on only when the job checkpoints: incremental
    snapshots write just the keys changed since the last one. It also counts
    the keys of a sample of its records (about 1 in 32, in C), to tell when
    one key group takes most of its records.
    """

    __slots__ = ("_batches", "_changed", "_keys", "_sampled", "hot", "state")

    def __init__(self, name: str):
        super().__init__(name)
        self.state = KeyedState()
        self._changed: set[Any] | None = None
        self._batches = 0
        self._keys: Counter[Any] = Counter()
        self._sampled = 0
        self.hot: tuple[int, Counter[Any]] = (0, Counter())  # the last full window

    @property
    def tracking(self) -> bool:
        return self._changed is not None

    def track_changes(self) -> None:
        self._changed = set()

    def take_changes(self) -> set[Any] | None:
        """Keys touched since the last call (changed or deleted); None if not tracked."""
        changed = self._changed
        if changed is not None:
            self._changed = set()
        return changed

    def feed(self, items: list[Any]) -> None:
        self.records_in += len(items)
        if self._changed is not None:
            self._changed.update(map(_first, items))  # C-level: a few ns per record
        self._batches += 1
        if self._batches % HOT_KEY_SAMPLE_EVERY == 0:
            sample = items[::HOT_KEY_STRIDE] if len(items) > HOT_KEY_STRIDE else items
            self._keys.update(map(_first, sample))
            self._sampled += len(sample)
            if self._sampled >= HOT_KEY_WINDOW:
                self.hot = (self._sampled, self._keys)
                self._keys, self._sampled = Counter(), 0
        out = self.apply(items) if self.on_error == "fail" else self._apply_guarded(items)
        if out:
            self.emit(out)

    def key_groups_sample(self, max_parallelism: int, top: int = 3) -> tuple[int, list[Any]]:
        """(records sampled, the busiest key groups: group, share, their busiest keys)."""
        sampled, live = self.hot if self.hot[0] else (self._sampled, self._keys)
        if not sampled:
            return 0, []
        keys = Counter(dict(live))  # one C-level copy: the data plane may be adding to it
        groups: dict[int, int] = {}
        members: dict[int, list[tuple[int, Any]]] = {}
        for key, n in keys.most_common(2000):
            try:
                group = stable_hash(key) % max_parallelism
            except TypeError:
                continue
            groups[group] = groups.get(group, 0) + n
            members.setdefault(group, []).append((n, key))
        busiest = sorted(groups.items(), key=lambda g: -g[1])[:top]
        return sampled, [
            {
                "group": group,
                "share": n / sampled,
                "records": n,
                "keys": [short_repr(k, 40) for _, k in members[group][:3]],
            }
            for group, n in busiest
        ]

    @property
    def state_size(self) -> int:
        return len(self.state.values)


_first = operator.itemgetter(0)


class ReduceOp(KeyedOp):
    __slots__ = ("fn", "initial")

    def __init__(self, name: str, fn: Callable[[Any, Any], Any], initial: Any):
        super().__init__(name)
        self.fn = fn
        self.initial = initial

    def apply(self, items: list[Any]) -> list[Any]:
        fn = self.fn
        values = self.state.values
        get = values.get
        initial = self.initial
        copy_initial = initial is not MISSING and not isinstance(initial, _IMMUTABLE)
        out: list[Any] = []
        append = out.append
        kv: Any = None
        try:
            for kv in items:
                key, value = kv
                acc = get(key, MISSING)
                if acc is MISSING:
                    if initial is MISSING:
                        acc = value
                    else:
                        acc = fn(copy.deepcopy(initial) if copy_initial else initial, value)
                else:
                    acc = fn(acc, value)
                values[key] = acc
                append((key, acc))
        except Exception as exc:
            raise UserCodeError(self.name, kv, exc, index=len(out), partial=out) from exc
        return out


class SumOp(KeyedOp):
    """``sum``: each key's running sum, emitted on every record (as Flink's ``sum``).

    On chunks (after a ``key_by`` on a column) it works on the arrays: the
    chunk comes out with ``column`` replaced by the running sums. On records
    ``(key, value)`` it adds ``value[column]`` (or ``value`` itself without a
    column) and emits ``(key, sum)``, or ``(key, record with the sum)``.
    """

    __slots__ = ("column",)

    @property
    def takes_columns(self) -> bool:
        return True

    def __init__(self, name: str, column: str | None):
        super().__init__(name)
        self.column = column

    def feed(self, items: list[Any]) -> None:
        if not has_columns(items):
            super().feed(items)
            return
        self._batches += 1
        self._feed_chunks(items, self._sum_chunk)

    def _sum_chunk(self, chunk: Columns) -> Columns:
        if chunk.key is None:
            raise TypeError(f"step {self.name!r} needs keyed records: put a key_by before it")
        column = self.column
        if column is None:
            if len(chunk.data) != 1:
                raise TypeError(
                    f"records have the columns {list(chunk.data)}: name the one to add up, "
                    f"sum({self.name!r}, column=...)"
                )
            column = next(iter(chunk.data))
        if column not in chunk.data:
            raise KeyError(f"no column {column!r} to add up; the columns are {list(chunk.data)}")
        if self._batches % HOT_KEY_SAMPLE_EVERY == 0:
            # At most ~1,000 rows of a chunk: a big chunk's 1/8 would be many windows.
            stride = max(HOT_KEY_STRIDE, len(chunk) // HOT_KEY_CHUNK_SAMPLE)
            sample = chunk.data[chunk.key][::stride].tolist()
            self._keys.update(sample)
            self._sampled += len(sample)
            if self._sampled >= HOT_KEY_WINDOW:
                self.hot = (self._sampled, self._keys)
                self._keys, self._sampled = Counter(), 0
        return running_sum(chunk, column, self.state.values, self._changed)

    def apply(self, items: list[Any]) -> list[Any]:
        values = self.state.values
        get = values.get
        column = self.column
        out: list[Any] = []
        append = out.append
        kv: Any = None
        try:
            for kv in items:
                key, value = kv
                if column is None:
                    acc = get(key, 0) + value
                    append((key, acc))
                else:
                    acc = get(key, 0) + value[column]
                    record = dict(value)
                    record[column] = acc
                    append((key, record))
                values[key] = acc
        except Exception as exc:
            raise UserCodeError(self.name, kv, exc, index=len(out), partial=out) from exc
        return out


class StatefulMapOp(KeyedOp):
    __slots__ = ("fn",)

    def __init__(self, name: str, fn: Callable[[Any, Any], Any]):
        super().__init__(name)
        self.fn = fn

    def apply(self, items: list[Any]) -> list[Any]:
        fn = self.fn
        values = self.state.values
        get = values.get
        out: list[Any] = []
        append = out.append
        kv: Any = None
        i = -1
        try:
            for kv in items:
                i += 1
                key, value = kv
                result = fn(get(key), value)
                try:
                    new_state, outputs = result
                except (TypeError, ValueError):
                    raise TypeError(
                        "the stateful_map function must return a pair "
                        f"(new_state_or_None, outputs); it returned {short_repr(result, 80)}"
                    ) from None
                if new_state is None:
                    values.pop(key, None)
                else:
                    values[key] = new_state
                if outputs:
                    for o in outputs:
                        append((key, o))
        except Exception as exc:
            raise UserCodeError(self.name, kv, exc, index=i, partial=out) from exc
        return out


class SinkOp(Op):
    """A sink step; its writer opens once the task knows what it restored (if anything)."""

    __slots__ = ("_sink", "_writer", "context")

    def __init__(self, name: str, sink: Sink, context: SinkContext):
        super().__init__(name)
        self._sink = sink
        self.context = context
        self._writer: SinkWriter | None = None

    def open(self, restored_checkpoint: int | None) -> None:
        if self._writer is None:
            self.context = dataclasses.replace(
                self.context, restored_checkpoint=restored_checkpoint
            )
            try:
                self._writer = self._sink.open(self.context)
            except Exception as exc:
                raise UserCodeError(self.name, None, exc, what="opening the sink") from exc

    def close(self) -> None:
        """Close the writer if it was opened (a reset: nothing more is committed)."""
        if self._writer is not None:
            self._writer.close()

    @property
    def writer(self) -> SinkWriter:
        if self._writer is None:
            self.open(None)
        assert self._writer is not None
        return self._writer

    @property
    def takes_columns(self) -> bool:
        return self._sink.batch_format is not None or getattr(self._sink, "_arrow_chunks", False)

    def apply(self, items: list[Any]) -> list[Any]:
        if self._sink.batch_format is not None:
            items = _as_batches(items, self._sink.batch_format)
        elif items and type(items[0]) is Columns:  # a sink that takes chunks as tables
            items = [chunk.to_arrow() for chunk in items]
        try:
            self.writer.write(items)
        except Exception as exc:
            raise UserCodeError(
                self.name,
                items[0],
                exc,
                what=f"one of a batch of {len(items)} records, "
                f"the first being {short_repr(items[0])}",
            ) from exc
        return []


class EventTimeOp(Op):
    """Reads each record's timestamp and tracks this partition's watermarks.

    Records pass through unchanged. A watermark is kept per *split*: per
    source partition where the step runs right after a source (the task sets
    ``split`` before each read's records, so a reader that lags behind
    another holds the watermark back instead of seeing its records made
    late), else one for the whole input. Each is the highest timestamp seen
    minus ``max_delay_s``; the step's watermark is the lowest over the splits
    that have not ended. ``last_record_at`` (monotonic) tells when the
    partition went idle.
    """

    __slots__ = (
        "ended",
        "idle_timeout_s",
        "keyed",
        "last_record_at",
        "max_delay_s",
        "max_ts",
        "split",
        "ts_fn",
    )

    def __init__(
        self,
        name: str,
        ts_fn: Callable[[Any], Any],
        max_delay_s: float,
        idle_timeout_s: float | None,
        keyed: bool,
    ):
        super().__init__(name)
        self.ts_fn = ts_fn
        self.max_delay_s = max_delay_s
        self.idle_timeout_s = idle_timeout_s
        self.keyed = keyed
        self.split: Any = 0
        self.max_ts: dict[Any, float] = {0: -math.inf}  # split -> highest timestamp seen
        self.ended: set[Any] = set()
        self.last_record_at = time.monotonic()

    def set_splits(self, splits: list[Any]) -> None:
        """The source partitions this task reads: each holds the watermark until it ends."""
        old = self.max_ts
        self.max_ts = {sp: old.get(sp, -math.inf) for sp in splits}

    @property
    def watermark(self) -> float:
        live = [v for sp, v in self.max_ts.items() if sp not in self.ended]
        if not live:
            return max(self.max_ts.values(), default=-math.inf) - self.max_delay_s
        return min(live) - self.max_delay_s

    def apply(self, items: list[Any]) -> list[Any]:
        fn = self.ts_fn
        hi = self.max_ts.get(self.split, -math.inf)
        x: Any = None
        i = -1
        try:
            if self.keyed:
                for x in items:
                    i += 1
                    t = fn(x[1])
                    if t.__class__ is not float or t - t:  # not a finite float
                        t = to_seconds(t, self.name)
                    if t > hi:
                        hi = t
            else:
                for x in items:
                    i += 1
                    t = fn(x)
                    if t.__class__ is not float or t - t:  # not a finite float
                        t = to_seconds(t, self.name)
                    if t > hi:
                        hi = t
        except Exception as exc:
            self.max_ts[self.split] = hi
            raise UserCodeError(self.name, x, exc, index=i, partial=items[:i]) from exc
        self.max_ts[self.split] = hi
        if items:
            self.last_record_at = time.monotonic()
        return items


class SideOutputOp(Op):
    """A step's second output (late records, dead letters): fed by its parent step."""

    __slots__ = ()


class UnionOp(Op):
    """A union: what each input brings goes on as it is (chunks too)."""

    __slots__ = ()

    @property
    def takes_columns(self) -> bool:
        return True


class SourceOp(Op):
    """The head of a source stage; the actor's loop calls ``emit`` with what it read."""

    __slots__ = ()


def build_op(spec: StepSpec, job: str, partition: int, run_id: str = "") -> Op:
    op = _build_op(spec, job, partition, run_id)
    op.partition = partition
    op.on_error = spec.on_error
    return op


def _build_op(spec: StepSpec, job: str, partition: int, run_id: str) -> Op:
    kind = spec.kind
    if kind is StepKind.SIDE_OUTPUT:
        return SideOutputOp(spec.name)
    if kind is StepKind.EVENT_TIME:
        assert spec.fn is not None
        max_delay_s, idle_timeout_s = spec.params
        return EventTimeOp(spec.name, spec.fn, max_delay_s, idle_timeout_s, spec.keyed)
    if kind is StepKind.WINDOW:
        from rayflow._internal.runtime.window_ops import WindowOp

        windower, aggregator, lateness, combine = window_params(spec)
        assert spec.ts_fn is not None
        return WindowOp(spec.name, windower, aggregator, lateness, spec.ts_fn, combine)
    if kind is StepKind.PROCESS:
        from rayflow._internal.runtime.window_ops import ProcessOp

        assert spec.fn is not None and spec.ts_fn is not None
        return ProcessOp(spec.name, spec.fn, spec.params or _no_timers(spec.name), spec.ts_fn)
    if kind is StepKind.SOURCE:
        return SourceOp(spec.name)
    if kind is StepKind.UNION:
        return UnionOp(spec.name)
    if kind is StepKind.SINK:
        ctx = SinkContext(
            job=job,
            step=spec.name,
            partition=partition,
            parallelism=spec.parallelism,
            run_id=run_id,
        )
        return SinkOp(spec.name, spec.connector, ctx)
    assert spec.fn is not None
    if kind is StepKind.MAP:
        return MapOp(spec.name, spec.fn)
    if kind is StepKind.MAP_BATCHES:
        return MapBatchesOp(spec.name, spec.fn, spec.params)
    if kind is StepKind.FILTER:
        return FilterOp(spec.name, spec.fn)
    if kind is StepKind.FLAT_MAP:
        return FlatMapOp(spec.name, spec.fn)
    if kind is StepKind.KEY_BY:
        if isinstance(spec.fn, ColumnKey):
            return KeyByColumnOp(spec.name, spec.fn.column)
        return KeyByOp(spec.name, spec.fn)
    if kind is StepKind.REDUCE:
        if isinstance(spec.fn, ColumnSum):
            return SumOp(spec.name, spec.fn.column)
        return ReduceOp(spec.name, spec.fn, spec.initial)
    if kind is StepKind.STATEFUL_MAP:
        return StatefulMapOp(spec.name, spec.fn)
    raise AssertionError(f"unknown step kind {kind}")


_UNSET = object()


def _as_batches(items: list[Any], batch_format: str) -> list[Any]:
    """A sink's batches of its format: each chunk as one, runs of records as one."""
    from rayflow._internal.runtime.batches import to_batch

    out: list[Any] = []
    run: list[Any] = []
    for x in items:
        if type(x) is Columns:
            if run:
                out.append(to_batch(run, batch_format))
                run = []
            out.append(x.to_format(batch_format))
        else:
            run.append(x)
    if run:
        out.append(to_batch(run, batch_format))
    return out


def _no_timers(step: str) -> Callable[[Any, float, Any], Any]:
    def on_timer(state: Any, timestamp: float, ctx: Any) -> Any:
        raise TypeError(
            f"step {step!r} set a timer (at {timestamp}) but has no on_timer function; "
            "pass process(name, on_record, on_timer)"
        )

    return on_timer


def _index_of(items: list[Any], record: Any) -> int:
    """Where ``record`` (the object a step failed on) is in its batch."""
    for i, x in enumerate(items):
        if x is record:
            return i
    raise AssertionError("the failing record is not in its batch")


def _iterable(value: Any) -> bool:
    try:
        iter(value)
    except TypeError:
        return False
    return True
