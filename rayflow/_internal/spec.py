"""The logical description of a dataflow: steps, their functions and options.

This is what the user builds with :mod:`rayflow.dataflow`; the planner turns
it into a physical plan. Everything here is plain, picklable data.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class StepKind(enum.Enum):
    SOURCE = "source"
    MAP = "map"
    MAP_BATCHES = "map_batches"  # fn on a whole batch (runtime/batches.py)
    FILTER = "filter"
    FLAT_MAP = "flat_map"
    KEY_BY = "key_by"
    REDUCE = "reduce"
    STATEFUL_MAP = "stateful_map"
    UNION = "union"
    SINK = "sink"
    EVENT_TIME = "event_time"  # assigns timestamps, generates watermarks
    WINDOW = "window"
    PROCESS = "process"  # keyed, with event-time timers
    SIDE_OUTPUT = "side_output"  # a step's second output: late records, dead letters

    @property
    def stateful(self) -> bool:
        return self in (StepKind.REDUCE, StepKind.STATEFUL_MAP, StepKind.WINDOW, StepKind.PROCESS)

    @property
    def user_code(self) -> bool:
        """Steps that run a user function per record (they take ``on_error``)."""
        return self in (
            StepKind.MAP,
            StepKind.MAP_BATCHES,
            StepKind.FILTER,
            StepKind.FLAT_MAP,
            StepKind.KEY_BY,
            StepKind.REDUCE,
            StepKind.STATEFUL_MAP,
            StepKind.EVENT_TIME,
            StepKind.WINDOW,
            StepKind.PROCESS,
        )


#: Ports of side outputs.
LATE = "late"
DEAD_LETTERS = "dead_letters"
#: What a step does with a record its user function fails on.
ON_ERROR = ("fail", "skip", "dead_letter")


class _Missing:
    """Marker for "no initial value" in ``reduce`` (the first value starts the sum)."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (_Missing, ())


MISSING: Any = _Missing()


@dataclass(frozen=True)
class Resources:
    """What one operator actor asks Ray for. Fused steps must agree on it.

    ``num_cpus=None``: the job's default (``RuntimeConfig.operator_cpus``).
    """

    num_cpus: float | None = None
    memory: int | None = None
    custom: tuple[tuple[str, float], ...] = ()

    def ray_options(self, default_cpus: float = 0.0) -> dict[str, Any]:
        cpus = default_cpus if self.num_cpus is None else self.num_cpus
        opts: dict[str, Any] = {"num_cpus": cpus}
        if self.memory is not None:
            opts["memory"] = self.memory
        if self.custom:
            opts["resources"] = dict(self.custom)
        return opts


@dataclass(frozen=True)
class StepSpec:
    """One named step of a dataflow."""

    name: str
    kind: StepKind
    inputs: tuple[str, ...]
    parallelism: int
    resources: Resources = field(default_factory=Resources)
    fn: Callable[..., Any] | None = None
    initial: Any = MISSING
    connector: Any = None  # a Source for SOURCE steps, a Sink for SINK steps
    keyed: bool = False  # whether the step's output is a KeyedStream
    on_error: str = "fail"  # one of ON_ERROR
    port: str | None = None  # SIDE_OUTPUT: which output of its input (LATE, DEAD_LETTERS)
    # Per kind: EVENT_TIME (max_delay_s, idle_timeout_s); WINDOW (windower,
    # aggregator, allowed_lateness_s, combine), see window_params; PROCESS the
    # on_timer function.
    params: Any = None
    # WINDOW and PROCESS: the timestamp function (the upstream EVENT_TIME step's
    # unless the step was given its own) and the step it came from.
    ts_fn: Callable[[Any], Any] | None = None
    ts_step: str | None = None


def window_params(spec: StepSpec) -> tuple[Any, Any, float, bool]:
    """A WINDOW step's (windower, aggregator, allowed_lateness_s, combine); plans
    made before ``combine`` existed have three."""
    windower, aggregator, lateness, *rest = spec.params
    return windower, aggregator, lateness, bool(rest and rest[0])


@dataclass(frozen=True)
class FlowSpec:
    """A whole dataflow, in the order its steps were added (a topological order)."""

    name: str
    max_parallelism: int
    steps: tuple[StepSpec, ...]

    def step(self, name: str) -> StepSpec:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)
