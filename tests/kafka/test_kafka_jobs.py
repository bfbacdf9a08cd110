"""Kafka -> keyed running sum -> Kafka on the session's local Ray, under faults.

Every check reads the output topic back with ``isolation.level=read_committed``
and compares each key's sums per output partition, in order: ``(k, 1) ..
(k, n)`` exactly once (tests/chaos/flows.py). tansu 0.6.0 shows the records
of aborted transactions to read_committed readers too; on it the check first
keeps, per committable, the last commit attempt (the only one that can have
committed: tests/kafka/helpers.py), and asserts that aborted attempts came
only from restarts and outages.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

import rayflow as rf
from tests.chaos.flows import check_exactly_once
from tests.kafka.helpers import (
    Feeder,
    OutputWatch,
    caught_up,
    keyed_sum_flow,
    produce,
    produce_one_by_one,
    sum_streams,
    wait_for,
)
from tests.support.fault_proxy import FaultProxy
from tests.support.kafka_broker import KafkaBroker, read_topic

pytestmark = pytest.mark.ray

CHECKPOINT_POINTS = ("triggered", "before_manifest", "after_manifest", "after_notify")


@pytest.fixture(autouse=True)
def _ray(ray_session: None) -> None:
    """Every test here runs jobs on the session's shared local Ray."""


@pytest.fixture
def jobs() -> Iterator[list[rf.JobHandle]]:
    """The test's jobs; one a failed test left running is stopped (not left to the next)."""
    handles: list[rf.JobHandle] = []
    yield handles
    for handle in handles:
        if handle.status() is rf.JobStatus.RUNNING:
            with contextlib.suppress(Exception):
                handle.stop(timeout=30)


def _finish(
    handle: rf.JobHandle, bootstrap: str, sink: str, expected: Counter[str], *feeders: Feeder
) -> rf.JobResult:
    """Once the input is all in and its last sums came out, stop (the final checkpoint
    commits what is left). Not on the lag alone: it is as of the last fetch, and a
    consumer that lost its broker reconnects after a back-off of up to 10 s."""
    for feeder in feeders:
        feeder.join(60)
        assert feeder.error is None, feeder.error
    watch = OutputWatch(bootstrap, sink)
    try:
        wait_for(lambda: watch.reached(expected), 90, "the last sums in the output")
    except AssertionError as exc:
        short = {k: n for k, n in expected.items() if watch.highest.get(k, 0) < n}
        raise AssertionError(
            f"{exc}; keys short {len(short)} (e.g. {list(short.items())[:3]} got "
            f"{[watch.highest.get(k) for k in list(short)[:3]]}); status {handle.status()}; "
            f"recoveries {handle.recoveries()}; metrics {_summary(handle)}; checkpoints "
            f"{ {k: v for k, v in (handle.checkpoint_stats() or {}).items() if k != 'history'} }"
        ) from None
    finally:
        watch.close()
    result = handle.stop()
    assert result.status is rf.JobStatus.STOPPED, result
    return result


def test_keyed_sum_is_exactly_once_under_chaos(
    kafka_broker: KafkaBroker, tmp_path: Path, jobs: list[rf.JobHandle]
) -> None:
    bootstrap = kafka_broker.bootstrap
    source, sink = kafka_broker.topic(4, "in"), kafka_broker.topic(3, "out")
    feeder = Feeder(bootstrap, source, events=16_000, keys=200, rate=4_000)
    flow = keyed_sum_flow("kafka-chaos", bootstrap, source, sink)
    handle = rf.start(
        flow, checkpoint=rf.Checkpointing(storage=str(tmp_path / "cp"), interval_s=0.25)
    )
    jobs.append(handle)
    feeder.start()
    monkey = rf.testing.chaos(
        handle,
        seed=1,
        kills=3,
        targets=("operators", "sources", "sinks", "coordinator"),
        points=CHECKPOINT_POINTS,
        every_s=0.5,
        point_timeout_s=3.0,
    )
    try:
        wait_for(lambda: len(monkey.kills) + len(monkey.missed) >= 3, 60, "the faults")
    finally:
        monkey.stop()
    monkey.check()
    result = _finish(handle, bootstrap, sink, feeder.expected(), feeder)
    assert monkey.kills and result.restarts >= 1, (monkey.kills, monkey.missed)
    streams, aborted = sum_streams(bootstrap, sink, filters_aborted=kafka_broker.filters_aborted)
    check_exactly_once(streams, feeder.expected(), "Kafka sink")
    # An attempt is aborted only when a restart cut its commit off: at most one per sink
    # partition (2) per restart.
    assert aborted <= 2 * result.restarts, (aborted, result.recoveries)


