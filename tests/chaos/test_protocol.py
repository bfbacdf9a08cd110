"""The chaos matrix: faults at every named point of the protocol, checked per key in order.

Each run counts records per key into three exactly-once sinks at once
(``Collect``, ``JsonLines``, ``S3JsonLines`` on the loopback S3 server)
while ``rf.testing.chaos`` kills operators, sinks, sources or the
coordinator at protocol points (docs/protocol.md), and checks that every
key's updates came out exactly once and in order in every sink. The
default matrix runs one seed per scenario; ``--chaos-full`` runs five
(see the README).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import ray

import rayflow as rf
from rayflow._internal.checkpoint.restore import open_restore_point
from tests.chaos.flows import (
    check_exactly_once,
    collect_streams,
    counting_flow,
    expected_counts,
    json_lines_streams,
    s3_streams,
)

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "rayflow-test"
PER_PARTITION = 9_000
RATE = 6_000  # records per second for both source partitions: runs of about 3 s

CHECKPOINT_POINTS = ("triggered", "before_manifest", "after_manifest", "after_notify")


@dataclass(frozen=True)
class Scenario:
    name: str
    points: tuple[str, ...] | None
    targets: tuple[str, ...] = ("operators",)
    kills: int = 2
    mode: str = "exactly_once"
    savepoints: bool = False  # the test takes savepoints while the faults strike
    checkpoints: bool = False  # the test calls handle.checkpoint() meanwhile
    faults: tuple[rf.testing.Fault, ...] = field(default=())
    unaligned: bool = False  # unaligned checkpoints, with a count slow enough to queue data
    per_partition: int = PER_PARTITION
    recovery: str = "partial"
    # Each names a recovery the result must list (a word of its cause): the ones the
    # armed faults cause, even when the coordinator that recovered died afterwards.
    recovered: tuple[str, ...] = ()
    poll_s: float | None = None  # RuntimeConfig.metrics_interval_s: the driver's poll
    backoff_s: float | None = None  # RestartStrategy.backoff_s: how long restarts wait
    point_timeout_s: float = 3.0  # how long the harness waits for a point to be reached


SCENARIOS = [
    Scenario("points-operators", CHECKPOINT_POINTS, ("operators",)),
    Scenario("points-sinks", CHECKPOINT_POINTS, ("sinks",)),
    Scenario("points-sources", CHECKPOINT_POINTS, ("sources",)),
    Scenario("manifest-edges", ("before_manifest", "after_manifest"), ("sinks", "sources"), 3),
    Scenario("coordinator", CHECKPOINT_POINTS, ("coordinator",), 1),
    Scenario("coordinator-and-operators", ("after_manifest",), ("coordinator", "operators")),
    Scenario("random-moments", None, ("operators", "coordinator"), 3),
    # A restore is global: a partition restarted alone (partial recovery) restores
    # nothing, and the kill armed at during_restore never fired (seed 1: it was missed).
    Scenario(
        "during-restore", ("during_restore",), ("operators", "coordinator"), 1, recovery="global"
    ),
    # The coordinator killed during a restore, and its replacement slow to come (every
    # restart waits 3 s): the harness must count the kill that struck, not miss it
    # waiting to ask the replacement, which never had it armed (--chaos-full, seed 5
    # of during-restore, on a slow host).
    Scenario(
        "during-restore-coordinator",
        ("during_restore",),
        ("coordinator",),
        1,
        recovery="global",
        recovered=("coordinator died",),
        backoff_s=3.0,
        point_timeout_s=7.0,
    ),
    Scenario(
        "savepoints",
        ("savepoint_triggered", "savepoint_before_manifest", "savepoint_after_manifest"),
        ("operators",),
        savepoints=True,
    ),
    Scenario("savepoints-random", None, ("operators",), 3, savepoints=True),
    # Runs of 6 s: the kills come in the first seconds and refuse the requests made
    # meanwhile; a request after them must complete (4 s runs once left none in CI).
    Scenario(
        "explicit-checkpoints",
        CHECKPOINT_POINTS,
        ("operators",),
        checkpoints=True,
        per_partition=18_000,
    ),
    Scenario(
        "final-checkpoint",
        None,
        kills=0,
        faults=(
            rf.testing.Fault("final_before_manifest", "kill_operator", "SINK"),
            rf.testing.Fault("final_after_manifest", "kill_operator", "SOURCE"),
        ),
        recovered=("operator actor",),
    ),
    Scenario(
        "final-coordinator",
        None,
        kills=0,
        faults=(rf.testing.Fault("final_after_notify", "kill_coordinator"),),
        recovered=("coordinator died",),
    ),
]
# The same faults with unaligned checkpoints, the count slow enough that barriers
# overtake queued data and snapshots carry it (--chaos-full: every scenario).
UNALIGNED = [
    Scenario("unaligned-points-operators", CHECKPOINT_POINTS, ("operators",), unaligned=True),
    Scenario("unaligned-manifest-edges", ("before_manifest", "after_manifest"),
             ("sinks", "sources"), 3, unaligned=True),
    Scenario("unaligned-random", None, ("operators", "coordinator"), 3, unaligned=True),
    Scenario("unaligned-savepoints", ("savepoint_triggered", "savepoint_after_manifest"),
             ("operators",), savepoints=True, unaligned=True),
]  # fmt: skip


def _seeds(request: pytest.FixtureRequest) -> list[int]:
    chosen = request.config.getoption("--chaos-seeds")
    if chosen:
        return [int(s) for s in chosen.split(",")]
    return [1, 2, 3, 4, 5] if request.config.getoption("--chaos-full") else [1]


def _resolve(fault: rf.testing.Fault, job: str) -> rf.testing.Fault:
    """Faults name a role ("SINK", "SOURCE"); the flow's actors are known here."""
    target = {"SINK": f"rayflow/{job}/count/1", "SOURCE": f"rayflow/{job}/events/0"}.get(
        fault.target or "", fault.target
    )
    return rf.testing.Fault(fault.point, fault.action, target, fault.checkpoint_id, fault.nth)


