"""Building dataflows: :class:`Dataflow`, :class:`Stream` and :class:`KeyedStream`.

Every step is named; the name is the identity of the step's state in
checkpoints. Mistakes are reported here, while the flow is built, with the
step's name and what to do about it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, NoReturn

from rayflow._internal import naming
from rayflow._internal.callables import arity_mismatch
from rayflow._internal.callables import describe as _describe
from rayflow._internal.spec import (
    DEAD_LETTERS,
    LATE,
    MISSING,
    ON_ERROR,
    FlowSpec,
    Resources,
    StepKind,
    StepSpec,
)
from rayflow.errors import BuildError
from rayflow.sinks import Sink
from rayflow.sources import Source

if TYPE_CHECKING:
    from rayflow.windows import Aggregator, Windower

__all__ = ["Dataflow", "KeyedStream", "Stream", "WindowedStream"]


class Dataflow:
    """A named graph of steps, from sources to sinks.

    ``parallelism`` is the default number of partitions of every step;
    ``max_parallelism`` is the number of key groups keyed state is split
    into, which bounds the parallelism of keyed steps (now and after a rescale).
    """

    def __init__(self, name: str, *, parallelism: int = 1, max_parallelism: int = 128):
        if not naming.is_valid_name(name):
            raise BuildError(
                f"Dataflow name {name!r} is not valid: use letters, digits, '_', '.' or '-' "
                "(it becomes part of actor names and storage paths)"
            )
        _check_positive_int(f"Dataflow {name!r}", "parallelism", parallelism)
        _check_positive_int(f"Dataflow {name!r}", "max_parallelism", max_parallelism)
        if parallelism > max_parallelism:
            raise BuildError(
                f"Dataflow {name!r}: parallelism {parallelism} exceeds max_parallelism "
                f"{max_parallelism}; raise max_parallelism"
            )
        self.name = name
        self.parallelism = parallelism
        self.max_parallelism = max_parallelism
        self._steps: dict[str, StepSpec] = {}

    def source(
        self,
        name: str,
        source: Source,
        *,
        parallelism: int | None = None,
        num_cpus: float | None = None,
        memory: int | None = None,
        resources: Mapping[str, float] | None = None,
    ) -> Stream:
        """Add a source step; its partitions are spread over ``parallelism`` actors."""
        self._check_new_name(name)
        if not isinstance(source, Source):
            hint = ""
            if isinstance(source, type) and issubclass(source, Source):
                hint = f"; did you mean {source.__name__}(...) (an instance)?"
            elif isinstance(source, (list, tuple)):
                hint = "; wrap items with rf.testing.from_items(...)"
            raise BuildError(
                f"step {name!r}: source must be a rayflow Source such as "
                f"rf.sources.TextFiles(...) or rf.testing.from_items(...); "
                f"got {_describe(source)}{hint}"
            )
        spec = StepSpec(
            name=name,
            kind=StepKind.SOURCE,
            inputs=(),
            parallelism=self._parallelism(name, parallelism),
            resources=_resources(name, num_cpus, memory, resources),
            connector=source,
        )
        return self._add(spec)

    def dead_letters(self) -> Stream:
        """The records that steps with ``on_error="dead_letter"`` failed on.

        A stream of :class:`rayflow.DeadLetter` (the step, the partition, the
        record as the step got it, the error), to be sunk like any other:
        into a transactional sink each bad record arrives exactly once.
        """
        if DEAD_LETTERS not in self._steps:
            self._steps[DEAD_LETTERS] = StepSpec(
                DEAD_LETTERS, StepKind.UNION, (), self.parallelism, Resources()
            )
        return Stream(self, DEAD_LETTERS)

    def spec(self) -> FlowSpec:
        """The flow as plain data (what the planner reads).

        Side outputs are resolved here: every step with
        ``on_error="dead_letter"`` gets a ``<step>.dead_letters`` side step,
        which ``dead_letters()`` merges; steps come out in a topological order.
        """
        steps = dict(self._steps)
        failing = [s for s in steps.values() if s.on_error == "dead_letter"]
        if DEAD_LETTERS in steps:
            if not failing:
                raise BuildError(
                    f"flow {self.name!r} uses flow.dead_letters(), but no step has "
                    "on_error='dead_letter'; give the steps whose bad records you want "
                    "there on_error='dead_letter'"
                )
            sides = []
            for parent in failing:
                sides.append(
                    StepSpec(
                        f"{parent.name}.{DEAD_LETTERS}",
                        StepKind.SIDE_OUTPUT,
                        (parent.name,),
                        parent.parallelism,
                        parent.resources,
                        port=DEAD_LETTERS,
                    )
                )
            for side in sides:
                steps[side.name] = side
            steps[DEAD_LETTERS] = dataclasses.replace(
                steps[DEAD_LETTERS], inputs=tuple(s.name for s in sides)
            )
        elif failing:
            raise BuildError(
                f"step {failing[0].name!r} has on_error='dead_letter', but nothing reads the "
                "dead letters; sink them with flow.dead_letters().sink(name, sink), or use "
                "on_error='skip' to drop bad records"
            )
        return FlowSpec(self.name, self.max_parallelism, _topological(self.name, steps))

    def __repr__(self) -> str:
        return f"Dataflow({self.name!r}, steps={list(self._steps)})"

    # -- a picture of the flow -------------------------------------------------

    def to_mermaid(self) -> str:
        """The flow as a Mermaid ``flowchart LR``: a node per step, an edge per input.

        Nodes show each step's name, kind and parallelism; edges say how
        records cross them (``forward``, ``hash`` after a ``key_by``,
        ``rebalance`` where the parallelism changes). Paste it into any
        Mermaid viewer, or a Markdown file as a ``mermaid`` code block.
        """
        from rayflow._internal import flowchart

        return flowchart.to_mermaid(self.spec())

    def _repr_html_(self) -> str:
        """The flow as a Mermaid diagram in a notebook, with its edges as text beneath."""
        from rayflow._internal import flowchart

        return flowchart.to_html(self.spec())

    def show(self) -> None:
        """Show the flow's picture: drawn in a notebook, its Mermaid text elsewhere."""
        from rayflow._internal.notebook import in_notebook

        if in_notebook():
            from IPython.display import HTML, display

            display(HTML(self._repr_html_()))
        else:
            print(self.to_mermaid(), end="")

    # -- internals used by Stream -------------------------------------------

    def _check_new_name(self, name: str) -> None:
        if not naming.is_valid_name(name):
            raise BuildError(
                f"step name {name!r} is not valid: use letters, digits, '_', '.' or '-', "
                "starting with a letter or digit"
            )
        if name == DEAD_LETTERS or name.endswith((f".{DEAD_LETTERS}", f".{LATE}")):
            raise BuildError(
                f"step name {name!r} is reserved for side outputs (flow.dead_letters(), "
                "window(...).late); choose another name"
            )
        if name in self._steps:
            raise BuildError(
                f"step name {name!r} is used twice in flow {self.name!r}; every step needs "
                "its own name (it identifies the step's state in checkpoints)"
            )

    def _check_sink_location(self, name: str, sink: Sink) -> None:
        """No two sinks may write to one place (or one inside the other's)."""
        where = sink.location()
        if where is None:
            return
        for spec in self._steps.values():
            if spec.kind is not StepKind.SINK:
                continue
            other = spec.connector.location()
            if other is None:
                continue
            a, b = where.rstrip("/") + "/", other.rstrip("/") + "/"
            if a.startswith(b) or b.startswith(a):
                raise BuildError(
                    f"step {name!r}: its sink writes to {where}, and step {spec.name!r} "
                    f"already writes to {other}; two sinks would overwrite each other's "
                    "files. Give each sink a folder (or prefix) of its own."
                )

    def _parallelism(self, step: str, value: int | None) -> int:
        if value is None:
            return self.parallelism
        _check_positive_int(f"step {step!r}", "parallelism", value)
        if value > self.max_parallelism:
            raise BuildError(
                f"step {step!r}: parallelism {value} exceeds the flow's max_parallelism "
                f"{self.max_parallelism}; raise Dataflow(..., max_parallelism=...)"
            )
        return value

    def _add(self, spec: StepSpec) -> Stream:
        self._steps[spec.name] = spec
        if spec.keyed:
            return KeyedStream(self, spec.name)
        return Stream(self, spec.name)


