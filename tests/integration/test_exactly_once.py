"""One regression test per failure timing that once broke exactly-once (issue 10).

Each names the rule of docs/protocol.md that prevents it. Outputs are
compared per key in order (``check_exactly_once``), never as sorted sets.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ray

import rayflow as rf
from rayflow._internal import naming
from rayflow._internal.checkpoint import lease as leases
from rayflow._internal.checkpoint.restore import (
    latest_checkpoint,
    list_checkpoint_ids,
    open_restore_point,
)
from rayflow._internal.storage import open_storage
from tests.chaos.flows import (
    check_exactly_once,
    collect_streams,
    counting_flow,
    expected_counts,
    json_lines_streams,
)
from tests.support import wait_for

ROOT = Path(__file__).resolve().parents[2]
DISCARD: dict[str, rf.sinks.Sink] = {"out": rf.testing.Discard()}


def test_r1_a_kill_while_a_manifest_is_written_restores_that_checkpoint(tmp_path: Path) -> None:
    """Item 1: an operator dies after every acknowledgement, before manifest 3 is written."""
    job = "r1-race"
    faults = rf.testing.Faults(
        at=(
            rf.testing.Fault("before_manifest", "kill_operator", f"rayflow/{job}/count/0", 3),
            rf.testing.Fault("after_manifest", "kill_operator", f"rayflow/{job}/count/1", 8),
        )
    )
    sinks = {"collected": rf.testing.Collect(), "files": rf.sinks.JsonLines(tmp_path / "out")}
    flow = counting_flow(job, per_partition=10_000, rate=5_000, sinks=sinks)
    config = rf.Checkpointing(storage=str(tmp_path / "cp"), interval_s=0.2)
    result = rf.run(flow, checkpoint=config, faults=faults)
    # The recovery waited for manifest 3 (then 8) and went back to it, not to the one before.
    assert [r["restored_checkpoint"] for r in result.recoveries] == [3, 8]
    expected = expected_counts(10_000)
    check_exactly_once(collect_streams(result, "collected"), expected, "Collect")
    check_exactly_once(json_lines_streams(tmp_path / "out"), expected, "JsonLines")


def test_r2_a_savepoint_before_a_failure_commits_nothing_twice(tmp_path: Path) -> None:
    """Item 2: checkpoint, savepoint, kill an operator: the savepoint committed nothing."""
    job = "r2-savepoint"
    sinks = {"collected": rf.testing.Collect(), "files": rf.sinks.JsonLines(tmp_path / "out")}
    flow = counting_flow(job, per_partition=15_000, rate=6_000, sinks=sinks)
    config = rf.Checkpointing(storage=str(tmp_path / "cp"), interval_s=60)
    handle = rf.start(flow, checkpoint=config)
    wait_for(lambda: sum(e["records_in"] for e in handle.metrics()["count"]) > 3000)
    checkpoint = handle.checkpoint()
    time.sleep(0.4)
    savepoint = handle.savepoint(tmp_path / "sp")
    time.sleep(0.4)
    ray.kill(ray.get_actor(f"rayflow/{job}/count/0", namespace="rayflow"))
    result = handle.wait(timeout=120)
    assert result.recoveries[0]["restored_checkpoint"] == checkpoint
    assert open_restore_point(savepoint).manifest.checkpoint_id > checkpoint
    expected = expected_counts(15_000)
    check_exactly_once(collect_streams(result, "collected"), expected, "Collect")
    check_exactly_once(json_lines_streams(tmp_path / "out"), expected, "JsonLines")


def test_r4_a_savepoint_path_is_never_reused(tmp_path: Path) -> None:
    """Item 3: a second savepoint to the same path is refused; the first still restores."""
    flow = counting_flow("r4-savepoint", per_partition=50_000, rate=5_000, sinks=DISCARD)
    handle = rf.start(flow, checkpoint=rf.Checkpointing(storage=str(tmp_path / "cp")))
    try:
        first = handle.savepoint(tmp_path / "sp")
        before = open_storage(first).list("")
        with pytest.raises(rf.CheckpointError, match="is not empty"):
            handle.savepoint(tmp_path / "sp")
        assert open_storage(first).list("") == before
    finally:
        handle.stop()
    point = open_restore_point(first)
    assert point.manifest.kind == "savepoint" and point.manifest.run_id
    restored = rf.run(
        counting_flow("r4-savepoint", per_partition=50_000, rate=None, sinks=DISCARD),
        job_name="r4-restored",
        restore_from=first,
    )
    assert restored.restored_checkpoint == point.manifest.checkpoint_id
    offsets = point.manifest.sources["events"]
    assert restored.records_out("events") == 100_000 - sum(offsets.values())


def test_r4_r7_restore_from_an_old_checkpoint_continues_ids_and_appends_its_output(
    tmp_path: Path,
) -> None:
    """Item 3: restoring a retained checkpoint reuses no id, and its output is not swallowed."""
    out, storage = tmp_path / "out", str(tmp_path / "cp")
    flow = counting_flow(
        "r7-rollback",
        per_partition=8_000,
        rate=8_000,
        sinks={"files": rf.sinks.JsonLines(out)},
    )
    first = rf.run(flow, checkpoint=rf.Checkpointing(storage=storage, interval_s=0.2, retain=3))
    ids = list_checkpoint_ids(storage, "r7-rollback")
    assert len(ids) == 3 and ids[-1] == first.final_checkpoint
    lines_before = sum(len(s) for s in json_lines_streams(out).values())
    assert lines_before == 16_000
    old = f"{storage}/r7-rollback/checkpoints/{ids[0]:010d}"
    again = rf.run(
        counting_flow(
            "r7-rollback", per_partition=8_000, rate=None, sinks={"files": rf.sinks.JsonLines(out)}
        ),
        checkpoint=rf.Checkpointing(storage=storage, interval_s=0.2),
        restore_from=old,
    )
    assert again.final_checkpoint is not None and again.final_checkpoint > ids[-1]
    # Every record after the restored checkpoint was committed again (a rollback
    # asked for by the user replays), not dropped as "committed before".
    lines_after = sum(len(s) for s in json_lines_streams(out).values())
    assert lines_after == lines_before + again.records_out("count")
    assert again.records_out("count") > 0


def test_r5_a_second_driver_on_another_ray_cluster_is_refused_and_a_takeover_fences(
    tmp_path: Path,
) -> None:
    """Item 3: two drivers on two Ray clusters with one storage."""
    storage = str(tmp_path / "cp")
    flow = counting_flow("r5-lease", per_partition=10**9, rate=2_000, sinks=DISCARD)
    handle = rf.start(flow, checkpoint=rf.Checkpointing(storage=storage, interval_s=0.3, lease_s=3))
    env: dict[str, str] = {}
    try:
        wait_for(lambda: len(list_checkpoint_ids(storage, "r5-lease")) >= 2)
        # Driver B: another process with a Ray cluster of its own, same job, same storage.
        script = f"""
