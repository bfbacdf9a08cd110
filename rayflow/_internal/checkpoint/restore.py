"""Finding a checkpoint to restore and handing its state to the new operators.

A restore needs nothing but the plan and the storage. Keyed state is
assigned by key group, so the new parallelism may differ from the old one:
a new partition loads every old object whose key groups overlap its own and
keeps only its keys. Source offsets are kept per source partition (the
source's ``restore_offsets`` may regroup them: file sources match them to
files by name), and the committables of sinks are re-committed (commit is
idempotent).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from rayflow._internal.checkpoint.manifest import (
    CHECKPOINT,
    MANIFEST_NAME,
    Manifest,
    ObjectInfo,
    checkpoint_id_of,
    checkpoints_prefix,
)
from rayflow._internal.keygroups import key_group_range
from rayflow._internal.plan import Plan
from rayflow._internal.runtime.event_time import merge_restored
from rayflow._internal.spec import StepKind
from rayflow._internal.storage import StorageError, open_storage
from rayflow._internal.storage.base import normalize_uri
from rayflow.errors import ConfigError

log = logging.getLogger("rayflow")

ActorKey = tuple[str, int]


@dataclass(frozen=True)
class RestorePoint:
    """A manifest and the storage its object keys are relative to."""

    storage: str
    manifest: Manifest


@dataclass(frozen=True)
class Assignment:
    """What one new operator partition restores."""

    storage: str
    checkpoint_id: int
    source_offsets: dict[int, Any] = field(default_factory=dict)
    keyed_step: str | None = None
    keyed_chains: tuple[tuple[ObjectInfo, ...], ...] = ()
    key_filter: tuple[int, int, int] | None = None  # (start, stop, max_parallelism)
    continue_chain: tuple[ObjectInfo, ...] | None = None
    sink_objects: tuple[tuple[str, ObjectInfo], ...] = ()  # (sink step, object)
    # Unaligned snapshots of this stage's old partitions: (old partition, object),
    # and how many partitions the stage had (their in-flight data is split by it).
    inflight: tuple[tuple[int, ObjectInfo], ...] = ()
    old_parallelism: int = 0
    event_time: dict[str, Any] | None = None  # watermarks (runtime/event_time.py)


def list_checkpoint_ids(storage_uri: str, job: str) -> list[int]:
    """Ids of the job's complete checkpoints (those with a manifest), oldest first."""
    storage = open_storage(storage_uri)
    ids = set()
    for key in storage.list(checkpoints_prefix(job)):
        cid = checkpoint_id_of(key, job)
        if cid is not None and key.endswith("/" + MANIFEST_NAME):
            ids.add(cid)
    return sorted(ids)


def highest_checkpoint_id(storage_uri: str, job: str) -> int:
    """The highest checkpoint id with anything in storage, complete or not (0 if none)."""
    storage = open_storage(storage_uri)
    ids = [checkpoint_id_of(k, job) for k in storage.list(checkpoints_prefix(job))]
    return max((i for i in ids if i is not None), default=0)


def read_manifest(storage_uri: str, key: str) -> Manifest:
    data = open_storage(storage_uri).get(key)
    return Manifest.from_json(data)


def latest_checkpoint(storage_uri: str, job: str) -> RestorePoint | None:
    """The newest complete checkpoint whose manifest reads back; None if there is none."""
    for cid in reversed(list_checkpoint_ids(storage_uri, job)):
        key = f"{checkpoints_prefix(job)}{cid:010d}/{MANIFEST_NAME}"
        try:
            return RestorePoint(normalize_uri(storage_uri), read_manifest(storage_uri, key))
        except (StorageError, ValueError, KeyError) as exc:
            log.warning("skipping unreadable manifest %s: %s", key, exc)
    return None


def open_restore_point(uri: str) -> RestorePoint:
    """A savepoint folder, or one checkpoint's folder ``<root>/<job>/checkpoints/<id>``."""
    root = normalize_uri(uri)
    try:
        manifest = read_manifest(root, MANIFEST_NAME)
    except StorageError as exc:
        raise ConfigError(
            f"restore_from={uri!r}: no readable {MANIFEST_NAME} there ({exc}); pass a "
            "savepoint folder or a checkpoint folder <storage>/<job>/checkpoints/<id>"
        ) from None
    parts = root.rstrip("/").split("/")
    if len(parts) >= 3 and parts[-2] == "checkpoints" and parts[-1].isdigit():
        return RestorePoint("/".join(parts[:-3]), manifest)  # keys relative to the storage root
    return RestorePoint(root, manifest)


