"""The checkpoint protocol's logic without Ray: tracker, store, coordinator, restore."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import rayflow as rf
from rayflow._internal.checkpoint.coordinator import CheckpointCoordinator, CheckpointFailed
from rayflow._internal.checkpoint.manifest import (
    Manifest,
    ObjectInfo,
    OperatorSnapshot,
    decode_offset,
    encode_offset,
    manifest_key,
)
from rayflow._internal.checkpoint.pending import AckOutcome
from rayflow._internal.checkpoint.restore import RestorePoint, assign, list_checkpoint_ids
from rayflow._internal.checkpoint.snapshot import BarrierInfo, IncrementalTracker, apply_chain
from rayflow._internal.checkpoint.store import CompletedCheckpointStore
from rayflow._internal.plan import build_plan
from rayflow._internal.storage import open_storage


def _obj(cid: int, mode: str, name: str = "op") -> ObjectInfo:
    return ObjectInfo(f"j/checkpoints/{cid:010d}/{name}.snapshot", 10, "x", cid, mode)


def test_tracker_full_then_deltas_of_changed_and_deleted_keys() -> None:
    tracker = IncrementalTracker(full_every=3)
    values = {"a": 1, "b": 2}
    first = tracker.take(1, 0, values, {"a", "b"})
    assert first["mode"] == "full"
    assert tracker.written(1, _obj(1, "full")) == [_obj(1, "full")]
    values["a"] = 5
    del values["b"]
    second = tracker.take(2, 1, values, {"a", "b"})
    assert second == {"mode": "delta", "values": {"a": 5}, "deleted": ["b"]}
    assert tracker.written(2, _obj(2, "delta")) == [_obj(1, "full"), _obj(2, "delta")]
    tracker.take(3, 2, values, set())
    tracker.written(3, _obj(3, "delta"))
    # Three links: the next snapshot is full again, which bounds the chain.
    assert tracker.take(4, 3, values, set())["mode"] == "full"


def test_tracker_carries_the_keys_of_a_failed_checkpoint_into_the_next_delta() -> None:
    tracker = IncrementalTracker(full_every=10)
    values = {"a": 1, "b": 1, "c": 1}
    tracker.take(1, 0, values, set(values))
    tracker.written(1, _obj(1, "full"))
    tracker.take(2, 1, values, {"a"})
    tracker.written(2, _obj(2, "delta"))  # written, but checkpoint 2 never completes
    delta = tracker.take(3, 1, values, {"b"})  # last completed is still 1
    assert delta["mode"] == "delta" and set(delta["values"]) == {"a", "b"}
    assert tracker.written(3, _obj(3, "delta")) == [_obj(1, "full"), _obj(3, "delta")]


def test_apply_chain_rebuilds_state_and_filters_keys() -> None:
    docs = [
        {"keyed": {"mode": "full", "values": {"a": 1, "b": 2, "c": 3}, "deleted": []}},
        {"keyed": {"mode": "delta", "values": {"a": 10}, "deleted": ["b"]}},
    ]
    assert apply_chain(docs) == {"a": 10, "c": 3}
    assert apply_chain(docs, keep=lambda k: k != "c") == {"a": 10}


def test_offsets_round_trip_through_json() -> None:
    for offset in (0, 12345, "abc", {"file": "x", "pos": 3}, (1, 2), b"raw"):
        assert decode_offset(encode_offset(offset)) == offset
    assert encode_offset(7) == {"json": 7}
    assert "pickle" in encode_offset((1, 2))  # a tuple would come back as a list


def _manifest(cid: int, objects: list[ObjectInfo]) -> Manifest:
    ops = tuple(OperatorSnapshot("op", i, o, "step", (0, 128), (o,)) for i, o in enumerate(objects))
    return Manifest("j", cid, "checkpoint", 0.0, 1.0, {"steps": []}, ops)


def test_retention_keeps_what_kept_checkpoints_need_and_never_in_flight_objects(
    tmp_path: Path,
) -> None:
    storage = open_storage(tmp_path)
    store = CompletedCheckpointStore(storage, "j", retain=2)
    base = _obj(3, "full", "base")
    for cid in range(1, 7):
        storage.put(f"j/checkpoints/{cid:010d}/op.snapshot", b"x")
    storage.put(base.key, b"x")
    for cid in (3, 4, 5):
        objs = [base, _obj(cid, "delta")] if cid > 3 else [base]
        manifest = _manifest(cid, objs)
        storage.put(manifest_key("j", cid), manifest.to_json())
        store.add(manifest)
    storage.put(manifest_key("j", 1), _manifest(1, [_obj(1, "full")]).to_json())
    store.collect_garbage()
    keys = set(storage.list("j/"))
    assert manifest_key("j", 3) not in keys and manifest_key("j", 1) not in keys
    assert base.key in keys  # shared by the kept checkpoints 4 and 5
    assert "j/checkpoints/0000000006/op.snapshot" in keys  # in flight: never touched
    assert "j/checkpoints/0000000002/op.snapshot" not in keys  # a failed one's leftovers
    assert list_checkpoint_ids(str(tmp_path), "j") == [4, 5]


class FakeGateway:
    """Operators that acknowledge (or not) as the test says."""

    def __init__(self, keys: list[tuple[str, int]], behaviour: str = "ack"):
        self.keys = keys
        self.behaviour = behaviour
        self.coordinator: CheckpointCoordinator | None = None
        self.notified: list[int] = []
        self.outcomes: list[AckOutcome] = []

    def actor_keys(self) -> list[tuple[str, int]]:
        return list(self.keys)

    async def trigger_sources(self, barrier: BarrierInfo) -> None:
        assert self.coordinator is not None
        for stage, p in self.keys:
            info = ObjectInfo(
                f"{barrier.object_prefix}{stage}-{p}.snapshot",
                3,
                "abc",
                barrier.checkpoint_id,
                "plain",
            )
            if self.behaviour == "ack":
                snap = OperatorSnapshot(stage, p, info)
                self.outcomes.append(
                    self.coordinator.acknowledge(barrier.checkpoint_id, (stage, p), snap)
                )
                # A retried call delivers the same acknowledgement twice.
                self.outcomes.append(
                    self.coordinator.acknowledge(barrier.checkpoint_id, (stage, p), snap)
                )
            elif self.behaviour == "decline":
                self.coordinator.decline(barrier.checkpoint_id, (stage, p), "disk full")
                return

    async def notify_complete(self, checkpoint_id: int, *, wait: bool) -> None:
        self.notified.append(checkpoint_id)


def _coordinator(tmp_path: Path, behaviour: str, **options: Any) -> tuple[Any, FakeGateway]:
    gateway = FakeGateway([("src", 0), ("sum", 0), ("sum", 1)], behaviour)
    config = rf.Checkpointing(storage=str(tmp_path), interval_s=3600, **options)
    coordinator = CheckpointCoordinator("j", {"steps": []}, config, gateway)
    gateway.coordinator = coordinator
    return coordinator, gateway


def test_a_checkpoint_commits_through_its_manifest(tmp_path: Path) -> None:
    async def scenario() -> None:
        coordinator, gateway = _coordinator(tmp_path, "ack")
        loop = asyncio.create_task(coordinator.run(lambda reasons: None))
        manifest = await coordinator.trigger()
        coordinator.close()
        await loop
        assert manifest.checkpoint_id == 1
        assert gateway.notified == [1]
        assert gateway.outcomes.count(AckOutcome.SUCCESS) == 3
        assert gateway.outcomes.count(AckOutcome.DUPLICATE) == 3
        stored = Manifest.from_json(open_storage(tmp_path).get(manifest_key("j", 1)))
        assert {(o.stage, o.partition) for o in stored.operators} == set(gateway.keys)
        assert coordinator.stats()["completed"] == 1

    asyncio.run(scenario())


def test_declined_and_expired_checkpoints_fail_with_their_reason(tmp_path: Path) -> None:
    async def scenario() -> None:
        coordinator, _ = _coordinator(tmp_path / "a", "decline")
        loop = asyncio.create_task(coordinator.run(lambda reasons: None))
        with pytest.raises(CheckpointFailed, match=r"declined by rayflow/j/src/0: disk full"):
            await coordinator.trigger()
        coordinator.close()
        await loop

        silent, _ = _coordinator(tmp_path / "b", "silent", timeout_s=0.2)
        loop = asyncio.create_task(silent.run(lambda reasons: None))
        with pytest.raises(CheckpointFailed, match=r"expired after 0.2 s; still waiting for src/0"):
            await silent.trigger()
        silent.close()
        await loop
        assert not list_checkpoint_ids(str(tmp_path / "b"), "j")

    asyncio.run(scenario())


def test_consecutive_failures_over_the_limit_are_fatal(tmp_path: Path) -> None:
    async def scenario() -> list[str]:
        coordinator, _ = _coordinator(tmp_path, "decline", max_consecutive_failures=2)
        fatal: list[str] = []
        loop = asyncio.create_task(coordinator.run(fatal.extend))
        for _ in range(2):
            with pytest.raises(CheckpointFailed):
                await coordinator.trigger()
        coordinator.close()
        await loop
        return fatal

    reasons = asyncio.run(scenario())
    assert len(reasons) == 1 and "2 checkpoints failed in a row" in reasons[0]
    assert "max_consecutive_failures=2" in reasons[0] and "disk full" in reasons[0]


def test_the_job_fails_only_when_no_checkpoint_completed_for_the_gap() -> None:
    from rayflow._internal.checkpoint.failures import CheckpointFailureManager

    manager = CheckpointFailureManager(max_gap_s=60.0, now=0.0)
    assert manager.failed("storage down", now=30.0) is None  # 100 failures, 59 s: fine
    for t in range(31, 59):
        assert manager.failed("storage down", now=float(t)) is None
    verdict = manager.failed("storage down", now=61.0)
    assert verdict is not None and "no checkpoint completed for 61 s" in verdict
    manager.succeeded(now=100.0)
    assert manager.failed("again", now=150.0) is None  # the gap counts from the success
    never = CheckpointFailureManager(max_gap_s=None, now=0.0)
    assert never.failed("down", now=10**6) is None


def test_failed_checkpoints_back_off_exponentially_up_to_a_cap() -> None:
    from rayflow._internal.checkpoint.policy import TriggerPolicy

    policy = TriggerPolicy(1.0, 0.0, now=0.0)
    waits = []
    for failures in range(1, 8):
        policy.backoff(failures, max_backoff_s=30.0)
        waits.append(policy.backoff_s)
    assert 0.8 <= waits[0] <= 1.0 and 1.6 <= waits[1] <= 2.0 and 3.2 <= waits[2] <= 4.0
    assert all(24.0 <= w <= 30.0 for w in waits[5:])  # capped
    policy.started(0.0)
    policy.ended(1.0)
    assert policy.next_due(1.0) >= 1.0 + waits[-1]
    policy.backoff(0, max_backoff_s=30.0)
    assert policy.next_due(1.0) == 1.0  # a success: the plain interval again


def test_a_manifest_that_exists_is_never_overwritten(tmp_path: Path) -> None:
    async def scenario() -> None:
        open_storage(tmp_path).put(manifest_key("j", 1), b"someone else's")
        coordinator, _ = _coordinator(tmp_path, "ack")
        fatal: list[str] = []
        loop = asyncio.create_task(coordinator.run(fatal.extend))
        with pytest.raises(CheckpointFailed, match="another run wrote a manifest") as info:
            await coordinator.trigger()
        coordinator.close()
        await loop
        assert open_storage(tmp_path).get(manifest_key("j", 1)) == b"someone else's"
        # Two runs committing to one storage: this one stops at once.
        assert info.value.fatal and fatal and "another run" in fatal[0]

    asyncio.run(scenario())


def test_restore_assignment_redistributes_key_groups_at_another_parallelism() -> None:
    def flow(par: int) -> rf.Dataflow:
        f = rf.Dataflow("j", parallelism=par)
        s = f.source("src", rf.testing.from_items([1], partitions=4))
        s.key_by("k", str).reduce("sum", lambda a, b: a + b, initial=0).sink(
            "out", rf.testing.Collect()
        )
        return f

    old = build_plan(flow(2).spec())
    ops = []
    for p, groups in ((0, (0, 64)), (1, (64, 128))):
        obj = _obj(5, "full", f"sum-{p}")
        ops.append(OperatorSnapshot("sum", p, obj, "sum", groups, (obj,)))
    for p in range(2):
        ops.append(
            OperatorSnapshot(
                "src",
                p,
                _obj(5, "plain", f"src-{p}"),
                sources={"src": {str(sp): {"json": 10 + sp} for sp in range(p, 4, 2)}},
            )
        )
    from rayflow._internal.checkpoint.manifest import describe_flow

    manifest = Manifest("j", 5, "checkpoint", 0.0, 1.0, describe_flow(old), tuple(ops))
    new = build_plan(flow(3).spec())
    result = assign(new, RestorePoint("/s", manifest), continue_in="/s")
    # New partition 1 owns key groups 43..85: it needs both old halves, filtered.
    mid = result[("sum", 1)]
    assert len(mid.keyed_chains) == 2 and mid.key_filter == (43, 86, 128)
    assert mid.continue_chain is None  # a rescaled partition starts with a full snapshot
    assert result[("src", 0)].source_offsets == {0: 10, 3: 13}
    # The sink's committables of old partitions 0 and 1 go to new partitions 0 and 1.
    assert [i.key for _, i in result[("sum", 0)].sink_objects] == [_obj(5, "full", "sum-0").key]
    same = assign(old, RestorePoint("/s", manifest), continue_in="/s")
    assert same[("sum", 1)].continue_chain == ops[1].chain and same[("sum", 1)].key_filter is None
    elsewhere = assign(old, RestorePoint("/s", manifest), continue_in="/other")
    assert elsewhere[("sum", 1)].continue_chain is None


def test_restore_refuses_a_renamed_stateful_step() -> None:
    f = rf.Dataflow("j")
    f.source("src", rf.testing.from_items([1])).key_by("k", str).reduce(
        "renamed", lambda a, b: a, initial=0
    ).sink("out", rf.testing.Collect())
    obj = _obj(1, "full")
    manifest = Manifest(
        "j",
        1,
        "checkpoint",
        0.0,
        1.0,
        {"max_parallelism": 128, "steps": [{"name": "sum", "kind": "reduce", "stage": "sum"}]},
        (OperatorSnapshot("sum", 0, obj, "sum", (0, 128), (obj,)),),
    )
    with pytest.raises(rf.ConfigError, match=r"state of step 'sum'.*no longer has"):
        assign(build_plan(f.spec()), RestorePoint("/s", manifest))


def test_untracked_snapshots_are_full_and_a_failed_one_forces_the_next_full() -> None:
    tracker = IncrementalTracker(full_every=10)
    values = {"a": 1}
    assert tracker.take(1, 0, values, None)["mode"] == "full"  # changes were not tracked
    tracker.written(1, _obj(1, "full"))
    assert tracker.take(2, 1, values, {"a"})["mode"] == "delta"
    tracker.written(2, _obj(2, "delta"))
    assert tracker.take(3, 2, values, None)["mode"] == "full"
    tracker.written(3, _obj(3, "full"))  # checkpoint 3 fails ...
    # ... and what changed before it is unknown: the next snapshot cannot be a delta.
    assert tracker.take(4, 2, values, {"a"})["mode"] == "full"


def test_restart_tracker_backs_off_and_gives_up_per_window() -> None:
    from rayflow._internal.job.restarts import RestartTracker
    from rayflow.errors import Failure

    tracker = RestartTracker(
        rf.RestartStrategy(max_failures=2, window_s=10, backoff_s=1, max_backoff_s=3)
    )
    boom = Failure(kind="user", message="boom")
    assert tracker.failed(0.0, boom) == 1
    assert tracker.failed(1.0, boom) == 2
    assert tracker.failed(2.0, boom) is None  # a third failure within 10 s
    later = RestartTracker(
        rf.RestartStrategy(max_failures=2, window_s=10, backoff_s=1, max_backoff_s=3)
    )
    assert later.failed(0.0, boom) == 1
    assert later.failed(5.0, boom) == 2
    assert later.failed(20.0, boom) == 3  # the old ones left the window; capped backoff
    later.stable()
    assert later.failed(21.0, boom) == 1  # a completed checkpoint resets the backoff
    assert RestartTracker(None).failed(0.0, boom) is None  # no checkpointing: no restart


def _layout_flow(map_parallelism: int, parallelism: int = 2) -> rf.Dataflow:
    f = rf.Dataflow("j", parallelism=parallelism)
    src = f.source("src", rf.testing.from_items([1, 2], partitions=2))
    other = f.source("other", rf.testing.from_items([3], partitions=1), parallelism=1)
    doubled = src.map("double", lambda x: 2 * x, parallelism=map_parallelism)
    sums = (
        doubled.union("both", other)
        .key_by("k", str)
        .reduce("sum", lambda a, b: a + b, initial=0, on_error="dead_letter")
    )
    sums.sink("out", rf.testing.Collect())
    f.dead_letters().sink("dead", rf.testing.Collect())
    return f


@pytest.mark.parametrize("map_parallelism", [1, 2, 3])
def test_edge_ids_are_rebuilt_from_the_manifest_as_the_plan_numbers_them(
    map_parallelism: int,
) -> None:
    from rayflow._internal.checkpoint.manifest import describe_flow
    from rayflow._internal.checkpoint.restore import _edges_of

    plan = build_plan(_layout_flow(map_parallelism).spec())
    assert _edges_of(describe_flow(plan)) == [(e.src_step, e.dst_step) for e in plan.edges]


def _in_flight_manifest(plan: Any, *, inflight: bool = True) -> Manifest:
    """Checkpoint 4 of ``plan``: every partition's snapshot, unaligned (records in
    flight) or aligned."""
    from rayflow._internal.checkpoint.manifest import describe_flow

    ops = [
        OperatorSnapshot(st.name, p, _obj(4, "plain", f"{st.name}-{p}"), inflight=inflight)
        for st in plan.stages
        for p in range(st.parallelism)
    ]
    return Manifest("j", 4, "checkpoint", 0.0, 1.0, describe_flow(plan), tuple(ops))


def test_r15_in_flight_data_is_restored_only_into_the_layout_it_was_taken_in() -> None:
    """R15: an unaligned snapshot's in-flight records are addressed by edge id. A map at
    parallelism 2 beside a source of 2 shares its actor; at 3 it does not, and every
    edge id after it moves: those records would have gone to other steps (or been lost)."""

    old = build_plan(_layout_flow(2).spec())
    manifest = _in_flight_manifest(old)
    # Another parallelism in the same layout (every step at 3): restored.
    assert assign(build_plan(_layout_flow(3, 3).spec()), RestorePoint("/s", manifest))
    with pytest.raises(rf.ConfigError, match=r"new: src -> double.*savepoint"):
        assign(build_plan(_layout_flow(3).spec()), RestorePoint("/s", manifest))
    # Without records in flight (an aligned checkpoint) the layout may change.
    aligned = _in_flight_manifest(old, inflight=False)
    assert assign(build_plan(_layout_flow(3).spec()), RestorePoint("/s", aligned))


def test_r17_partials_in_flight_are_restored_only_at_their_windows_parallelism() -> None:
    """R17: rescaled, a window partition takes the highest old watermark, which may have
    closed a window an in-flight partial was on time for; a partial cannot go to .late
    record by record, so an unaligned checkpoint restores only at the same parallelism."""

    def flow(par: int, window_par: int, combine: bool = True) -> rf.Dataflow:
        f = rf.Dataflow("j", parallelism=par)
        timed = f.source(
            "events", rf.testing.from_items([("k", 0.0)], partitions=2)
        ).with_event_time("ts", lambda e: e[1])
        timed.key_by("k", lambda e: e[0]).window(
            "count",
            rf.windows.Tumbling(60.0),
            rf.windows.Count(),
            combine=combine,
            parallelism=window_par,
        ).sink("out", rf.testing.Collect(), parallelism=window_par)
        return f

    old = build_plan(flow(2, 2).spec())
    manifest = _in_flight_manifest(old)
    assert assign(build_plan(flow(3, 2).spec()), RestorePoint("/s", manifest))  # senders only
    with pytest.raises(rf.ConfigError, match=r"window 'count' \(combine=True\).* at 3.*savepoint"):
        assign(build_plan(flow(2, 3).spec()), RestorePoint("/s", manifest))
    assert assign(build_plan(flow(2, 3, combine=False).spec()), RestorePoint("/s", manifest))
    aligned = _in_flight_manifest(old, inflight=False)
    assert assign(build_plan(flow(2, 3).spec()), RestorePoint("/s", aligned))


def test_watermarks_restore_per_step_when_steps_share_actors_differently() -> None:
    """At parallelism 1 a window joins its source's actor (plan.py); its restored watermark
    must come from the actors that ran it before, whatever they were named."""
    from rayflow._internal.checkpoint.manifest import describe_flow

    def flow(par: int) -> rf.Dataflow:
        f = rf.Dataflow("j", parallelism=par)
        events = f.source("events", rf.testing.from_items([(1, 0.0)], partitions=2))
        timed = events.with_event_time("ts", lambda e: e[1])
        timed.key_by("k", lambda e: e[0]).window(
            "count", rf.windows.Tumbling(60.0), rf.windows.Count()
        ).sink("out", rf.testing.Collect())
        return f

    old = build_plan(flow(2).spec())
    assert [s.name for s in old.stages] == ["events", "count"]
    ops = []
    for p in range(2):
        ops.append(
            OperatorSnapshot(
                "events",
                p,
                _obj(3, "plain", f"e{p}"),
                event_time={"input": None, "max_ts": {"ts": {str(p): 100.0 + p}}, "ops": {}},
            )
        )
        obj = _obj(3, "full", f"c{p}")
        ops.append(
            OperatorSnapshot(
                "count",
                p,
                obj,
                "count",
                (0, 64) if p == 0 else (64, 128),
                (obj,),
                event_time={"input": 90.0 + p, "max_ts": {}, "ops": {"count": 90.0 + p}},
            )
        )
    manifest = Manifest("j", 3, "checkpoint", 0.0, 1.0, describe_flow(old), tuple(ops))
    new = build_plan(flow(1).spec())
    assert [s.name for s in new.stages] == ["events"]
    (assignment,) = assign(new, RestorePoint("/s", manifest)).values()
    assert assignment.event_time is not None
    assert assignment.event_time["ops"] == {"count": 91.0}
    assert assignment.event_time["max_ts"] == {"ts": {"0": 100.0, "1": 101.0}}
