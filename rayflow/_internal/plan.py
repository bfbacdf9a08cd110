"""The physical plan: which steps share an actor and how actors connect.

Chains of steps with the same parallelism and resources are *fused* into one
stage (one actor per partition), as Flink chains operators: records pass
between fused steps as plain Python lists, with no Ray call. A stage ends
where the data must move between partitions:

* after ``key_by``: a HASH edge, routing by the key's key group (except
  between two steps of parallelism 1, where the keyed step joins the
  sender's stage unless that one has a keyed step already);
* where the parallelism changes: a REBALANCE edge (batches spread over all
  downstream partitions);
* where a step merges inputs from different stages (``union``), or where
  resources differ: a FORWARD edge, partition *i* to partition *i*.

Each (edge, upstream partition, downstream partition) is one channel.
"""

from __future__ import annotations

import enum
import functools
import pickle
from collections.abc import Mapping
from dataclasses import dataclass

from ray import cloudpickle as ray_cloudpickle

from rayflow._internal.spec import FlowSpec, Resources, StepKind, StepSpec, window_params
from rayflow.errors import BuildError

#: A channel into a partition, seen by the receiver: (edge id, sender partition).
ChannelId = tuple[int, int]


class Partitioning(enum.Enum):
    FORWARD = "forward"
    REBALANCE = "rebalance"
    HASH = "hash"


@dataclass(frozen=True)
class Edge:
    id: int
    src_stage: str
    src_step: str
    dst_stage: str
    dst_step: str
    partitioning: Partitioning
    src_parallelism: int
    dst_parallelism: int

    def senders_into(self, dst_partition: int) -> list[int]:
        """Upstream partitions that send to ``dst_partition`` over this edge."""
        if self.partitioning is Partitioning.FORWARD:
            return [dst_partition]
        return list(range(self.src_parallelism))

    def receivers_of(self, src_partition: int) -> list[int]:
        """Downstream partitions that ``src_partition`` sends to over this edge."""
        if self.partitioning is Partitioning.FORWARD:
            return [src_partition]
        return list(range(self.dst_parallelism))


@dataclass(frozen=True)
class Stage:
    """Steps fused into one actor per partition; named after its first step."""

    name: str
    steps: tuple[str, ...]
    parallelism: int
    resources: Resources
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    flow: FlowSpec
    stages: tuple[Stage, ...]
    edges: tuple[Edge, ...]
    stage_of: Mapping[str, str]

    @property
    def name(self) -> str:
        return self.flow.name

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def step(self, name: str) -> StepSpec:
        return self.flow.step(name)

    @property
    def columnar(self) -> bool:
        """Whether chunks of columns can flow (a source reads them: runtime/columns.py)."""
        return bool(self.chunk_steps)

    @functools.cached_property
    def chunk_steps(self) -> frozenset[str]:
        """Steps whose output is chunks of columns (all of it: a stream is all chunks or
        all records; a union of both kinds takes its inputs' rows, runtime/task.py)."""
        from rayflow._internal.runtime.columns import ColumnKey, ColumnSum

        found: set[str] = set()
        for s in self.flow.steps:  # in build order: inputs come first
            fed = bool(s.inputs) and all(i in found for i in s.inputs)
            if (
                (s.kind is StepKind.SOURCE and getattr(s.connector, "batch_fn", None) is not None)
                or (s.kind is StepKind.MAP_BATCHES and s.params != "list" and fed)
                or (s.kind is StepKind.KEY_BY and isinstance(s.fn, ColumnKey) and fed)
                or (s.kind is StepKind.REDUCE and isinstance(s.fn, ColumnSum) and fed)
                or (s.kind is StepKind.UNION and fed)
            ):
                found.add(s.name)
        return frozenset(found)

    def event_time_before(self, step: str) -> str | None:
        """The nearest ``with_event_time`` step before ``step`` in its stage, if any.

        A window or process step fed by one fires on that watermark (taken between
        reads and slices), not on the watermarks that come over its channels.
        """
        stage = self.stage_of[step]
        stack = list(self.step(step).inputs)
        while stack:
            name = stack.pop()
            if self.stage_of[name] != stage:
                continue  # in another stage: its watermark comes over the channels
            if self.step(name).kind is StepKind.EVENT_TIME:
                return name
            stack.extend(self.step(name).inputs)
        return None

    def combines(self, edge: Edge) -> bool:
        """Whether ``edge`` carries partials: its sender combines before the shuffle into
        a window with ``combine=True`` (eventtime/combine.py)."""
        dst = self.step(edge.dst_step)
        return (
            dst.kind is StepKind.WINDOW
            and edge.partitioning is Partitioning.HASH
            and window_params(dst)[3]
        )

    def consumers_in_stage(self, step: str) -> list[str]:
        """Steps in the same stage that read ``step``'s output, in plan order."""
        stage = self.stage_of[step]
        return [
            s.name for s in self.flow.steps if step in s.inputs and self.stage_of[s.name] == stage
        ]

    def edges_from(self, step: str) -> list[Edge]:
        return [e for e in self.edges if e.src_step == step]

    def input_channels(self, stage: str, partition: int) -> list[ChannelId]:
        """Every channel that delivers into ``stage``'s ``partition``."""
        channels: list[ChannelId] = []
        for edge_id in self.stage(stage).inputs:
            edge = self.edges[edge_id]
            channels.extend((edge.id, p) for p in edge.senders_into(partition))
        return channels

    def source_partitions(self, stage: str, partition: int) -> list[int]:
        """Source partitions read by ``stage``'s actor ``partition`` (round-robin)."""
        st = self.stage(stage)
        source = self.step(st.steps[0])
        assert source.kind is StepKind.SOURCE
        total = source.connector.partitions()
        return list(range(partition, total, st.parallelism))

    def describe(self) -> str:
        """The plan in words: one line per stage and per edge."""
        lines = [f"plan of flow {self.name!r}:"]
        for st in self.stages:
            lines.append(f"  stage {st.name!r} x{st.parallelism}: {' -> '.join(st.steps)}")
        for e in self.edges:
            lines.append(
                f"  edge {e.src_step!r}[{e.src_parallelism}] --{e.partitioning.value}--> "
                f"{e.dst_step!r}[{e.dst_parallelism}]"
            )
        return "\n".join(lines)