import sys, ray, rayflow as rf
sys.path.insert(0, {str(ROOT)!r})
from tests.chaos.flows import counting_flow
ray.init(address="local", include_dashboard=False, num_cpus=1)
flow = counting_flow("r5-lease", per_partition=10, rate=None,
                     sinks={{"out": rf.testing.Discard()}})
try:
    rf.run(flow, checkpoint=rf.Checkpointing(storage={storage!r}, lease_s=3), resume=True)
except rf.errors.JobAlreadyRunningError as exc:
    print("REFUSED", exc)
"""
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rf-b-", dir="/tmp")  # short: socket paths
        other = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
        )
        assert "REFUSED" in other.stdout, other.stdout + other.stderr
        assert "is held by another run" in other.stdout
        assert handle.status() is rf.JobStatus.RUNNING
        # Someone takes the lease over (as a driver would once it expired): this run is fenced.
        store = open_storage(storage)
        current = leases.current(store, "r5-lease")
        assert current is not None
        taken_at = time.time()
        store.put(
            leases.lease_key("r5-lease", current.generation + 1),
            leases.Lease("r5-lease", current.generation + 1, "rOTHER", 3.0).to_json(),
        )
        with pytest.raises(rf.JobFailedError, match="lost its lease"):
            handle.wait(timeout=30)
    finally:
        shutil.rmtree(env.get("RAY_TMPDIR", "/nonexistent"), ignore_errors=True)
        if not handle.status().terminal:
            handle.stop()
    # Nothing was committed after the fencing was noticed (within a renewal, 1 s).
    latest = latest_checkpoint(storage, "r5-lease")
    assert latest is not None and latest.manifest.created_at < taken_at + 1.0


@dataclass(frozen=True)
class Tally:
    """A user class, defined in the test module (shipped to Ray by value)."""

    n: int

    def add(self, other: Any) -> Tally:
        return Tally(self.n + 1)


def test_user_classes_in_state_committables_and_records_checkpoint_and_restore(
    tmp_path: Path,
) -> None:
    """Item 4: a dataclass of the user's module in reduce state and in the output."""
    flow = rf.Dataflow("user-types", parallelism=2)
    src = flow.source(
        "events",
        rf.sources.Generator(
            lambda p, i: (f"k{i % 50}", p, i), partitions=2, limit=6000, rate=3000
        ),
    )
    src.key_by("key", lambda r: r[0]).reduce("tally", Tally.add, initial=Tally(0)).sink(
        "out", rf.testing.Collect()
    )
    handle = rf.start(flow, checkpoint=rf.Checkpointing(storage=str(tmp_path), interval_s=0.2))
    wait_for(lambda: (handle.checkpoint_stats() or {})["completed"] >= 3, what="3 checkpoints")
    ray.kill(ray.get_actor("rayflow/user-types/tally/0", namespace="rayflow"))
    result = handle.wait(timeout=120)
    assert result.checkpoints is not None and result.checkpoints["failed"] == 0
    assert result.restarts == 1
    streams = {
        name: [(k, t.n) for k, t in stream]
        for name, stream in collect_streams(result, "out").items()
    }
    check_exactly_once(streams, Counter({f"k{i}": 240 for i in range(50)}), "Collect")
    # Equal values of the user's class: the restored state is of the very class the code uses.
    assert ("k0", Tally(120)) in result.output("out")