class Requests(threading.Thread):
    """Savepoints or checkpoints asked for by the user while faults strike."""

    def __init__(self, handle: rf.JobHandle, folder: Path, savepoints: bool):
        super().__init__(daemon=True)
        self.handle, self.folder, self.savepoints = handle, folder, savepoints
        self.done: list[Any] = []
        self.refused: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.halt.wait(0.5 if self.savepoints else 0.25):
            if self.handle.status() is not rf.JobStatus.RUNNING:
                continue
            i += 1
            try:
                if self.savepoints:
                    self.done.append(self.handle.savepoint(self.folder / f"sp-{i}"))
                else:
                    self.done.append(self.handle.checkpoint())
            except (rf.CheckpointError, rf.RayflowError) as exc:
                self.refused.append(str(exc))  # the job was restarting or ending


def _sinks(tmp_path: Path, prefix: str) -> dict[str, rf.sinks.Sink]:
    return {
        "collected": rf.testing.Collect(),
        "files": rf.sinks.JsonLines(tmp_path / "out"),
        "objects": rf.sinks.S3JsonLines(f"s3://{BUCKET}/{prefix}"),
    }


def _check_all_sinks(
    result: rf.JobResult, tmp_path: Path, server: Any, prefix: str, expected: Counter[str]
) -> None:
    check_exactly_once(collect_streams(result, "collected"), expected, "Collect")
    check_exactly_once(json_lines_streams(tmp_path / "out"), expected, "JsonLines")
    check_exactly_once(s3_streams(server, BUCKET, prefix), expected, "S3JsonLines")


