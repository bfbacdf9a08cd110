"""Storage faults: checkpoints are declined, the job runs on, and recovers or fails clearly."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

import rayflow as rf
from rayflow._internal.checkpoint.restore import latest_checkpoint, list_checkpoint_ids


def _wait_for(predicate: Any, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s"
        time.sleep(0.1)


def _counting_flow(name: str, sink: rf.sinks.Sink) -> rf.Dataflow:
    flow = rf.Dataflow(name, parallelism=2)
    src = flow.source(
        "events", rf.sources.Generator(lambda p, i: (f"k{i % 13}", p, i), partitions=2, rate=3000)
    )
    src.key_by("key", lambda r: r[0]).reduce("count", lambda acc, r: acc + 1, initial=0).sink(
        "out", sink
    )
    return flow


def _records(handle: rf.JobHandle) -> int:
    return sum(e["records_in"] for e in handle.metrics()["count"])


def test_stopping_the_s3_server_declines_checkpoints_without_stopping_the_job(
    s3_server: Any,
) -> None:
    storage = "s3://rayflow-test/outage"
    # Retries at most 2 s apart: with the default (30 s) they double through the outage,
    # and in one suite run this test took 31 s instead of 14 s.
    config = rf.Checkpointing(
        storage=storage,
        interval_s=0.5,
        timeout_s=4,
        max_consecutive_failures=1000,
        max_backoff_s=2,
    )
    handle = rf.start(_counting_flow("outage", rf.testing.Collect()), checkpoint=config)
    try:
        _wait_for(lambda: handle.checkpoint_stats()["completed"] >= 2, what="2 checkpoints")
        s3_server.stop()
        before = _records(handle)
        _wait_for(lambda: handle.checkpoint_stats()["failed"] >= 2, what="declined checkpoints")
        stats = handle.checkpoint_stats()
        reason = stats["last_failure"]["reason"]
        # The last failure may be any of: an S3 error, a checkpoint that expired waiting
        # for the writes, or one declined while earlier snapshots are still being written.
        assert any(
            why in reason for why in ("S3", "expired", "the storage is slow or unreachable")
        ), reason
        assert handle.status() is rf.JobStatus.RUNNING
        assert _records(handle) > before  # records keep flowing meanwhile
        completed_during_outage = stats["completed"]

        s3_server.start()
        _wait_for(
            lambda: handle.checkpoint_stats()["completed"] >= completed_during_outage + 2,
            what="checkpoints after the outage",
        )
        assert handle.checkpoint_stats()["consecutive_failures"] == 0
    finally:
        if s3_server.process is None:  # a failure above: the other tests need the server
            s3_server.start()
        result = handle.stop()
    assert result.status is rf.JobStatus.STOPPED
    point = latest_checkpoint(storage, "outage")
    assert point is not None and point.manifest.checkpoint_id == result.final_checkpoint


def test_a_storage_that_cannot_be_written_is_refused_at_start(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the storage folder should be")
    config = rf.Checkpointing(storage=str(blocker / "checkpoints"))
    with pytest.raises(rf.RayflowError, match=r"cannot take the lease.*not-a-folder"):
        rf.start(_counting_flow("refused", rf.testing.Collect()), checkpoint=config)


def test_too_many_consecutive_failures_fail_the_job_with_the_reason(tmp_path: Path) -> None:
    # The lease can be written, the checkpoints cannot: a file where their folder goes.
    (tmp_path / "doomed").mkdir()
    (tmp_path / "doomed" / "checkpoints").write_text("not-a-folder")
    config = rf.Checkpointing(storage=str(tmp_path), interval_s=0.2, max_consecutive_failures=3)
    handle = rf.start(_counting_flow("doomed", rf.testing.Collect()), checkpoint=config)
    with pytest.raises(rf.JobFailedError) as info:
        handle.wait(timeout=60)
    text = str(info.value)
    assert "3 checkpoints failed in a row" in text
    assert "max_consecutive_failures" in text
    assert "Not a directory" in text  # the storage error itself


def test_json_lines_publishes_only_what_committed_checkpoints_cover(
    storage_uri: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    config = rf.Checkpointing(storage=storage_uri, interval_s=0.3)
    handle = rf.start(_counting_flow("published", rf.sinks.JsonLines(out)), checkpoint=config)
    try:
        for _ in range(5):
            time.sleep(0.4)
            # Read the output first, then the newest manifest: the output can
            # only be behind the manifest (sinks commit after it is written).
            lines = [
                json.loads(x)
                for f in sorted(out.glob("part-*.jsonl"))
                for x in f.read_text().splitlines()
            ]
            ids = list_checkpoint_ids(storage_uri, "published")
            if not ids:
                assert lines == []
                continue
            offsets = latest_checkpoint(storage_uri, "published").manifest.sources["events"]
            covered = sum(offsets.values())
            assert len(lines) <= covered
    finally:
        result = handle.stop()
    lines = [
        json.loads(x) for f in sorted(out.glob("part-*.jsonl")) for x in f.read_text().splitlines()
    ]
    assert len(lines) == result.records_out("events")  # all of it, once
    final: dict[str, int] = {}
    for key, count in lines:
        final[key] = max(final.get(key, 0), count)
    assert sum(final.values()) == result.records_out("events")
    assert not list((out / ".staging").iterdir())
