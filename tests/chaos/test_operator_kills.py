"""Kill operator actors during a run: the committed output is exactly the failure-free one."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import rayflow as rf
from tests.chaos.flows import (
    Killer,
    counting_flow,
    expected_updates,
    read_json_lines,
    read_s3_json_lines,
)

PER_PARTITION = 150_000  # 300,000 records in all


def test_five_kills_leave_collect_json_lines_and_s3_output_exactly_once(
    tmp_path: Path, s3_server: Any
) -> None:
    prefix = f"chaos-{uuid.uuid4().hex[:8]}"
    sinks = {
        "collected": rf.testing.Collect(),
        "files": rf.sinks.JsonLines(tmp_path / "out"),
        "objects": rf.sinks.S3JsonLines(f"s3://rayflow-test/{prefix}"),
    }
    flow = counting_flow("chaos-kills", per_partition=PER_PARTITION, rate=20_000, sinks=sinks)
    config = rf.Checkpointing(storage=str(tmp_path / "checkpoints"), interval_s=0.5)
    handle = rf.start(flow, checkpoint=config)
    killer = Killer(handle, kills=5, every_s=1.5, seed=7)
    killer.start()
    result = handle.wait(timeout=240)
    killer.join(timeout=10)
    assert killer.error is None
    assert len(killer.killed) == 5, killer.killed

    expected = expected_updates(PER_PARTITION)
    assert len(expected) == 2 * PER_PARTITION
    assert sorted(result.output("collected")) == expected
    assert read_json_lines(tmp_path / "out") == expected
    assert read_s3_json_lines(s3_server, "rayflow-test", prefix) == expected

    assert result.status is rf.JobStatus.FINISHED
    assert result.restarts >= 5
    for recovery in result.recoveries:
        assert recovery["recovered_in_s"] is not None
        assert recovery["replaced"], recovery
    # Each kill was noticed within a second.
    for killed_at in killer.killed_at:
        noticed = min(r["detected_at"] for r in result.recoveries if r["detected_at"] >= killed_at)
        assert noticed - killed_at < 1.0
    assert sum(r["records_replayed"] for r in result.recoveries) > 0