def _complex_key(record: int) -> complex:
    return complex(record % 3, 1)


def test_keys_that_cannot_be_checkpointed_fail_at_parallelism_1_too() -> None:
    """Item 7: the key check does not depend on the parallelism."""
    flow = rf.Dataflow("complex-keys")
    flow.source("n", rf.testing.from_items(range(100))).key_by("by", _complex_key).reduce(
        "sum", lambda a, b: a + b, initial=0
    ).sink("out", rf.testing.Discard())
    with pytest.raises(
        rf.JobFailedError, match=r"step 'by'.*cannot use a key of type builtins.complex"
    ):
        rf.run(flow)


def test_a_job_nobody_waits_for_leaves_nothing_behind(tmp_path: Path) -> None:
    """Item 8: the coordinator, the Collect actor and the lease go when the job ends."""
    storage = tmp_path / "cp"
    stale = storage / "leaky" / "checkpoints" / "0000000001" / ".tmp-killed-upload"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half an upload")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))

    def flow(name: str = "leaky", items: range = range(1000)) -> rf.Dataflow:
        f = rf.Dataflow(name)
        f.source("n", rf.testing.from_items(items)).sink("out", rf.testing.Collect())
        return f

    # Another job of this driver runs all along: the Collect actor is shared, not the output.
    other = rf.Dataflow("beside")
    other.source("n", rf.sources.Generator(lambda p, i: -i, limit=6000, rate=1500)).sink(
        "out", rf.testing.Collect()
    )
    beside = rf.start(other, checkpoint=rf.Checkpointing(storage=str(storage), interval_s=0.1))
    handle = rf.start(flow(), checkpoint=rf.Checkpointing(storage=str(storage), interval_s=0.1))
    wait_for(lambda: handle.status().terminal, what="the end of the job")
    assert not beside.status().terminal
    assert handle.wait().output("out") == list(range(1000))
    assert beside.wait().output("out") == [-i for i in range(6000)]

    def gone(name: str) -> bool:
        try:
            ray.get_actor(name, namespace="rayflow")
        except ValueError:
            return True
        return False

    # The driver's Collect actor outlives its jobs; what this one committed does not.
    collector = ray.get_actor(
        naming.collector_actor(ray.get_runtime_context().get_job_id()), namespace="rayflow"
    )

    def collected() -> list[str]:
        return [k for k in ray.get(collector.keys.remote()) if k.startswith("leaky/")]

    wait_for(lambda: gone("rayflow/leaky/coordinator") and not collected(), 10)
    assert not stale.exists()  # a killed upload's leftover, collected by retention
    lease = leases.current(open_storage(storage), "leaky")
    assert lease is not None and lease.released
    again = rf.run(
        flow(), job_name="leaky", checkpoint=rf.Checkpointing(storage=str(storage)), resume=True
    )
    assert again.status is rf.JobStatus.FINISHED
    assert handle.wait().output("out") == list(range(1000))