class Stream:
    """The records that one step outputs; call operators on it to add steps."""

    def __init__(self, flow: Dataflow, step: str):
        self.flow = flow
        self.step = step

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.flow.name!r}, step={self.step!r})"

    def __reduce__(self) -> NoReturn:
        raise TypeError(
            f"{self!r} is a build-time handle and cannot be pickled; "
            "do not capture streams in step functions"
        )

    def map(self, name: str, fn: Callable[[Any], Any], **options: Any) -> Stream:
        """Apply ``fn`` to every record."""
        return self._step(name, StepKind.MAP, fn, 1, options)

    def map_batches(
        self,
        name: str,
        fn: Callable[[Any], Any],
        *,
        batch_format: str = "list",
        **options: Any,
    ) -> Stream:
        """Apply ``fn`` to whole batches of records, in a format of Ray Data's:
        ``"list"`` (a list of records), ``"numpy"`` (a dict of column -> array),
        ``"pandas"`` (a DataFrame) or ``"pyarrow"`` (a Table). Dict records
        become columns and rows come back as dicts; other records are the
        column ``"item"``. ``fn`` returns a batch of the same format, with any
        number of rows. A batch is what reaches the step at once (up to
        ``RuntimeConfig.batch_size`` records). With ``on_error`` "skip" or
        "dead_letter" a failing batch is set aside whole. Batches of records
        are cut where the partition slices its work, which a restart does not
        repeat, so a lost partition of this step's stage is recovered globally,
        never alone (chunks of columns are cut alike and keep partial recovery)."""
        from rayflow._internal.runtime.batches import check_format

        return self._step(
            name,
            StepKind.MAP_BATCHES,
            fn,
            1,
            options,
            params=check_format(name, batch_format),
        )

    def filter(self, name: str, fn: Callable[[Any], Any], **options: Any) -> Stream:
        """Keep the records for which ``fn`` returns a true value."""
        return self._step(name, StepKind.FILTER, fn, 1, options)

    def flat_map(self, name: str, fn: Callable[[Any], Iterable[Any]], **options: Any) -> Stream:
        """Replace every record by the records of the iterable ``fn`` returns."""
        return self._step(name, StepKind.FLAT_MAP, fn, 1, options)

    def key_by(self, name: str, key_fn: Callable[[Any], Any] | str, **options: Any) -> KeyedStream:
        """Key every record by ``key_fn(record)``; records become ``(key, record)``.

        Records with equal keys go to the same partition of the next step,
        through a shuffle by a stable hash of the key. Unless given its own
        ``parallelism``, a ``key_by`` runs where its input runs (it only
        computes keys), so the shuffle starts right there: the records of
        one key from one input partition keep their order.

        ``key_fn`` may name a column (a str): the key is ``record[column]``,
        and chunks of a columnar stream (``Generator(batch_fn=...)``,
        ``map_batches``) are hashed and split in NumPy, each row to the
        partition a per-record key would reach.
        """
        if "parallelism" not in options:
            options = {**options, "parallelism": self.flow._steps[self.step].parallelism}
        if isinstance(key_fn, str):
            from rayflow._internal.runtime.columns import ColumnKey

            key_fn = ColumnKey(key_fn)
        stream = self._step(name, StepKind.KEY_BY, key_fn, 1, options, keyed=True)
        assert isinstance(stream, KeyedStream)
        return stream

    def union(self, name: str, *others: Stream, **options: Any) -> Stream:
        """Merge this stream with ``others`` into one stream."""
        self.flow._check_new_name(name)
        if not others:
            raise BuildError(f"step {name!r}: union needs at least one other stream to merge")
        for other in others:
            if not isinstance(other, Stream):
                hint = ""
                if isinstance(other, (list, tuple)):
                    hint = "; did you forget to unpack the list (union(name, *streams))?"
                raise BuildError(
                    f"step {name!r}: union takes Streams; got {_describe(other)}{hint}"
                )
            if other.flow is not self.flow:
                raise BuildError(
                    f"step {name!r}: cannot union streams of different flows "
                    f"({self.flow.name!r} and {other.flow.name!r})"
                )
        inputs = (self.step, *(o.step for o in others))
        if len(set(inputs)) != len(inputs):
            raise BuildError(f"step {name!r}: union lists the same stream twice: {inputs}")
        par, res = self._options(name, options)
        spec = StepSpec(name, StepKind.UNION, inputs, par, res)
        return self.flow._add(spec)

    def with_event_time(
        self,
        name: str,
        ts_fn: Callable[[Any], Any],
        *,
        max_delay_s: float = 0.0,
        idle_timeout_s: float | None = None,
        **options: Any,
    ) -> Stream:
        """Give the records event time: ``ts_fn(record)`` is when each happened.

        Timestamps are seconds since the epoch (a number, or a ``datetime``;
        naive ones are UTC). Every partition of this step tracks the highest
        timestamp it saw; its *watermark*, that minus ``max_delay_s``, says
        "nothing older is coming" and travels downstream in-band with the
        records, where windows and timers fire on it. A partition that sees
        nothing for ``idle_timeout_s`` stops holding the watermark back. On a
        keyed stream ``ts_fn`` gets the record (the value of each pair).

        Windows and ``process`` steps downstream apply ``ts_fn`` to the
        records they get: steps in between must keep what it reads (or give
        the window a ``ts_fn`` of its own).
        """
        _check_function(name, "with_event_time", ts_fn, 1)
        _check_seconds(name, "max_delay_s", max_delay_s, allow_zero=True)
        if idle_timeout_s is not None:
            _check_seconds(name, "idle_timeout_s", idle_timeout_s, allow_zero=False)
        if "parallelism" not in options:
            # Where its input runs: a watermark per input partition (per source split).
            options = {**options, "parallelism": self.flow._steps[self.step].parallelism}
        return self._step(
            name,
            StepKind.EVENT_TIME,
            ts_fn,
            1,
            options,
            keyed=isinstance(self, KeyedStream),
            params=(float(max_delay_s), None if idle_timeout_s is None else float(idle_timeout_s)),
        )

    def sink(self, name: str, sink: Sink, **options: Any) -> None:
        """Write the stream to ``sink``."""
        self.flow._check_new_name(name)
        if not isinstance(sink, Sink):
            hint = ""
            if isinstance(sink, type) and issubclass(sink, Sink):
                hint = f"; did you mean {sink.__name__}() (an instance)?"
            elif callable(sink):
                hint = "; to run a function on every record use map(), then a sink"
            raise BuildError(
                f"step {name!r}: sink must be a rayflow Sink such as rf.sinks.Print(), "
                f"rf.sinks.JsonLines(folder) or rf.testing.Collect(); got {_describe(sink)}{hint}"
            )
        fmt = getattr(sink, "batch_format", None)
        if fmt not in (None, "numpy", "pandas", "pyarrow"):
            raise BuildError(
                f"step {name!r}: the sink's batch_format must be None (records), 'numpy', "
                f"'pandas' or 'pyarrow'; got {fmt!r}"
            )
        if fmt is not None:
            from rayflow._internal.runtime.batches import check_format

            check_format(name, fmt)  # its library must be installed
        par, res = self._options(name, options)
        self.flow._check_sink_location(name, sink)
        self.flow._add(StepSpec(name, StepKind.SINK, (self.step,), par, res, connector=sink))

    def reduce(self, name: str, fn: Callable[[Any, Any], Any], **options: Any) -> Stream:
        raise BuildError(
            f"step {name!r}: reduce needs a keyed stream, and {self.step!r} is not keyed; "
            f"call .key_by(name, key_fn) first"
        )

    def sum(self, name: str, column: str | None = None, **options: Any) -> Stream:
        raise BuildError(
            f"step {name!r}: sum needs a keyed stream, and {self.step!r} is not keyed; "
            f"call .key_by(name, key_fn) first"
        )

    def window(self, name: str, *args: Any, **options: Any) -> WindowedStream:
        raise BuildError(
            f"step {name!r}: window needs a keyed stream, and {self.step!r} is not keyed; "
            f"call .key_by(name, key_fn) first"
        )

    def process(self, name: str, *args: Any, **options: Any) -> Stream:
        raise BuildError(
            f"step {name!r}: process needs a keyed stream, and {self.step!r} is not keyed; "
            f"call .key_by(name, key_fn) first"
        )

    def stateful_map(self, name: str, fn: Callable[[Any, Any], Any], **options: Any) -> Stream:
        raise BuildError(
            f"step {name!r}: stateful_map needs a keyed stream, and {self.step!r} is not "
            f"keyed; call .key_by(name, key_fn) first"
        )

    # -- internals ------------------------------------------------------------

    def _options(
        self, name: str, options: dict[str, Any], *, user_code: bool = False
    ) -> tuple[int, Resources]:
        allowed = {"parallelism", "num_cpus", "memory", "resources"}
        if user_code:
            allowed.add("on_error")
        unknown = sorted(set(options) - allowed)
        if unknown:
            hint = ""
            if "on_error" in unknown:
                hint = " (on_error is for steps that run a function per record)"
            raise BuildError(
                f"step {name!r}: unknown option(s) {', '.join(unknown)}; "
                f"steps take {', '.join(sorted(allowed))}{hint}"
            )
        par = self.flow._parallelism(name, options.get("parallelism"))
        res = _resources(
            name, options.get("num_cpus"), options.get("memory"), options.get("resources")
        )
        return par, res

    def _step(
        self,
        name: str,
        kind: StepKind,
        fn: Any,
        arity: int,
        options: dict[str, Any],
        *,
        keyed: bool = False,
        initial: Any = MISSING,
        params: Any = None,
        ts: tuple[Callable[[Any], Any] | None, str | None] = (None, None),
    ) -> Stream:
        self.flow._check_new_name(name)
        _check_function(name, kind.value, fn, arity)
        on_error = options.get("on_error", "fail")
        if on_error not in ON_ERROR:
            raise BuildError(
                f"step {name!r}: on_error must be one of {', '.join(map(repr, ON_ERROR))}; "
                f"got {on_error!r}"
            )
        par, res = self._options(name, options, user_code=kind.user_code)
        spec = StepSpec(
            name,
            kind,
            (self.step,),
            par,
            res,
            fn=fn,
            initial=initial,
            keyed=keyed,
            on_error=on_error,
            params=params,
            ts_fn=ts[0],
            ts_step=ts[1],
        )
        return self.flow._add(spec)

    def _nearest_event_time(self) -> tuple[dict[str, StepSpec], list[str]]:
        """The event-time steps nearest upstream of this stream on each path, and the
        sources reached by a path without one."""
        flow = self.flow
        found: dict[str, StepSpec] = {}
        missing: list[str] = []
        stack, seen = [self.step], set()
        while stack:
            step = flow._steps[stack.pop()]
            if step.name in seen:
                continue
            seen.add(step.name)
            if step.kind is StepKind.EVENT_TIME:
                found[step.name] = step
            elif step.kind is StepKind.SOURCE:
                missing.append(step.name)
            else:
                stack.extend(step.inputs)
        return found, missing

    def _event_time(self, name: str, ts_fn: Any) -> tuple[Callable[[Any], Any], str]:
        """The timestamp function for step ``name`` and where it comes from.

        Every path from the sources to this step must pass an event-time step
        (their watermarks decide when windows and timers fire).
        """
        found, missing = self._nearest_event_time()
        if missing:
            raise BuildError(
                f"step {name!r} needs event time, but records from source "
                f"{missing[0]!r} reach it without any: call "
                f".with_event_time(name, ts_fn, max_delay_s=...) on that path first"
            )
        if ts_fn is not None:
            _check_function(name, "ts_fn", ts_fn, 1)
            return ts_fn, name
        fns = {id(s.fn): s for s in found.values()}
        if len(fns) > 1:
            raise BuildError(
                f"step {name!r} reads records from several event-time steps "
                f"({', '.join(sorted(found))}) with different timestamp functions; pass "
                "ts_fn= to say how to read a record's time here"
            )
        step = next(iter(found.values()))
        assert step.fn is not None
        return step.fn, step.name