# The default run (the suite's 20 minutes) puts scenarios that strike at the same points
# into one job, several kills among their targets: at the checkpoint points of operators,
# sinks and sources; of the coordinator and operators; of operators, sinks and sources
# with unaligned checkpoints; the final checkpoint's faults. Random moments and
# savepoints run aligned (the default mode), savepoints at their points only.
# --chaos-full runs every scenario apart, five seeds each, aligned and unaligned.
# (RAYFLOW_CHAOS_LOG=file lists what each run struck.)
TOGETHER = [
    # 4 s of input: in 3 s the third kill found the job ended.
    Scenario("points-all-targets", CHECKPOINT_POINTS, ("operators", "sinks", "sources"), 3,
             per_partition=12_000),
    Scenario("points-coordinator-and-operators", CHECKPOINT_POINTS,
             ("coordinator", "operators"), 3),
    Scenario("unaligned-points-all-targets", CHECKPOINT_POINTS,
             ("operators", "sinks", "sources"), 3, unaligned=True),
    # A sink killed before the final manifest, a source after it, then the coordinator
    # after its notifications: each fires once (the run checks), in that order. The
    # coordinator dies before it recovers the operators: one recovery, its own.
    Scenario("final-all", None, kills=0, faults=(
        rf.testing.Fault("final_before_manifest", "kill_operator", "SINK"),
        rf.testing.Fault("final_after_manifest", "kill_operator", "SOURCE"),
        rf.testing.Fault("final_after_notify", "kill_coordinator"),
    ), recovered=("coordinator died",)),
    # A recovery, then the coordinator dies a checkpoint later, long before the driver
    # polls it (every 60 s here): the result still lists the recovery it made.
    Scenario("recovered-then-coordinator", None, kills=0, faults=(
        rf.testing.Fault("after_manifest", "kill_operator", "SINK", nth=1),
        rf.testing.Fault("after_manifest", "kill_coordinator", nth=2),
    ), recovered=("operator actor", "coordinator died"), per_partition=12_000, poll_s=60.0),
]  # fmt: skip
FULL_ONLY = {
    "points-operators", "points-sinks", "points-sources",  # points-all-targets
    "coordinator", "coordinator-and-operators",  # points-coordinator-and-operators
    "unaligned-points-operators", "unaligned-manifest-edges",  # unaligned-points-all-targets
    "unaligned-random",  # random-moments, aligned
    "savepoints-random",  # savepoints, at their points
    "unaligned-savepoints",  # savepoints, aligned
    "final-checkpoint", "final-coordinator",  # final-all
}  # fmt: skip


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.function.__name__ != "test_chaos_matrix":
        return
    chosen = SCENARIOS + UNALIGNED
    if not metafunc.config.getoption("--chaos-full"):
        chosen = [*TOGETHER, *(s for s in chosen if s.name not in FULL_ONLY)]
    metafunc.parametrize("scenario", chosen, ids=lambda s: s.name)


def test_chaos_matrix(
    scenario: Scenario, tmp_path: Path, s3_server: Any, request: pytest.FixtureRequest
) -> None:
    variants = [scenario]
    if request.config.getoption("--chaos-full") and not scenario.unaligned:
        variants.append(replace(scenario, name=f"{scenario.name}-unaligned", unaligned=True))
        if request.config.getoption("--chaos-unaligned-only"):
            variants = variants[1:]
    for variant in variants:
        for seed in _seeds(request):
            run_dir = tmp_path / variant.name / f"seed-{seed}"
            _run(variant, seed, run_dir, s3_server)