def test_resume_continues_exactly_where_the_output_ends(
    kafka_broker: KafkaBroker, tmp_path: Path, jobs: list[rf.JobHandle]
) -> None:
    bootstrap = kafka_broker.bootstrap
    source, sink = kafka_broker.topic(2, "in"), kafka_broker.topic(2, "out")
    checkpoint = rf.Checkpointing(storage=str(tmp_path / "cp"), interval_s=0.5)
    first = Feeder(bootstrap, source, events=3_000, keys=50, rate=1e9)
    first.run()
    flow = keyed_sum_flow("kafka-resume", bootstrap, source, sink)
    handle = rf.start(flow, checkpoint=checkpoint)
    jobs.append(handle)
    metrics = handle.metrics()
    _finish(handle, bootstrap, sink, first.expected())
    assert {e["partition"] for e in metrics["in"]} == {0, 1}
    # More input while the job is down; a new driver resumes from the last checkpoint.
    second = Feeder(bootstrap, source, events=5_000, keys=50, rate=1e9)
    second.run()
    handle = rf.start(
        keyed_sum_flow("kafka-resume", bootstrap, source, sink), checkpoint=checkpoint, resume=True
    )
    jobs.append(handle)
    _finish(handle, bootstrap, sink, first.expected() + second.expected())
    streams, aborted = sum_streams(bootstrap, sink, filters_aborted=kafka_broker.filters_aborted)
    assert aborted == 0
    check_exactly_once(streams, first.expected() + second.expected(), "resumed Kafka sink")


def test_latest_start_over_two_topics_and_several_partitions(
    kafka_broker: KafkaBroker, tmp_path: Path, jobs: list[rf.JobHandle]
) -> None:
    bootstrap = kafka_broker.bootstrap
    clicks, views = kafka_broker.topic(3, "clicks"), kafka_broker.topic(2, "views")
    sink = kafka_broker.topic(1, "out")
    for topic, n in ((clicks, 3), (views, 2)):
        for p in range(n):
            produce_one_by_one(bootstrap, topic, p, [b"old"] * 3)
    flow = rf.Dataflow("kafka-latest", parallelism=2)
    events = flow.source("in", rf.sources.Kafka(bootstrap, [views, clicks], start="latest"))
    timed = events.with_event_time("ts", lambda m: m.timestamp, max_delay_s=0.0)
    tagged = timed.map(
        "tag", lambda m: {"topic": m.topic, "partition": m.partition, "value": m.value.decode()}
    )
    tagged.sink("out", rf.sinks.Kafka(bootstrap, sink))
    checkpoint = rf.Checkpointing(storage=str(tmp_path / "cp"), interval_s=0.5)
    handle = rf.start(flow, checkpoint=checkpoint)
    jobs.append(handle)
    # The end offsets were taken as the job started: only what comes now is read.
    started = time.time()
    sent = []
    for topic, n in ((clicks, 3), (views, 2)):
        for p in range(n):
            values = [f"new-{topic}-{p}-{i}".encode() for i in range(20)]
            produce(bootstrap, topic, [(None, v) for v in values], partition=p)
            sent += [(topic, p, v.decode()) for v in values]
    wait_for(lambda: _records_out(handle, "in") >= len(sent), 60, "every new record read")
    caught_up(handle)
    metrics = handle.metrics()
    result = handle.stop()
    assert result.status is rf.JobStatus.STOPPED
    entries = metrics["in"]
    assert sum(e["kafka_lag"] for e in entries) == 0
    lags: dict[str, int] = {}
    for e in entries:
        lags.update(e["kafka_lag_by_partition"])
    assert lags == {f"{t}[{p}]": 0 for t, n in ((clicks, 3), (views, 2)) for p in range(n)}
    assert all(e["source_backlog"] == 0 for e in entries)
    assert sum(e["records_out"] for e in entries) == len(sent)
    # Event time from the records' Kafka timestamps (seconds): each partition's watermark.
    watermarks = [e["watermark_out"] for e in entries]
    assert all(started - 60 < w <= time.time() for w in watermarks), watermarks
    out = [json.loads(r.value) for r in read_topic(bootstrap, sink)]
    assert sorted((o["topic"], o["partition"], o["value"]) for o in out) == sorted(sent)


