"""Kill operator actors during a run: the committed output is exactly the failure-free one."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import rayflow as rf
from tests.chaos.flows import (
    check_exactly_once,
    collect_streams,
    counting_flow,
    expected_counts,
    json_lines_streams,
    s3_streams,
)

PER_PARTITION = 110_000  # 220,000 records in all: 11 s at 20,000 a second


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
    monkey = rf.testing.chaos(handle, seed=7, kills=5, targets=("operators",), every_s=1.0)
    result = handle.wait(timeout=240)
    monkey.check()
    assert len(monkey.kills) == 5, monkey.kills

    expected = expected_counts(PER_PARTITION)
    assert sum(expected.values()) == 2 * PER_PARTITION
    check_exactly_once(collect_streams(result, "collected"), expected, "Collect")
    check_exactly_once(json_lines_streams(tmp_path / "out"), expected, "JsonLines")
    check_exactly_once(s3_streams(s3_server, "rayflow-test", prefix), expected, "S3JsonLines")

    assert result.status is rf.JobStatus.FINISHED
    assert result.restarts >= 5
    for recovery in result.recoveries:
        assert recovery["recovered_in_s"] is not None
        assert recovery["replaced"], recovery
    # Each kill was noticed within a second.
    for kill in monkey.kills:
        noticed = min(
            r["detected_at"] for r in result.recoveries if r["detected_at"] >= kill["time"]
        )
        assert noticed - kill["time"] < 1.0
    assert sum(r["records_replayed"] for r in result.recoveries) > 0