def test_a_coordinator_that_dies_again_while_it_restarts_is_retried(tmp_path: Path) -> None:
    """Item 10: a second coordinator death during the restart is one more failure."""
    job = "twice"
    sinks = {"collected": rf.testing.Collect(), "files": rf.sinks.JsonLines(tmp_path / "out")}
    flow = counting_flow(job, per_partition=12_000, rate=6_000, sinks=sinks)
    handle = rf.start(
        flow, checkpoint=rf.Checkpointing(storage=str(tmp_path / "cp"), interval_s=0.2)
    )
    name = f"rayflow/{job}/coordinator"
    wait_for(lambda: (handle.checkpoint_stats() or {})["completed"] >= 2)
    first = ray.get_actor(name, namespace="rayflow")
    first_id = first._actor_id.hex()
    ray.kill(first)

    def replacement() -> Any:
        try:
            actor = ray.get_actor(name, namespace="rayflow")
        except ValueError:
            return None
        return actor if actor._actor_id.hex() != first_id else None

    wait_for(lambda: replacement() is not None, 30, "a new coordinator")
    ray.kill(replacement())  # while it deploys and restores
    result = handle.wait(timeout=120)
    # The second death was one more failure, retried by the restart strategy.
    assert "restarting the job's coordinator failed" in result.recoveries[-1]["cause"]
    expected = expected_counts(12_000)
    check_exactly_once(collect_streams(result, "collected"), expected, "Collect")
    check_exactly_once(json_lines_streams(tmp_path / "out"), expected, "JsonLines")


def test_two_json_lines_sinks_of_two_jobs_keep_their_own_files(tmp_path: Path) -> None:
    """Item 5: a sink never touches a folder another job's sink owns."""
    flow = counting_flow(
        "owner-a", per_partition=1000, rate=None, sinks={"files": rf.sinks.JsonLines(tmp_path)}
    )
    rf.run(flow)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    other = counting_flow(
        "owner-b", per_partition=1000, rate=None, sinks={"files": rf.sinks.JsonLines(tmp_path)}
    )
    with pytest.raises(rf.JobFailedError, match="is the output of step 'files' of job 'owner-a'"):
        rf.run(other)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert json.loads((tmp_path / ".rayflow-sink.json").read_text()) == {
        "job": "owner-a",
        "step": "files",
    }