def test_a_broker_connection_lost_for_seconds_delays_but_loses_nothing(
    tmp_path: Path, jobs: list[rf.JobHandle]
) -> None:
    proxy = FaultProxy(0)
    broker = KafkaBroker(tmp_path, advertised_port=proxy.port)  # clients only via the proxy
    proxy.upstream = ("127.0.0.1", broker.port)
    try:
        broker.start()
        proxy.start()
        broker.probe()
        source, sink = broker.topic(2, "in"), broker.topic(2, "out")
        feeder = Feeder(broker.direct, source, events=12_000, keys=100, rate=3_000)
        flow = keyed_sum_flow("kafka-outage", broker.bootstrap, source, sink)
        handle = rf.start(
            flow, checkpoint=rf.Checkpointing(storage=str(tmp_path / "cp"), interval_s=0.25)
        )
        jobs.append(handle)
        feeder.start()
        wait_for(lambda: _records_in(handle) > 2_000, 30, "records flowing")
        proxy.down = True
        proxy.faults()  # every connection to the broker is cut, new ones refused
        time.sleep(3.0)
        proxy.down = False
        result = _finish(handle, broker.direct, sink, feeder.expected(), feeder)
        assert proxy.counts["refused"] > 0  # the job's clients tried, and were turned away
        given = Counter(r.key.decode() for r in read_topic(broker.direct, source))
        assert given == feeder.expected(), "the input itself holds an event twice or not at all"
        streams, aborted = sum_streams(
            broker.direct, sink, filters_aborted=bool(broker.filters_aborted)
        )
        check_exactly_once(streams, feeder.expected(), "Kafka sink through an outage")
        # Waited out, not a failure (a commit cut off in the middle was tried again).
        assert result.restarts == 0, result.recoveries
        assert aborted <= 4, aborted  # one or two per sink partition, cut off mid-commit
    finally:
        proxy.stop()
        broker.stop()


def _records_in(handle: rf.JobHandle) -> int:
    try:
        return sum(e["records_in"] for e in handle.metrics()["sum"])
    except Exception:
        return 0


def _summary(handle: rf.JobHandle) -> Any:
    try:
        return {
            step: [(e["records_in"], e["records_out"], e.get("kafka_lag")) for e in entries]
            for step, entries in handle.metrics().items()
        }
    except Exception as exc:
        return repr(exc)


def _records_out(handle: rf.JobHandle, step: str) -> int:
    try:
        return sum(e["records_out"] for e in handle.metrics()[step])
    except Exception:
        return 0


ROOT = Path(__file__).resolve().parents[2]


def test_the_example_job_runs_as_a_script_and_with_rayflow_run(
    kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    """jobs/kafka_sum.py as its docstring says: test input, a run, the sums read back; then
    ``rayflow run`` on more input, stopped with SIGINT (Ctrl-C): every update exactly once."""
    bootstrap = kafka_broker.bootstrap
    source, sink = kafka_broker.topic(2, "sums-in"), kafka_broker.topic(2, "sums-out")
    env = {
        **os.environ,
        "RAYFLOW_KAFKA_BOOTSTRAP": bootstrap,
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
    }
    topics = ("--input", source, "--output", sink)
    options = ("--produce", "2000", "--until-read", "2000", "--seconds", "60", "--interval", "0.3")
    script = subprocess.run(
        [sys.executable, "jobs/kafka_sum.py", *topics, *options, "--checkpoint", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert script.returncode == 0, script.stderr[-3000:]
    # Keys user0..user99, values 1..10 in turn: each key's sum is 20 records' worth.
    assert f"{sink} (read_committed): 2,000 updates, 100 keys" in script.stdout, script.stdout
    first = {f"user{k}": 20 * (k % 10 + 1) for k in range(100)}

    # The same job with `rayflow run` (its own job name, checkpoints), on 1,000 more records.
    more = [(f"user{i % 100}".encode(), str(i % 10 + 1).encode()) for i in range(1000)]
    produce(bootstrap, source, more)
    command = ["rayflow", "run", "jobs/kafka_sum.py", *topics, "--job-name", "kafka-sum-cli"]
    command += ["--checkpoint", str(tmp_path / "cp2"), "--interval", "0.3", "--seconds", "150"]
    command += ["--json"]  # stopped by SIGINT below; --seconds only bounds a stuck run
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        # A second run from the earliest offsets: it recomputes 3,000 updates.
        expected = Counter({k: n + 10 * (int(k[4:]) % 10 + 1) for k, n in first.items()})
        watch = OutputWatch(bootstrap, sink)
        try:
            wait_for(lambda: watch.reached(expected), 90, "the rayflow run's last sums")
        except AssertionError:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(
                f"rayflow run, exit {proc.returncode}, free {ray.available_resources()}:"
                f"\n{out}\n{err[-3000:]}"
            ) from None
        finally:
            watch.close()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    assert json.loads(stdout)["status"] == "STOPPED"
    records = read_topic(bootstrap, sink)
    assert len(records) == 2_000 + 3_000
    last: dict[str, int] = {}
    for r in records:
        last[r.key.decode()] = int(r.value)
    assert last == dict(expected)