def assign(
    plan: Plan, point: RestorePoint, *, continue_in: str | None = None
) -> dict[ActorKey, Assignment]:
    """Split the checkpoint's state over the new plan's operator partitions.

    Incremental chains continue only where the job checkpoints into the same
    storage (``continue_in``) as the restored checkpoint: the objects of a new
    checkpoint must never live in a savepoint, which a person may delete.
    """
    can_continue = (
        continue_in is not None
        and point.manifest.kind == CHECKPOINT
        and normalize_uri(continue_in) == point.storage
    )
    manifest = point.manifest
    _check_compatible(plan, manifest)
    max_par = plan.flow.max_parallelism
    offsets = manifest.sources
    for spec in plan.flow.steps:
        if spec.kind is StepKind.SOURCE and spec.name in offsets:
            # Partitions may mean other inputs now (files matched, topics): the
            # source moves each offset to the partition that reads its input.
            try:
                offsets[spec.name] = spec.connector.restore_offsets(offsets[spec.name])
            except ConfigError as exc:
                raise ConfigError(
                    f"checkpoint {manifest.checkpoint_id}, source step {spec.name!r}: {exc}"
                ) from None
    old_stage_of = {s["name"]: s["stage"] for s in manifest.flow["steps"]}
    result: dict[ActorKey, Assignment] = {}
    for stage in plan.stages:
        head = plan.step(stage.steps[0])
        keyed = next((plan.step(s) for s in stage.steps if plan.step(s).kind.stateful), None)
        sinks = [s for s in stage.steps if plan.step(s).kind is StepKind.SINK]
        # Watermarks are per step: take them from the old actors that ran any of this
        # stage's steps (the steps may have shared actors differently then).
        old_here = {old_stage_of.get(s) for s in stage.steps} - {None}
        timed_ops = [op for op in manifest.operators if op.stage in old_here]
        same_par = all(
            sum(1 for o in manifest.operators if o.stage == name) == stage.parallelism
            for name in old_here
        )
        for q in range(stage.parallelism):
            source_offsets: dict[int, Any] = {}
            if head.kind is StepKind.SOURCE:
                for sp in plan.source_partitions(stage.name, q):
                    if sp in offsets.get(head.name, {}):
                        source_offsets[sp] = offsets[head.name][sp]
            chains: list[tuple[ObjectInfo, ...]] = []
            key_filter = None
            continue_chain = None
            if keyed is not None:
                mine = key_group_range(q, max_par, stage.parallelism)
                for op in manifest.operators:
                    if op.keyed_step != keyed.name or op.key_groups is None:
                        continue
                    start, stop = op.key_groups
                    if start < mine.stop and mine.start < stop:
                        chains.append(op.chain)
                        if (start, stop) == (mine.start, mine.stop) and can_continue:
                            continue_chain = op.chain
                exact = len(chains) == 1 and any(
                    op.keyed_step == keyed.name and op.key_groups == (mine.start, mine.stop)
                    for op in manifest.operators
                )
                if not exact:
                    continue_chain = None
                    key_filter = (mine.start, mine.stop, max_par)
            old_ops = [op for op in manifest.operators if op.stage == stage.name]
            old_par = len(old_ops)
            inflight = tuple(
                (op.partition, op.object)
                for op in old_ops
                if op.inflight and (old_par != stage.parallelism or op.partition == q)
            )
            timed = [
                op.event_time
                for op in timed_ops
                if op.event_time is not None and (not same_par or op.partition == q)
            ]
            event_time = merge_restored(timed) if timed else None
            sink_objects: list[tuple[str, ObjectInfo]] = []
            for sink in sinks:
                old_stage = old_stage_of.get(sink)
                for op in manifest.operators:
                    if op.stage == old_stage and op.partition % stage.parallelism == q:
                        sink_objects.append((sink, op.object))
            result[(stage.name, q)] = Assignment(
                storage=point.storage,
                checkpoint_id=manifest.checkpoint_id,
                source_offsets=source_offsets,
                keyed_step=keyed.name if keyed is not None else None,
                keyed_chains=tuple(chains),
                key_filter=key_filter,
                continue_chain=continue_chain,
                sink_objects=tuple(sink_objects),
                inflight=inflight,
                old_parallelism=old_par,
                event_time=event_time,
            )
    return result