def _run(scenario: Scenario, seed: int, tmp_path: Path, server: Any) -> None:
    job = f"chaos-{scenario.name}-{seed}"
    prefix = f"{job}-{uuid.uuid4().hex[:6]}"
    flow = counting_flow(
        job,
        per_partition=scenario.per_partition,
        rate=RATE,
        sinks=_sinks(tmp_path, prefix),
        cost_s=0.0004 if scenario.unaligned else 0.0,
    )
    config = rf.Checkpointing(
        storage=str(tmp_path / "checkpoints"),
        interval_s=0.25,
        mode=scenario.mode,
        unaligned=scenario.unaligned,
        recovery=scenario.recovery,
    )
    record = str(tmp_path / "fired.jsonl")
    armed = tuple(_resolve(f, job) for f in scenario.faults)
    faults = rf.testing.Faults(at=armed, record=record)
    runtime = rf.RuntimeConfig(target_inflight_s=2.0) if scenario.unaligned else None
    if scenario.poll_s is not None:
        runtime = replace(runtime or rf.RuntimeConfig(), metrics_interval_s=scenario.poll_s)
    restart = (
        None if scenario.backoff_s is None else rf.RestartStrategy(backoff_s=scenario.backoff_s)
    )
    handle = rf.start(flow, checkpoint=config, faults=faults, runtime=runtime, restart=restart)
    monkey = rf.testing.chaos(
        handle,
        seed=seed,
        kills=scenario.kills,
        targets=scenario.targets,
        points=scenario.points,
        every_s=0.5,
        point_timeout_s=scenario.point_timeout_s,
    )
    requests = None
    if scenario.savepoints or scenario.checkpoints:
        requests = Requests(handle, tmp_path / "savepoints", scenario.savepoints)
        requests.start()
    try:
        result = handle.wait(timeout=180)
    finally:
        monkey.stop()
        if requests is not None:
            requests.halt.set()
            requests.join(30)
    monkey.check()
    fired = rf.testing.fired_faults(record)  # the chaos harness's kills at points too
    fired_armed = [f for f in fired if f in armed]
    _log_run(scenario.name, seed, monkey, tuple(fired_armed), result)
    # Every fault armed at start fired: a job that ended before one's point would
    # otherwise pass untested.
    assert fired_armed == list(armed), fired
    causes = [str(r.get("cause")) for r in result.recoveries]
    for word in scenario.recovered:
        assert any(word in cause for cause in causes), (word, causes)
    struck = len(monkey.kills) + len(armed)
    assert struck >= 1, f"no fault struck (missed: {monkey.missed})"
    if scenario.recovery == "global":
        assert not monkey.missed, monkey.missed  # every point armed was reached
    if scenario.unaligned:
        assert result.checkpoints is not None
        assert result.checkpoints.get("unaligned_completed", 0) >= 1, result.checkpoints
    assert result.status is rf.JobStatus.FINISHED
    assert result.restarts >= 1, (monkey.kills, result.recoveries)
    _check_all_sinks(result, tmp_path, server, prefix, expected_counts(scenario.per_partition))
    if requests is not None:
        assert requests.done, requests.refused
    if scenario.savepoints:
        # Every savepoint taken under fire is complete and consistent.
        for location in requests.done if requests else []:
            point = open_restore_point(location)
            assert point.manifest.kind == "savepoint"
            assert set(point.manifest.sources["events"]) == {0, 1}


def _log_run(
    name: str,
    seed: int,
    monkey: rf.testing.Chaos,
    faults: tuple[rf.testing.Fault, ...],
    result: rf.JobResult,
) -> None:
    """With RAYFLOW_CHAOS_LOG=file, one JSON line per run (for the matrix's tally)."""
    path = os.environ.get("RAYFLOW_CHAOS_LOG")
    if not path:
        return
    import json

    strikes = [k["point"] or "random" for k in monkey.kills] + [f.point for f in faults]
    with open(path, "a") as f:
        f.write(
            json.dumps(
                {
                    "scenario": name,
                    "seed": seed,
                    "kills": [(k["action"], k["point"], k["target"]) for k in monkey.kills],
                    "faults_fired": [(f.action, f.point) for f in faults],
                    "strikes": strikes,
                    "missed": [m["point"] for m in monkey.missed],
                    "restarts": result.restarts,
                    "causes": [str(r.get("cause"))[:100] for r in result.recoveries],
                    "checkpoints": (result.checkpoints or {}).get("completed"),
                }
            )
            + "\n"
        )


