"""The coordinator dies, the driver dies, the job resumes at another parallelism,
and the at-least-once mode under the same kills."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import ray

import rayflow as rf
from rayflow._internal.checkpoint.restore import latest_checkpoint, list_checkpoint_ids
from tests.chaos.flows import (
    check_exactly_once,
    collect_streams,
    counting_flow,
    expected_counts,
    json_lines_streams,
)

ROOT = Path(__file__).resolve().parents[2]


def _wait_for(predicate: Any, timeout: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s"
        time.sleep(0.1)


def test_killing_the_coordinator_recovers_from_the_latest_manifest(tmp_path: Path) -> None:
    per_partition = 40_000
    sinks = {"collected": rf.testing.Collect(), "files": rf.sinks.JsonLines(tmp_path / "out")}
    flow = counting_flow("chaos-coordinator", per_partition=per_partition, rate=16_000, sinks=sinks)
    config = rf.Checkpointing(storage=str(tmp_path / "checkpoints"), interval_s=0.5)
    handle = rf.start(flow, checkpoint=config)
    _wait_for(lambda: (handle.checkpoint_stats() or {}).get("completed", 0) >= 2)
    ray.kill(ray.get_actor("rayflow/chaos-coordinator/coordinator", namespace="rayflow"))
    result = handle.wait(timeout=120)
    expected = expected_counts(per_partition)
    check_exactly_once(collect_streams(result, "collected"), expected, "Collect")
    check_exactly_once(json_lines_streams(tmp_path / "out"), expected, "JsonLines")
    assert [r["replaced"][0] for r in result.recoveries] == [
        "rayflow/chaos-coordinator/coordinator"
    ]
    assert result.recoveries[0]["restored_checkpoint"] >= 2


DRIVER = """
import sys, ray, rayflow as rf
sys.path.insert(0, {root!r})
from tests.chaos.flows import counting_flow
ray.init(address={address!r}, namespace="rayflow-driver")
flow = counting_flow("chaos-driver", per_partition={per_partition}, rate=10_000,
                     sinks={{"files": rf.sinks.JsonLines({out!r})}}, parallelism={parallelism})
rf.run(flow, checkpoint=rf.Checkpointing(storage={storage!r}, interval_s=0.5))
"""


def test_a_killed_driver_resumes_from_a_new_process_at_another_parallelism(
    tmp_path: Path,
) -> None:
    """Kill the driver (its job dies with it); resume from this process at parallelism 3."""
    per_partition = 50_000
    storage, out = str(tmp_path / "checkpoints"), str(tmp_path / "out")
    script = DRIVER.format(
        root=str(ROOT),
        address=ray.get_runtime_context().gcs_address,
        per_partition=per_partition,
        out=out,
        storage=storage,
        parallelism=1,
    )
    driver = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        _wait_for(
            lambda: len(list_checkpoint_ids(storage, "chaos-driver")) >= 3,
            what="checkpoints of the first driver",
        )
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver process and only it
        driver.wait(timeout=30)
    written_before = sum(len(s) for s in json_lines_streams(Path(out)).values())
    assert 0 < written_before < 2 * per_partition
    latest = latest_checkpoint(storage, "chaos-driver")
    assert latest is not None
    covered = sum(latest.manifest.sources["events"].values())

    flow = counting_flow(
        "chaos-driver",
        per_partition=per_partition,
        rate=None,
        sinks={"files": rf.sinks.JsonLines(out)},
        parallelism=1,
    )
    with pytest.raises(rf.ConfigError, match="resume=True"):
        rf.start(flow, checkpoint=rf.Checkpointing(storage=storage))
    rescaled = counting_flow(
        "chaos-driver",
        per_partition=per_partition,
        rate=None,
        sinks={"files": rf.sinks.JsonLines(out)},
        parallelism=3,
    )
    result = rf.run(
        rescaled, checkpoint=rf.Checkpointing(storage=storage, interval_s=0.5), resume=True
    )
    assert result.status is rf.JobStatus.FINISHED
    assert len(result.metrics["count"]) == 3
    # Rescaled from 1 to 3 partitions: a key's updates move to another file, in order.
    check_exactly_once(json_lines_streams(Path(out)), expected_counts(per_partition), "JsonLines")
    # Nothing a committed checkpoint covered was read again: the sources of the
    # resumed run read exactly the records after the checkpoint it resumed.
    assert result.records_out("events") == 2 * per_partition - covered


def _tagged(partition: int, offset: int) -> tuple[str, int, int]:
    return f"k{offset % 97}", partition, offset


def _remember(state: int | None, record: tuple[str, int, int]) -> tuple[int, list[Any]]:
    return (state or 0) + 1, [record[1:]]


def test_at_least_once_loses_nothing_under_kills(tmp_path: Path) -> None:
    per_partition = 36_000  # 3 s of input: the kills land while it flows
    flow = rf.Dataflow("chaos-at-least-once", parallelism=2)
    a = flow.source(
        "a", rf.sources.Generator(_tagged, partitions=2, limit=per_partition, rate=12_000)
    )
    b = flow.source(
        "b",
        rf.sources.Generator(
            lambda p, i: _tagged(p + 2, i), partitions=2, limit=per_partition, rate=12_000
        ),
    )
    merged = a.union("both", b)
    merged.key_by("key", lambda r: r[0]).stateful_map("seen", _remember).sink(
        "out", rf.testing.Collect()
    )
    config = rf.Checkpointing(
        storage=str(tmp_path / "checkpoints"), interval_s=0.5, mode="at_least_once"
    )
    handle = rf.start(flow, checkpoint=config)
    monkey = rf.testing.chaos(handle, seed=11, kills=3, every_s=1.2)
    result = handle.wait(timeout=240)
    monkey.check()
    assert len(monkey.kills) == 3
    out = [tuple(r) for _, r in result.output("out")]
    expected = {(p, i) for p in range(4) for i in range(per_partition)}
    assert set(out) == expected  # nothing lost
    duplicates = sum(n - 1 for n in Counter(out).values())
    assert len(out) == len(expected) + duplicates  # duplicates are allowed
    assert result.restarts >= 3


def _fails_at_5000(record: tuple[str, int]) -> tuple[str, int]:
    if record[1] == 5000:
        raise ValueError("record 5000 is poisoned")
    return record


def test_the_restart_strategy_gives_up_and_lists_every_failure(tmp_path: Path) -> None:
    flow = rf.Dataflow("chaos-poison")
    src = flow.source("n", rf.sources.Generator(lambda p, i: (f"k{i % 10}", i), limit=20_000))
    src.map("check", _fails_at_5000).key_by("k", lambda r: r[0]).reduce(
        "sum", lambda a, r: a + r[1], initial=0
    ).sink("out", rf.testing.Discard())
    config = rf.Checkpointing(storage=str(tmp_path / "checkpoints"), interval_s=0.2)
    strategy = rf.RestartStrategy(max_failures=2, window_s=60, backoff_s=0.05)
    started = time.monotonic()
    with pytest.raises(rf.JobFailedError) as info:
        rf.run(flow, checkpoint=config, restart=strategy)
    text = str(info.value)
    assert "step 'check' (partition 0): ValueError: record 5000 is poisoned" in text
    assert "3 failures within 60 s exceed RestartStrategy.max_failures=2" in text
    assert text.count("(an earlier failure) ValueError: record 5000 is poisoned") == 2
    assert time.monotonic() - started < 60
