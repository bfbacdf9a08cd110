"""Checkpoints on a real Ray, into a real S3 server (and a local folder where it differs).

The whole jobs here run on S3 only: the local folder is the checkpoint storage of
every chaos and integration test elsewhere, and both backends pass the same storage
contract tests (tests/storage/test_storage.py). Running each job twice cost the
suite ~47 s for no path of its own.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from typing import Any

import pytest

import rayflow as rf
from rayflow._internal.checkpoint.manifest import MANIFEST_NAME, checkpoints_prefix
from rayflow._internal.checkpoint.restore import (
    latest_checkpoint,
    list_checkpoint_ids,
    open_restore_point,
    read_keyed_state,
    read_manifest,
)
from rayflow._internal.storage import open_storage

#: The jobs below run against the S3 server (see the module docstring).
on_s3 = pytest.mark.parametrize("storage_uri", ["s3"], indirect=True)


def _wait_for(predicate: Any, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s"
        time.sleep(0.1)


def clicks(partition: int, offset: int) -> tuple[str, int]:
    """A replayable record: a function of its position only."""
    return f"user{(offset * 7 + partition * 3) % 41}", offset % 5 + 1


def views(partition: int, offset: int) -> tuple[str, int]:
    return f"user{(offset * 11 + partition) % 41}", 10


def expected_sums(offsets: dict[str, dict[int, int]]) -> dict[str, int]:
    """The per-user totals that exactly the records before ``offsets`` produce."""
    totals: Counter[str] = Counter()
    for step, fn in (("clicks", clicks), ("views", views)):
        for partition, offset in offsets.get(step, {}).items():
            for i in range(offset):
                user, amount = fn(partition, i)
                totals[user] += amount
    return dict(totals)


def _union_and_shuffle(name: str, rate: float | None = 4000) -> rf.Dataflow:
    flow = rf.Dataflow(name, parallelism=2)
    a = flow.source("clicks", rf.sources.Generator(clicks, partitions=3, rate=rate))
    b = flow.source("views", rf.sources.Generator(views, partitions=1, rate=rate), parallelism=1)
    both = a.union("both", b.map("widen", lambda r: r, parallelism=2))
    totals = both.key_by("by_user", lambda r: r[0]).reduce(
        "total", lambda acc, r: acc + r[1], initial=0
    )
    totals.sink("out", rf.testing.Collect())
    return flow


@on_s3
def test_snapshots_of_a_union_and_a_shuffle_are_consistent(storage_uri: str) -> None:
    """State at checkpoint n equals what exactly the offsets in manifest n produce."""
    config = rf.Checkpointing(storage=storage_uri, interval_s=0.3, full_every=3, retain=10)
    handle = rf.start(_union_and_shuffle("consistent"), checkpoint=config)
    try:
        _wait_for(
            lambda: (handle.checkpoint_stats() or {}).get("completed", 0) >= 5, what="5 checkpoints"
        )
    finally:
        result = handle.stop()
    ids = list_checkpoint_ids(storage_uri, "consistent")
    assert len(ids) >= 5
    checked = 0
    for cid in ids:
        point = open_restore_point(f"{storage_uri}/consistent/checkpoints/{cid:010d}")
        offsets = point.manifest.sources
        assert set(offsets) == {"clicks", "views"}
        assert sorted(offsets["clicks"]) == [0, 1, 2] and sorted(offsets["views"]) == [0]
        state = read_keyed_state(point, "total")
        assert state == expected_sums(offsets), f"checkpoint {cid}"
        checked += 1
    assert checked == len(ids)
    # The final checkpoint covers everything the job emitted.
    final = open_restore_point(
        f"{storage_uri}/consistent/checkpoints/{result.final_checkpoint:010d}"
    )
    final_state = read_keyed_state(final, "total")
    last_output: dict[str, int] = {}
    for user, total in result.output("out"):
        last_output[user] = total
    assert last_output == final_state


@on_s3
def test_manifest_lists_every_step_and_partition_with_sizes_and_checksums(
    storage_uri: str,
) -> None:
    config = rf.Checkpointing(storage=storage_uri, interval_s=0.2)
    # Bounded, so that the job ends by itself with a final checkpoint.
    flow2 = rf.Dataflow("manifest", parallelism=2)
    a = flow2.source("clicks", rf.sources.Generator(clicks, partitions=3, limit=3000))
    b = flow2.source("views", rf.sources.Generator(views, partitions=1, limit=2000), parallelism=1)
    both = a.union("both", b.map("widen", lambda r: r, parallelism=2))
    both.key_by("by_user", lambda r: r[0]).reduce(
        "total", lambda acc, r: acc + r[1], initial=0
    ).sink("out", rf.testing.Collect())
    result = rf.run(flow2, checkpoint=config)
    point = latest_checkpoint(storage_uri, "manifest")
    assert point is not None
    manifest = point.manifest
    assert manifest.checkpoint_id == result.final_checkpoint
    assert manifest.format == 2 and manifest.kind == "checkpoint"
    assert manifest.run_id and all(manifest.run_id in k for k in manifest.object_keys())
    steps = {s["name"]: s for s in manifest.flow["steps"]}
    assert set(steps) == {"clicks", "views", "widen", "both", "by_user", "total", "out"}
    assert steps["views"]["parallelism"] == 1 and steps["total"]["parallelism"] == 2
    expected_actors = {
        ("clicks", 0),
        ("clicks", 1),
        ("views", 0),
        ("widen", 0),
        ("widen", 1),
        ("both", 0),
        ("both", 1),
        ("total", 0),
        ("total", 1),
    }
    assert {(o.stage, o.partition) for o in manifest.operators} == expected_actors
    storage = open_storage(storage_uri)
    for op in manifest.operators:
        for info in {op.object, *op.chain}:
            data = storage.get(info.key)
            assert len(data) == info.size
            assert hashlib.sha256(data).hexdigest() == info.sha256
    keyed = [o for o in manifest.operators if o.keyed_step == "total"]
    assert sorted(o.key_groups for o in keyed) == [(0, 64), (64, 128)]  # type: ignore[type-var]
    assert manifest.sources == {"clicks": {0: 3000, 1: 3000, 2: 3000}, "views": {0: 2000}}
    assert read_keyed_state(point, "total") == expected_sums(manifest.sources)


@on_s3
def test_coordinator_killed_before_the_manifest_leaves_no_checkpoint(storage_uri: str) -> None:
    config = rf.Checkpointing(storage=storage_uri, interval_s=0.3, retain=100)
    faults = rf.testing.Faults(crash_coordinator_before_manifest=3)
    handle = rf.start(_union_and_shuffle("crashing"), checkpoint=config, faults=faults)
    storage = open_storage(storage_uri)
    try:
        # The coordinator exits with every snapshot of checkpoint 3 written ...
        _wait_for(lambda: handle.status() is rf.JobStatus.RECOVERING, what="the crash")
        third = [k for k in storage.list(checkpoints_prefix("crashing")) if "/0000000003/" in k]
        assert len(third) == 9 and not any(k.endswith(MANIFEST_NAME) for k in third)
        # ... so checkpoint 3 does not exist: the driver starts a new coordinator
        # from checkpoint 2, and the job goes on.
        _wait_for(lambda: len(handle.recoveries()) == 1, what="a coordinator restart")
        (recovery,) = handle.recoveries()
        assert recovery["restored_checkpoint"] == 2
        _wait_for(
            lambda: (handle.checkpoint_stats() or {}).get("completed", 0) >= 2,
            what="checkpoints after the restart",
        )
    finally:
        result = handle.stop()
    # Checkpoint 3 never existed and its id was never reused.
    ids = list_checkpoint_ids(storage_uri, "crashing")
    assert ids[:2] == [1, 2] and 3 not in ids and ids[2] == 4
    # And the output is exactly-once across the restart.
    final = open_restore_point(f"{storage_uri}/crashing/checkpoints/{result.final_checkpoint:010d}")
    last: dict[str, int] = {}
    for user, total in result.output("out"):
        last[user] = total
    assert last == read_keyed_state(final, "total") == expected_sums(final.manifest.sources)


def _touch_one_percent(partition: int, offset: int) -> tuple[int, int]:
    """The first 10,000 records touch 10,000 keys; after that only 100 keys change."""
    key = offset if offset < 10_000 else offset % 100
    return key, 1


@on_s3
def test_incremental_checkpoint_after_one_percent_changed_is_small(storage_uri: str) -> None:
    config = rf.Checkpointing(storage=storage_uri, interval_s=3600, full_every=10)
    flow = rf.Dataflow("incremental")
    src = flow.source("updates", rf.sources.Generator(_touch_one_percent, rate=20_000))
    src.key_by("key", lambda r: r[0]).reduce(
        "count", lambda acc, r: acc + r[1], initial=0, parallelism=1
    ).sink("out", rf.testing.Discard(), parallelism=2)
    handle = rf.start(flow, checkpoint=config)
    try:
        _wait_for(
            lambda: sum(e.get("state_keys", 0) for e in handle.metrics()["count"]) >= 10_000,
            what="10,000 keys",
        )
        full_id = handle.checkpoint()
        time.sleep(0.5)  # 1% of the keys change meanwhile
        delta_id = handle.checkpoint()
    finally:
        handle.stop()
    storage = open_storage(storage_uri)

    def keyed_object(cid: int) -> Any:
        manifest = read_manifest(storage_uri, f"incremental/checkpoints/{cid:010d}/manifest.json")
        (op,) = [o for o in manifest.operators if o.keyed_step == "count"]
        return op

    full, delta = keyed_object(full_id), keyed_object(delta_id)
    assert full.object.mode == "full" and delta.object.mode == "delta"
    assert delta.chain == (full.object, delta.object)
    ratio = delta.object.size / full.object.size
    assert ratio < 0.05, f"incremental {delta.object.size} B vs full {full.object.size} B"
    assert storage.get(full.object.key)  # the base is still there


@on_s3
def test_retention_deletes_old_checkpoints_and_keeps_shared_objects(storage_uri: str) -> None:
    # 16,000 keys (8,000 per partition): enough for incremental snapshots, so that the kept
    # checkpoints' chains start with a full snapshot of an older checkpoint.
    config = rf.Checkpointing(storage=storage_uri, interval_s=0.15, retain=2, full_every=100)
    flow = rf.Dataflow("retention", parallelism=2)
    src = flow.source(
        "n", rf.sources.Generator(lambda p, i: (i % 16_000, 1), partitions=2, rate=60_000)
    )
    src.key_by("k", lambda r: r[0]).reduce("total", lambda a, r: a + r[1], initial=0).sink(
        "out", rf.testing.Discard()
    )
    handle = rf.start(flow, checkpoint=config)
    try:
        _wait_for(
            lambda: (handle.checkpoint_stats() or {}).get("completed", 0) >= 9, what="9 checkpoints"
        )
    finally:
        handle.stop()
    # The final checkpoint's retention pass ends before the job does.
    ids = list_checkpoint_ids(storage_uri, "retention")
    assert len(ids) == 2, ids
    storage = open_storage(storage_uri)
    keys = set(storage.list(checkpoints_prefix("retention")))
    needed: set[str] = set()
    for cid in ids:
        point = open_restore_point(f"{storage_uri}/retention/checkpoints/{cid:010d}")
        needed |= point.manifest.object_keys()
        needed.add(f"retention/checkpoints/{cid:010d}/{MANIFEST_NAME}")
        read_keyed_state(point, "total")  # everything it needs is readable
    assert needed <= keys  # nothing a kept checkpoint needs was deleted
    assert keys == needed  # and everything else was
    older = {k.split("/")[2] for k in needed} - {f"{cid:010d}" for cid in ids}
    assert older, "expected the kept chains to share an object of an older checkpoint"


@on_s3
def test_savepoint_restore_from_and_retention_never_touches_it(
    storage_uri: str, tmp_path: Any
) -> None:
    config = rf.Checkpointing(storage=storage_uri, interval_s=0.2, retain=1)
    handle = rf.start(_union_and_shuffle("saved"), checkpoint=config)
    savepoint = str(tmp_path / "savepoint")
    try:
        _wait_for(lambda: (handle.checkpoint_stats() or {}).get("completed", 0) >= 2)
        assert handle.savepoint(savepoint) == savepoint
        _wait_for(lambda: (handle.checkpoint_stats() or {}).get("completed", 0) >= 6)
    finally:
        handle.stop()
    point = open_restore_point(savepoint)
    assert point.manifest.kind == "savepoint"
    saved_state = read_keyed_state(point, "total")  # intact after later checkpoints
    assert saved_state == expected_sums(point.manifest.sources)

    # A new job continues from the savepoint: its state starts where it ended.
    restarted = rf.start(
        _union_and_shuffle("saved-again"),
        restore_from=savepoint,
        checkpoint=rf.Checkpointing(storage=storage_uri, interval_s=0.2),
    )
    try:
        time.sleep(1.0)
    finally:
        result = restarted.stop()
    final = latest_checkpoint(storage_uri, "saved-again")
    assert final is not None and final.manifest.checkpoint_id > point.manifest.checkpoint_id
    assert read_keyed_state(final, "total") == expected_sums(final.manifest.sources)
    last: dict[str, int] = {}
    for user, total in result.output("out"):
        last[user] = total
    assert last == {u: t for u, t in expected_sums(final.manifest.sources).items() if u in last}


@on_s3
def test_a_corrupt_snapshot_is_never_restored(storage_uri: str, tmp_path: Any) -> None:
    config = rf.Checkpointing(storage=storage_uri, interval_s=5)
    handle = rf.start(_union_and_shuffle("corrupt"), checkpoint=config)
    savepoint = str(tmp_path / "sp")
    try:
        time.sleep(0.5)
        handle.savepoint(savepoint)
    finally:
        handle.stop()
    point = open_restore_point(savepoint)
    victim = next(o for o in point.manifest.operators if o.keyed_step == "total").object
    local = open_storage(savepoint)
    data = bytearray(local.get(victim.key))
    data[-3] ^= 0xFF
    local.put(victim.key, bytes(data))
    with pytest.raises(rf.JobFailedError, match="does not match its manifest"):
        rf.run(_union_and_shuffle("corrupt-restore"), restore_from=savepoint)


def test_an_existing_checkpoint_storage_needs_resume(storage_uri: str) -> None:
    config = rf.Checkpointing(storage=storage_uri, interval_s=0.2)
    flow = rf.Dataflow("twice-stored")
    flow.source("n", rf.sources.Generator(lambda p, i: i, limit=100)).sink(
        "out", rf.testing.Collect()
    )
    rf.run(flow, checkpoint=config)
    with pytest.raises(rf.ConfigError, match=r"already holds \d+ checkpoint.*resume=True"):
        rf.run(flow, checkpoint=config)


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path: Any) -> None:
    storage = str(tmp_path / "checkpoints")
    config = rf.Checkpointing(storage=storage, interval_s=0.2, retain=5)
    handle = rf.start(_union_and_shuffle("fallback"), checkpoint=config)
    try:
        _wait_for(lambda: (handle.checkpoint_stats() or {}).get("completed", 0) >= 3)
    finally:
        handle.stop()
    ids = list_checkpoint_ids(storage, "fallback")
    latest = open_restore_point(f"{storage}/fallback/checkpoints/{ids[-1]:010d}")
    victim = next(o for o in latest.manifest.operators if o.keyed_step == "total").chain[-1]
    local = open_storage(storage)
    local.put(victim.key, local.get(victim.key)[:-10])  # truncated: size and checksum fail

    resumed = rf.start(_union_and_shuffle("fallback"), checkpoint=config, resume=True)
    try:
        time.sleep(1.0)
    finally:
        result = resumed.stop()
    assert result.restored_checkpoint == ids[-2]
    final = latest_checkpoint(storage, "fallback")
    assert final is not None and final.manifest.checkpoint_id > ids[-1]
    assert read_keyed_state(final, "total") == expected_sums(final.manifest.sources)