def _check_compatible(plan: Plan, manifest: Manifest) -> None:
    old_max = int(manifest.flow.get("max_parallelism", plan.flow.max_parallelism))
    if old_max != plan.flow.max_parallelism:
        raise ConfigError(
            f"checkpoint {manifest.checkpoint_id} was written with max_parallelism {old_max}; "
            f"the flow has {plan.flow.max_parallelism}. Key groups cannot change: build the "
            f"flow with Dataflow(..., max_parallelism={old_max})"
        )
    if any(op.inflight for op in manifest.operators):
        old_edges = _edges_of(manifest.flow)
        new_edges = [(e.src_step, e.dst_step) for e in plan.edges]
        if old_edges is not None and old_edges != new_edges:
            # In-flight data is addressed by edge id, which only means the same
            # connection in the same layout (rule R15).
            gone = [f"{a} -> {b}" for a, b in old_edges if (a, b) not in new_edges]
            added = [f"{a} -> {b}" for a, b in new_edges if (a, b) not in old_edges]
            changes = [
                f"{what}: {', '.join(edges)}"
                for what, edges in (("new", added), ("gone", gone))
                if edges
            ]
            raise ConfigError(
                f"checkpoint {manifest.checkpoint_id} is unaligned and holds records in "
                "flight between actors, but this flow connects its actors differently ("
                + ("; ".join(changes) or "renumbered")
                + "): a step's parallelism changed which steps share an actor. Restore it "
                "with the parallelism it was taken with, stop that job with a savepoint "
                "(savepoints are aligned: nothing in flight), and restore the savepoint "
                "with the new parallelism"
            )
        _check_partials_stay(plan, manifest)
    old_kinds = {s["name"]: s["kind"] for s in manifest.flow["steps"]}
    new_steps = {s.name: s for s in plan.flow.steps}
    for op in manifest.operators:
        step = op.keyed_step
        if step is None:
            continue
        if step not in new_steps:
            raise ConfigError(
                f"checkpoint {manifest.checkpoint_id} holds state of step {step!r}, which "
                "this flow no longer has; a step's name is its state's identity, so "
                "renaming or removing a stateful step would drop its state. Restore with "
                "the original step name."
            )
        if new_steps[step].kind.value != old_kinds.get(step):
            raise ConfigError(
                f"step {step!r} was a {old_kinds.get(step)} in checkpoint "
                f"{manifest.checkpoint_id} and is a {new_steps[step].kind.value} now; its "
                "state cannot be restored into another kind of step"
            )


def _check_partials_stay(plan: Plan, manifest: Manifest) -> None:
    """Partials in flight (``window(..., combine=True)``) are restored only at the
    window's parallelism (rule R17): rescaled, a window partition takes the highest
    watermark of the old ones, which may have closed a window that another old
    partition's partial in flight was still on time for, and a partial cannot go to
    ``.late`` record by record."""
    old_stage_of = {s["name"]: s["stage"] for s in manifest.flow["steps"]}
    for edge in plan.edges:
        if not plan.combines(edge):
            continue
        old_stage = old_stage_of.get(edge.dst_step)
        old_par = sum(1 for op in manifest.operators if op.stage == old_stage)
        new_par = plan.stage(edge.dst_stage).parallelism
        if old_stage is not None and old_par != new_par:
            raise ConfigError(
                f"checkpoint {manifest.checkpoint_id} is unaligned and may hold partials in "
                f"flight to window {edge.dst_step!r} (combine=True), which ran at parallelism "
                f"{old_par} and would run at {new_par}: restore it at parallelism "
                f"{old_par}, or stop that job with a savepoint (aligned: nothing in flight) "
                "and restore the savepoint at the new parallelism"
            )


def _edges_of(flow: dict[str, Any]) -> list[tuple[str, str]] | None:
    """The (sender step, receiver step) of each edge id of the plan a manifest describes,
    rebuilt as ``build_plan`` numbers them (None for a manifest without the inputs)."""
    steps = flow.get("steps", [])
    if not all("inputs" in s and "stage" in s for s in steps):
        return None
    return [
        (inp, s["name"])
        for s in steps
        if s["kind"] != StepKind.SOURCE.value and s["stage"] == s["name"]
        for inp in s["inputs"]
    ]


def read_keyed_state(point: RestorePoint, step: str) -> dict[Any, Any]:
    """The whole keyed state of ``step`` in a checkpoint, read and verified (for tools)."""
    from rayflow._internal.checkpoint.snapshot import apply_chain, decode

    storage = open_storage(point.storage)
    values: dict[Any, Any] = {}
    found = False
    for op in point.manifest.operators:
        if op.keyed_step != step:
            continue
        found = True
        docs = [decode(storage.get(info.key), info) for info in op.chain]
        values.update(apply_chain(docs))
    if not found:
        steps = sorted({o.keyed_step for o in point.manifest.operators if o.keyed_step})
        raise KeyError(
            f"checkpoint {point.manifest.checkpoint_id} has no state of step "
            f"{step!r}; stateful steps in it: {steps}"
        )
    return values