class KeyedStream(Stream):
    """A stream of ``(key, record)`` pairs; adds the stateful operators.

    Used as a plain stream (``map``, ``sink``, ...) its records are the pairs.
    """

    def reduce(
        self,
        name: str,
        fn: Callable[[Any, Any], Any],
        *,
        initial: Any = MISSING,
        **options: Any,
    ) -> Stream:
        """Fold each key's records with ``fn(acc, record)``; emit ``(key, acc)`` on every update.

        Without ``initial`` the first record of a key is its first accumulator.
        """
        return self._step(name, StepKind.REDUCE, fn, 2, options, initial=initial)

    def sum(self, name: str, column: str | None = None, **options: Any) -> Stream:
        """Each key's running sum, emitted on every record (Flink's ``sum``).

        Without ``column`` records are numbers and ``(key, sum)`` comes out;
        with it records are dicts (or rows of columns) and come out as
        ``(key, record)`` with ``record[column]`` replaced by the sum. On a
        columnar stream keyed by a column the sums are computed in NumPy, chunk
        by chunk, and stay columns (floats may differ in their last bits from
        a sum formed record by record).
        """
        if column is not None and not isinstance(column, str):
            raise BuildError(f"step {name!r}: sum's column must be a str or None; got {column!r}")
        from rayflow._internal.runtime.columns import ColumnSum

        return self._step(name, StepKind.REDUCE, ColumnSum(column), 2, options)

    def stateful_map(self, name: str, fn: Callable[[Any, Any], Any], **options: Any) -> Stream:
        """Run ``fn(state_or_None, record) -> (state_or_None, outputs)`` per key.

        Each output is emitted as ``(key, output)``. Returning ``None`` as the
        state deletes the key's state.
        """
        return self._step(name, StepKind.STATEFUL_MAP, fn, 2, options)

    def window(
        self,
        name: str,
        windower: Windower,
        aggregator: Aggregator,
        *,
        allowed_lateness_s: float = 0.0,
        ts_fn: Callable[[Any], Any] | None = None,
        combine: bool = False,
        **options: Any,
    ) -> WindowedStream:
        """Aggregate each key's records per event-time window.

        ``windower`` is ``rf.windows.Tumbling``, ``Sliding`` or ``Session``;
        ``aggregator`` is ``rf.windows.Count()``, ``Sum()``, ``Fold(...)``,
        ``Reduce(...)`` or ``Collect()``. A window emits once,
        ``(key, rf.windows.Result(start, end, value))``, when the watermark
        passes its end plus ``allowed_lateness_s``. Records that come after
        their window closed go to ``.late`` as ``(key, record)``.

        ``combine=True`` (``Tumbling`` with ``Count`` or ``Sum``) counts or
        sums each batch per key and window before the ``key_by``'s shuffle,
        so one partial crosses it instead of many records (Flink's
        local-global aggregation); results and ``.late`` are the same.
        The partitions that combine are then recovered with the whole job,
        never alone, and no ``with_event_time`` before it may have
        ``idle_timeout_s``. Where the window runs in the same actor as
        the steps before it (no shuffle), there is nothing to combine.
        """
        from rayflow import windows

        if not isinstance(windower, windows.Windower):
            raise BuildError(
                f"step {name!r}: the windower must be rf.windows.Tumbling(...), Sliding(...) "
                f"or Session(...); got {_describe(windower)}"
            )
        if not isinstance(aggregator, windows.Aggregator):
            raise BuildError(
                f"step {name!r}: the aggregator must be rf.windows.Count(), Sum(), "
                f"Fold(fn, initial), Reduce(fn) or Collect(); got {_describe(aggregator)}"
            )
        _check_seconds(name, "allowed_lateness_s", allowed_lateness_s, allow_zero=True)
        self.flow._check_new_name(name)
        ts = self._event_time(name, ts_fn)
        if combine is not False:
            self._check_combine(name, windower, aggregator, combine)
        stream = self._step(
            name,
            StepKind.WINDOW,
            _window_marker,
            1,
            options,
            params=(windower, aggregator, float(allowed_lateness_s), combine),
            ts=ts,
        )
        return WindowedStream(self.flow, stream.step)

    def _check_combine(self, name: str, windower: Any, aggregator: Any, combine: Any) -> None:
        from rayflow._internal.eventtime.combine import unsupported

        if combine is not True:
            raise BuildError(f"step {name!r}: combine must be True or False; got {combine!r}")
        why = unsupported(windower, aggregator)
        if why is not None:
            raise BuildError(f"step {name!r}: {why}; or leave combine off")
        for step in self._nearest_event_time()[0].values():
            idle = step.params[1]
            if idle is not None:
                raise BuildError(
                    f"step {name!r}: combine=True needs watermarks that never go idle, but "
                    f"with_event_time step {step.name!r} has idle_timeout_s={idle!r} (its "
                    "receivers would stop waiting for it, and what it combined could come "
                    "after its window closed); drop idle_timeout_s there, or leave "
                    "combine off"
                )

    def process(
        self,
        name: str,
        on_record: Callable[[Any, Any, Any], Any],
        on_timer: Callable[[Any, float, Any], Any] | None = None,
        *,
        ts_fn: Callable[[Any], Any] | None = None,
        **options: Any,
    ) -> Stream:
        """Hand-written keyed logic with event-time timers.

        ``on_record(state, record, ctx) -> (state, outputs)`` and
        ``on_timer(state, timestamp, ctx) -> (state, outputs)``; ``ctx`` has
        ``timestamp``, ``watermark``, ``key``, ``set_timer(ts)`` and
        ``delete_timer(ts)``. A timer fires once the watermark reaches it.
        Outputs are emitted as ``(key, output)``; state ``None`` (and no
        timers) deletes the key. State and timers are checkpointed.
        """
        _check_function(name, "process on_record", on_record, 3)
        if on_timer is not None:
            _check_function(name, "process on_timer", on_timer, 3)
        self.flow._check_new_name(name)
        ts = self._event_time(name, ts_fn)
        return self._step(name, StepKind.PROCESS, on_record, 3, options, params=on_timer, ts=ts)


