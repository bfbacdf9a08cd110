"""Building dataflows: :class:`Dataflow`, :class:`Stream` and :class:`KeyedStream`.

Every step is named; the name is the identity of the step's state in
checkpoints. Mistakes are reported here, while the flow is built, with the
step's name and what to do about it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NoReturn

from rayflow._internal import naming
from rayflow._internal.spec import MISSING, FlowSpec, Resources, StepKind, StepSpec
from rayflow.errors import BuildError
from rayflow.sinks import Sink
from rayflow.sources import Source

__all__ = ["Dataflow", "KeyedStream", "Stream"]


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

    def spec(self) -> FlowSpec:
        """The flow as plain data (what the planner reads)."""
        return FlowSpec(self.name, self.max_parallelism, tuple(self._steps.values()))

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

    def filter(self, name: str, fn: Callable[[Any], Any], **options: Any) -> Stream:
        """Keep the records for which ``fn`` returns a true value."""
        return self._step(name, StepKind.FILTER, fn, 1, options)

    def flat_map(self, name: str, fn: Callable[[Any], Iterable[Any]], **options: Any) -> Stream:
        """Replace every record by the records of the iterable ``fn`` returns."""
        return self._step(name, StepKind.FLAT_MAP, fn, 1, options)

    def key_by(self, name: str, key_fn: Callable[[Any], Any], **options: Any) -> KeyedStream:
        """Key every record by ``key_fn(record)``; records become ``(key, record)``.

        Records with equal keys go to the same partition of the next step,
        through a shuffle by a stable hash of the key. Unless given its own
        ``parallelism``, a ``key_by`` runs where its input runs (it only
        computes keys), so the shuffle starts right there: the records of
        one key from one input partition keep their order.
        """
        if "parallelism" not in options:
            options = {**options, "parallelism": self.flow._steps[self.step].parallelism}
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
        par, res = self._options(name, options)
        self.flow._check_sink_location(name, sink)
        self.flow._add(StepSpec(name, StepKind.SINK, (self.step,), par, res, connector=sink))

    def reduce(self, name: str, fn: Callable[[Any, Any], Any], **options: Any) -> Stream:
        raise BuildError(
            f"step {name!r}: reduce needs a keyed stream, and {self.step!r} is not keyed; "
            f"call .key_by(name, key_fn) first"
        )

    def stateful_map(self, name: str, fn: Callable[[Any, Any], Any], **options: Any) -> Stream:
        raise BuildError(
            f"step {name!r}: stateful_map needs a keyed stream, and {self.step!r} is not "
            f"keyed; call .key_by(name, key_fn) first"
        )

    # -- internals ------------------------------------------------------------

    def _options(self, name: str, options: dict[str, Any]) -> tuple[int, Resources]:
        allowed = {"parallelism", "num_cpus", "memory", "resources"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise BuildError(
                f"step {name!r}: unknown option(s) {', '.join(unknown)}; "
                f"steps take {', '.join(sorted(allowed))}"
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
    ) -> Stream:
        self.flow._check_new_name(name)
        _check_function(name, kind.value, fn, arity)
        par, res = self._options(name, options)
        spec = StepSpec(name, kind, (self.step,), par, res, fn=fn, initial=initial, keyed=keyed)
        return self.flow._add(spec)


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

    def stateful_map(self, name: str, fn: Callable[[Any, Any], Any], **options: Any) -> Stream:
        """Run ``fn(state_or_None, record) -> (state_or_None, outputs)`` per key.

        Each output is emitted as ``(key, output)``. Returning ``None`` as the
        state deletes the key's state.
        """
        return self._step(name, StepKind.STATEFUL_MAP, fn, 2, options)


def _describe(value: Any) -> str:
    if isinstance(value, type):
        return f"the class {value.__module__}.{value.__qualname__}"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _where(fn: Any) -> str:
    code = getattr(fn, "__code__", None)
    if code is None:
        return ""
    return f" (defined at {code.co_filename}:{code.co_firstlineno})"


def _check_function(step: str, op: str, fn: Any, arity: int) -> None:
    if not callable(fn):
        raise BuildError(f"step {step!r}: {op} needs a function; got {_describe(fn)}")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins without a signature: nothing to check
    try:
        sig.bind(*range(arity))
    except TypeError:
        args = {1: "one argument (the record)", 2: "two arguments (state, record)"}[arity]
        name = getattr(fn, "__qualname__", repr(fn))
        raise BuildError(
            f"step {step!r}: the {op} function must accept {args}; {name}{sig} does not{_where(fn)}"
        ) from None


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