def test_chaos_at_least_once_loses_nothing_under_faults_at_every_point(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    for seed in _seeds(request):
        flow = rf.Dataflow(f"chaos-alo-{seed}", parallelism=2)
        src = flow.source(
            "events",
            rf.sources.Generator(_tagged, partitions=2, limit=PER_PARTITION, rate=RATE),
        )
        src.key_by("key", lambda r: r[0]).stateful_map("seen", _remember).sink(
            "out", rf.testing.Collect()
        )
        config = rf.Checkpointing(
            storage=str(tmp_path / f"cp-{seed}"), interval_s=0.25, mode="at_least_once"
        )
        handle = rf.start(flow, checkpoint=config)
        monkey = rf.testing.chaos(
            handle,
            seed=seed,
            kills=3,
            targets=("operators", "coordinator"),
            points=CHECKPOINT_POINTS,
            every_s=0.5,
            point_timeout_s=3.0,
        )
        result = handle.wait(timeout=180)
        monkey.stop()
        monkey.check()
        _log_run("at-least-once", seed, monkey, (), result)
        out = [tuple(r) for _, r in result.output("out")]
        assert set(out) == {(p, i) for p in range(2) for i in range(PER_PARTITION)}
        assert result.restarts >= 1


def _tagged(partition: int, offset: int) -> tuple[str, int, int]:
    return f"k{offset % 97}", partition, offset


def _remember(state: int | None, record: tuple[str, int, int]) -> tuple[int, list[Any]]:
    return (state or 0) + 1, [record[1:]]


def test_chaos_stop_with_savepoint_then_resume_and_restore_from_continue_exactly(
    tmp_path: Path, s3_server: Any
) -> None:
    """Faults during a savepoint-then-stop; then resume=True, and restore_from the savepoint."""
    job = "chaos-stop-savepoint"
    prefix = f"{job}-{uuid.uuid4().hex[:6]}"
    storage = str(tmp_path / "checkpoints")
    config = rf.Checkpointing(storage=storage, interval_s=0.25)

    def flow(limit: int | None, sinks: dict[str, rf.sinks.Sink]) -> rf.Dataflow:
        return counting_flow(job, per_partition=limit or 0, rate=RATE, sinks=sinks)

    first_sinks = {
        "files": rf.sinks.JsonLines(tmp_path / "out"),
        "objects": rf.sinks.S3JsonLines(f"s3://{BUCKET}/{prefix}"),
    }
    faults = rf.testing.Faults(
        at=(
            rf.testing.Fault(
                "savepoint_before_manifest", "kill_operator", f"rayflow/{job}/count/0"
            ),
            rf.testing.Fault("final_after_manifest", "kill_operator", f"rayflow/{job}/events/1"),
        )
    )
    handle = rf.start(flow(PER_PARTITION, first_sinks), checkpoint=config, faults=faults)
    time.sleep(1.5)
    result = handle.stop(savepoint=tmp_path / "sp", timeout=120)
    assert result.status is rf.JobStatus.STOPPED and result.savepoint == str(tmp_path / "sp")
    assert result.restarts == 2  # both faults struck
    saved = open_restore_point(str(tmp_path / "sp")).manifest
    final = result.final_checkpoint
    assert final is not None and final > saved.checkpoint_id
    stopped_at = saved.sources["events"]
    assert 0 < sum(stopped_at.values()) < 2 * PER_PARTITION
    last = open_restore_point(f"{storage}/{job}/checkpoints/{final:010d}").manifest
    assert last.sources["events"] == stopped_at  # R2, R16: both hold the same records

    # resume=True: the rest of the input, once, into the same sinks.
    resumed = rf.run(flow(PER_PARTITION, first_sinks), checkpoint=config, resume=True)
    assert resumed.records_out("events") == 2 * PER_PARTITION - sum(stopped_at.values())
    expected = expected_counts(PER_PARTITION)
    check_exactly_once(json_lines_streams(tmp_path / "out"), expected, "JsonLines")
    check_exactly_once(s3_streams(s3_server, BUCKET, prefix), expected, "S3JsonLines")

    # restore_from the savepoint, another job name and sink: it continues where the savepoint is.
    again = counting_flow(
        job, per_partition=PER_PARTITION, rate=None, sinks={"collected": rf.testing.Collect()}
    )
    restored = rf.run(
        again,
        job_name=f"{job}-copy",
        checkpoint=rf.Checkpointing(storage=str(tmp_path / "copy"), interval_s=0.25),
        restore_from=tmp_path / "sp",
    )
    updates = collect_streams(restored, "collected")
    before = _counts_up_to(stopped_at)
    after = expected - before
    # Each key's updates continue from its count at the savepoint, in order.
    for name, stream in updates.items():
        last: dict[str, int] = {}
        for key, count in stream:
            assert count == last.get(key, before[key]) + 1, (name, key, count)
            last[key] = count
    assert Counter(k for s in updates.values() for k, _ in s) == after


def test_r16_a_source_restarted_while_stopping_reads_nothing_past_the_savepoint(
    tmp_path: Path,
) -> None:
    """A source killed after the final checkpoint of a stop with a savepoint restarts
    from it stopped: the job's last checkpoint and its savepoint hold the same offsets."""
    job = "r16-stop-restart"
    storage = str(tmp_path / "checkpoints")
    flow = counting_flow(  # as fast as it goes: any record read past the stop shows
        job, per_partition=50_000_000, rate=None, sinks={"collected": rf.testing.Collect()}
    )
    faults = rf.testing.Faults(
        at=(rf.testing.Fault("final_after_manifest", "kill_operator", f"rayflow/{job}/events/0"),)
    )
    handle = rf.start(
        flow, checkpoint=rf.Checkpointing(storage=storage, interval_s=0.5), faults=faults
    )
    time.sleep(1.0)
    result = handle.stop(savepoint=tmp_path / "sp", timeout=120)
    assert result.status is rf.JobStatus.STOPPED and result.restarts == 1
    saved = open_restore_point(str(tmp_path / "sp")).manifest.sources["events"]
    last = open_restore_point(f"{storage}/{job}/checkpoints/{result.final_checkpoint:010d}")
    assert last.manifest.sources["events"] == saved
    updates = collect_streams(result, "collected")
    assert sum(len(s) for s in updates.values()) == sum(saved.values())


def _counts_up_to(offsets: dict[int, int]) -> Counter[str]:
    from tests.chaos.flows import event

    counts: Counter[str] = Counter()
    for partition, end in offsets.items():
        for i in range(end):
            counts[event(partition, i)[0]] += 1
    return counts


DRIVER = """
import sys, ray, rayflow as rf
sys.path.insert(0, {root!r})
from tests.chaos.flows import counting_flow
ray.init(address={address!r}, namespace="rayflow-driver")
sinks = {{"files": rf.sinks.JsonLines({out!r}),
          "objects": rf.sinks.S3JsonLines({objects!r})}}
flow = counting_flow({job!r}, per_partition={per_partition}, rate={rate}, sinks=sinks)
handle = rf.start(flow, checkpoint=rf.Checkpointing(storage={storage!r}, interval_s=0.25))
rf.testing.chaos(handle, seed={seed}, kills=1, targets=("driver",), points={points!r},
                 every_s=0.8, point_timeout_s=5.0)
handle.wait()
"""


@pytest.mark.parametrize("points", [("before_manifest",), ("after_manifest", "after_notify")])
def test_chaos_killed_driver_at_a_point_then_resume(
    points: tuple[str, ...], tmp_path: Path, s3_server: Any
) -> None:
    """The driver dies at a protocol point (its job dies with it); a new driver resumes."""
    job = f"chaos-driver-{points[0]}"
    prefix = f"{job}-{uuid.uuid4().hex[:6]}"
    storage, out = str(tmp_path / "checkpoints"), str(tmp_path / "out")
    script = DRIVER.format(
        root=str(ROOT),
        address=ray.get_runtime_context().gcs_address,
        out=out,
        objects=f"s3://{BUCKET}/{prefix}",
        job=job,
        per_partition=PER_PARTITION,
        rate=RATE,
        storage=storage,
        seed=3,
        points=points,
    )
    driver = subprocess.Popen(
        [sys.executable, "-c", script], start_new_session=True, env={**os.environ}
    )
    try:
        code = driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert code == -signal.SIGKILL, f"the driver was not killed (exit code {code})"
    flow = counting_flow(
        job,
        per_partition=PER_PARTITION,
        rate=None,
        sinks={
            "files": rf.sinks.JsonLines(out),
            "objects": rf.sinks.S3JsonLines(f"s3://{BUCKET}/{prefix}"),
        },
    )
    deadline = time.monotonic() + 30
    while True:  # the dead driver's coordinator goes away with it, within a moment
        try:
            result = rf.run(flow, checkpoint=rf.Checkpointing(storage=storage), resume=True)
            break
        except rf.errors.JobAlreadyRunningError:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    assert result.status is rf.JobStatus.FINISHED
    expected = expected_counts(PER_PARTITION)
    check_exactly_once(json_lines_streams(Path(out)), expected, "JsonLines")
    check_exactly_once(s3_streams(s3_server, BUCKET, prefix), expected, "S3JsonLines")