class WindowedStream(Stream):
    """The results of a window step: ``(key, rf.windows.Result)``; ``late`` holds the rest."""

    @property
    def late(self) -> Stream:
        """Records that came after their window had closed, as ``(key, record)``."""
        name = f"{self.step}.{LATE}"
        steps = self.flow._steps
        if name not in steps:
            parent = steps[self.step]
            steps[name] = StepSpec(
                name,
                StepKind.SIDE_OUTPUT,
                (self.step,),
                parent.parallelism,
                parent.resources,
                port=LATE,
            )
        return Stream(self.flow, name)


def _window_marker(record: Any) -> Any:
    """A window's ``fn``: unused (its windower and aggregator are in ``params``)."""
    return record


def _topological(flow: str, steps: dict[str, StepSpec]) -> tuple[StepSpec, ...]:
    """Steps in insertion order, each after all its inputs."""
    ordered: list[StepSpec] = []
    placed: set[str] = set()
    waiting = list(steps.values())
    while waiting:
        ready = [s for s in waiting if all(i in placed for i in s.inputs)]
        if not ready:
            names = ", ".join(s.name for s in waiting)
            raise BuildError(
                f"flow {flow!r}: steps {names} read each other in a cycle (a step with "
                "on_error='dead_letter' downstream of flow.dead_letters()?); break the cycle"
            )
        first = ready[0]
        ordered.append(first)
        placed.add(first.name)
        waiting.remove(first)
    return tuple(ordered)