def encode_plan(plan: Plan) -> bytes:
    """The plan as bytes, pickled with cloudpickle (user functions included).

    We pickle it ourselves, before Ray would, so that a plan that cannot be
    loaded is an error we report rather than a failed actor constructor. We
    use Ray's cloudpickle: it keeps the file names of user functions, so
    tracebacks of user errors point at the user's code.
    """
    return ray_cloudpickle.dumps(plan)


def decode_plan(blob: bytes) -> Plan:
    plan = pickle.loads(blob)
    assert isinstance(plan, Plan)
    return plan


def build_plan(flow: FlowSpec) -> Plan:
    """Fuse the flow's steps into stages and connect the stages with edges."""
    if not any(s.kind is StepKind.SINK for s in flow.steps):
        raise BuildError(
            f"flow {flow.name!r} has no sink, so it would compute nothing visible; "
            "add one with stream.sink(name, sink)"
        )
    by_name = {s.name: s for s in flow.steps}
    stage_of: dict[str, str] = {}
    members: dict[str, list[str]] = {}
    stage_meta: dict[str, tuple[int, Resources]] = {}
    edge_specs: list[tuple[str, str, Partitioning]] = []  # (src step, dst step, kind)

    for step in flow.steps:
        if step.kind is StepKind.SOURCE:
            _new_stage(step, stage_of, members, stage_meta)
            continue
        kinds = [_edge_kind(by_name[i], step) for i in step.inputs]
        input_stages = {stage_of[i] for i in step.inputs}
        fusable = (
            len(input_stages) == 1
            and stage_meta[next(iter(input_stages))][1] == step.resources
            and all(
                k is Partitioning.FORWARD
                or _keyed_in_one(k, by_name[i], step, [by_name[m] for m in members[stage_of[i]]])
                for k, i in zip(kinds, step.inputs, strict=True)
            )
        )
        if fusable:
            stage = next(iter(input_stages))
            stage_of[step.name] = stage
            members[stage].append(step.name)
        else:
            _new_stage(step, stage_of, members, stage_meta)
            for inp, kind in zip(step.inputs, kinds, strict=True):
                edge_specs.append((inp, step.name, kind))

    edges = tuple(
        Edge(
            id=i,
            src_stage=stage_of[src],
            src_step=src,
            dst_stage=stage_of[dst],
            dst_step=dst,
            partitioning=kind,
            src_parallelism=by_name[src].parallelism,
            dst_parallelism=by_name[dst].parallelism,
        )
        for i, (src, dst, kind) in enumerate(edge_specs)
    )
    stages = tuple(
        Stage(
            name=name,
            steps=tuple(steps),
            parallelism=stage_meta[name][0],
            resources=stage_meta[name][1],
            inputs=tuple(e.id for e in edges if e.dst_stage == name),
            outputs=tuple(e.id for e in edges if e.src_stage == name),
        )
        for name, steps in members.items()
    )
    return Plan(flow=flow, stages=stages, edges=edges, stage_of=stage_of)


def _keyed_in_one(
    kind: Partitioning, src: StepSpec, dst: StepSpec, stage_steps: list[StepSpec]
) -> bool:
    """A ``key_by`` between two steps of parallelism 1 moves no record to another
    partition: the keyed step joins the sender's actor (no shuffle, no pickling),
    unless that actor already has a keyed step (a task snapshots one keyed state).

    Measured with benchmarks/keyed_sum.py (best of 3, twice): at parallelism 1
    one actor did 3.83M/3.72M records/s, two pipelined actors 3.35M/3.15M.
    """
    return (
        kind is Partitioning.HASH
        and src.parallelism == 1
        and dst.parallelism == 1
        and not any(s.kind.stateful for s in stage_steps)
    )


def _edge_kind(src: StepSpec, dst: StepSpec) -> Partitioning:
    if src.kind is StepKind.KEY_BY:
        return Partitioning.HASH
    if src.parallelism == dst.parallelism:
        return Partitioning.FORWARD
    return Partitioning.REBALANCE


def _new_stage(
    step: StepSpec,
    stage_of: dict[str, str],
    members: dict[str, list[str]],
    stage_meta: dict[str, tuple[int, Resources]],
) -> None:
    stage_of[step.name] = step.name
    members[step.name] = [step.name]
    stage_meta[step.name] = (step.parallelism, step.resources)