def _check_seconds(step: str, what: str, value: Any, *, allow_zero: bool) -> None:
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value >= 0 if allow_zero else value > 0)
    )
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise BuildError(
            f"step {step!r}: {what} must be a number of seconds {bound}; got {value!r}"
        )


def _check_function(step: str, op: str, fn: Any, arity: int) -> None:
    if not callable(fn):
        raise BuildError(f"step {step!r}: {op} needs a function; got {_describe(fn)}")
    mismatch = arity_mismatch(fn, arity)
    if mismatch is not None:
        args = {
            1: "one argument (the record)",
            2: "two arguments (state, record)",
            3: "three arguments (state, record or timestamp, ctx)",
        }[arity]
        raise BuildError(f"step {step!r}: the {op} function must accept {args}; {mismatch}")


def _check_positive_int(where: str, what: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BuildError(f"{where}: {what} must be an int >= 1; got {value!r}")


def _resources(
    step: str, num_cpus: Any, memory: Any, resources: Mapping[str, float] | None
) -> Resources:
    if num_cpus is not None and (
        not isinstance(num_cpus, (int, float)) or isinstance(num_cpus, bool) or num_cpus < 0
    ):
        raise BuildError(f"step {step!r}: num_cpus must be a number >= 0; got {num_cpus!r}")
    if memory is not None and (not isinstance(memory, int) or memory <= 0):
        raise BuildError(f"step {step!r}: memory must be a number of bytes > 0; got {memory!r}")
    custom: tuple[tuple[str, float], ...] = ()
    if resources is not None:
        if not isinstance(resources, Mapping) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and v >= 0
            for k, v in resources.items()
        ):
            raise BuildError(
                f"step {step!r}: resources must map resource names to amounts >= 0, "
                f"like {{'GPU': 1}}; got {resources!r}"
            )
        custom = tuple(sorted((k, float(v)) for k, v in resources.items()))
    return Resources(None if num_cpus is None else float(num_cpus), memory, custom)
