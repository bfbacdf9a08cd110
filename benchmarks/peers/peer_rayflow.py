"""rayflow's side of the peer comparison: ``python peer_rayflow.py WORKLOAD P CHECKPOINT``.

Prints one JSON line: records, the run's end time, and what the job produced
(to check it). Ray is started here, privately, before the clock starts, and
a throughput job is submitted once Ray's idle worker processes for its
actors are ready (``wait_for_workers``; ``PEER_WARM=0``: at once), as on a
running cluster or in a notebook session, so that submit -> end is the
job's time with its start-up included, not Ray's. The
``startup`` workload runs ``PEER_STARTUP_JOBS`` (default 3) tiny jobs one
after the other on that one Ray: the first right after ``ray.init``, the
others on a Ray that has run jobs before; then, ``PEER_STARTUP_REST_S``
(default 1.5) seconds later, one more, marked ``rested``: a job back to
back finds the Ray worker processes for its actors still starting (each
actor needs one of its own, ~0.3 s of CPU to start), one after a pause
finds them ready.

The ``windows`` workload: a ``Generator`` source (partition p of P reads
events ``offset * P + p``), ``with_event_time`` (a watermark ``MAX_DELAY_S``
behind), ``key_by`` and ``window(..., rf.windows.Tumbling(60.0),
rf.windows.Count())``, whose ``(key, rf.windows.Result(start, end, value))``
results a sink tallies.

The ``kafka`` workload: ``rf.sources.Kafka`` (from the earliest offsets of the
topic ``PEER_KAFKA_IN`` at ``PEER_KAFKA``), ``map``, ``key_by``, ``reduce`` and
``rf.sinks.Kafka`` into ``PEER_KAFKA_OUT`` (a ``(key, sum)`` update is sent as
key and value, the sum JSON-encoded, i.e. decimal text). Its source is
unbounded: the job is started with ``rf.start`` and stopped (a final
checkpoint, which commits the last updates) once the sink has taken every
update (its metrics are polled every 0.1 s, as benchmarks/kafka.py does); the
run ends when ``stop()`` returns.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import workloads as w
from _common import start_ray, wait_for_workers

import rayflow as rf


class LastPerKey(rf.sinks.Sink):
    """Keeps the latest value per key; the count of updates and the final values go to a file.

    The first record of each partition stamps the time in ``firsts``.
    """

    def __init__(self, folder: str, firsts: str):
        self.folder = folder
        self.firsts = firsts

    def open(self, ctx: rf.sinks.SinkContext) -> rf.sinks.SinkWriter:
        return _LastWriter(os.path.join(self.folder, f"{ctx.partition}.json"), self.firsts)


class _LastWriter(rf.sinks.SinkWriter):
    def __init__(self, path: str, firsts: str):
        self.path = path
        self.firsts = firsts
        self.latest: dict[Any, Any] = {}
        self.count = 0

    def write(self, items: list[Any]) -> None:
        if items and not self.count:
            w.stamp_first_out(self.firsts)
        self.count += len(items)
        self.latest.update(items)

    def prepare_commit(self, checkpoint_id: int) -> Any:
        return {"count": self.count, "total": sum(self.latest.values())}

    def commit(self, committable: Any) -> None:
        with open(self.path, "w") as f:
            json.dump(committable, f)


class WindowStats(rf.sinks.Sink):
    """Tallies the window results (``workloads.WindowTally``); the tally goes to a file."""

    def __init__(self, folder: str, firsts: str):
        self.folder = folder
        self.firsts = firsts

    def open(self, ctx: rf.sinks.SinkContext) -> rf.sinks.SinkWriter:
        return _WindowWriter(os.path.join(self.folder, f"{ctx.partition}.json"), self.firsts)


class _WindowWriter(rf.sinks.SinkWriter):
    def __init__(self, path: str, firsts: str):
        self.path = path
        self.firsts = firsts
        self.tally = w.WindowTally()

    def write(self, items: list[Any]) -> None:
        if items and not self.tally.count:
            w.stamp_first_out(self.firsts)
        add = self.tally.add
        for key, result in items:
            add(key, result.start, result.value)

    def prepare_commit(self, checkpoint_id: int) -> Any:
        return self.tally.state()

    def commit(self, committable: Any) -> None:
        with open(self.path, "w") as f:
            json.dump(committable, f)


def build(
    workload: str, parallelism: int, out: str, firsts: str, name: str = ""
) -> tuple[rf.Dataflow, int]:
    flow = rf.Dataflow(name or f"peer-{workload}", parallelism=parallelism)
    if workload in ("keyed_sum", "startup"):
        records = w.SUM_RECORDS if workload == "keyed_sum" else w.STARTUP_RECORDS
        per = records // parallelism
        src = flow.source(
            "numbers",
            rf.sources.Generator(
                lambda p, i, n=parallelism: w.sum_record(p, i, n), partitions=parallelism, limit=per
            ),
        )
        src = src.map("stamp", w.stamp)
        sums = src.key_by("by_key", lambda r: r[0]).reduce(
            "sum", lambda acc, r: acc + r[1], initial=0
        )
        sums.sink("out", LastPerKey(out, firsts))
        return flow, per * parallelism
    if workload in ("windows", "windows_combined"):
        per = w.WINDOW_EVENTS // parallelism
        src = flow.source(
            "events",
            rf.sources.Generator(
                lambda p, i, n=parallelism: w.window_event(i * n + p),
                partitions=parallelism,
                limit=per,
            ),
        )
        events = src.map("stamp", w.stamp).with_event_time(
            "ts", lambda e: e[1], max_delay_s=w.MAX_DELAY_S
        )
        counts = events.key_by("by_key", lambda e: e[0]).window(
            "per_min",
            rf.windows.Tumbling(float(w.WINDOW_S)),
            rf.windows.Count(),
            combine=workload == "windows_combined",
        )
        counts.sink("out", WindowStats(out, firsts))
        return flow, per * parallelism
    if workload == "kafka":
        bootstrap = os.environ["PEER_KAFKA"]
        messages = flow.source("in", rf.sources.Kafka(bootstrap, os.environ["PEER_KAFKA_IN"]))
        pairs = messages.map("stamp", w.stamp).map(
            "decode", lambda m: (m.key.decode(), int(m.value))
        )
        sums = pairs.key_by("by_key", lambda kv: kv[0]).reduce(
            "sum", lambda acc, kv: acc + kv[1], initial=0
        )
        sums.sink("out", rf.sinks.Kafka(bootstrap, os.environ["PEER_KAFKA_OUT"]))
        return flow, w.SUM_RECORDS
    if workload == "wordcount":
        folder = w.make_text(w.text_megabytes())
        lines = flow.source("lines", rf.sources.TextFiles(os.path.join(folder, "*.txt")))
        words = lines.map("stamp", w.stamp).flat_map("split", str.split)
        counts = words.key_by("by_word", lambda x: x).reduce(
            "count", lambda acc, _: acc + 1, initial=0
        )
        counts.sink("out", LastPerKey(out, firsts))
        return flow, w.count_words(folder)
    folder = w.make_events()
    lines = flow.source("events", rf.sources.TextFiles(os.path.join(folder, "*.jsonl")))
    events = lines.map("stamp", w.stamp).map("parse", json.loads)
    sessions = events.key_by("by_user", lambda e: e["user"]).stateful_map(
        "sessionize", w.session_step
    )
    sessions.map("pair", lambda kv: (kv[1]["user"] + str(kv[1]["start"]), kv[1]["clicks"])).sink(
        "out", LastPerKey(out, firsts)
    )
    return flow, w.SESSION_EVENTS


def run_until(flow: rf.Dataflow, config: rf.Checkpointing | None, updates: int) -> rf.JobResult:
    """Run a job of an unbounded source until its sink ``out`` has taken ``updates``
    records, then stop it (with checkpoints, the stop commits the rest)."""
    if config is None:
        raise SystemExit("the kafka workload runs with checkpoints only (its sink commits at them)")
    handle = rf.start(flow, checkpoint=config)
    while sum(m["records_in"] for m in handle.metrics()["out"]) < updates:
        try:
            handle.wait(timeout=0.1)  # returns only if the job ended by itself
        except TimeoutError:
            continue
        raise RuntimeError("the job ended before its sink had every update")
    result = handle.stop()
    if result.status is not rf.JobStatus.STOPPED or result.restarts:
        raise RuntimeError(f"the job did not run cleanly: {result}")
    return result


def main() -> None:
    workload, parallelism, checkpoint = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    jobs = int(os.environ.get("PEER_STARTUP_JOBS", "3")) if workload == "startup" else 1
    rest_s = float(os.environ.get("PEER_STARTUP_REST_S", "1.5"))
    rested = workload == "startup" and rest_s > 0
    runs = []
    for job in range(jobs + rested):
        out, firsts = tempfile.mkdtemp(prefix="peer-out-"), tempfile.mkdtemp(prefix="peer-1st-")
        flow, records = build(workload, parallelism, out, firsts, f"peer-{workload}-{job}")
        runs.append((flow, out, firsts))
    runtime_started = time.time()
    start_ray()
    # Throughput jobs start on a Ray whose workers are ready (PEER_WARM=0: right after
    # ray.init); the startup workload measures both cases on its own.
    extra: dict[str, Any] = {}
    if workload != "startup" and os.environ.get("PEER_WARM", "1") == "1":
        extra["warm_wait_s"] = wait_for_workers(runs[0][0])
    startups = []
    for i, (flow, _, firsts) in enumerate(runs):
        if i == jobs:
            time.sleep(rest_s)
        config = (
            rf.Checkpointing(storage=tempfile.mkdtemp(prefix="peer-cp-"), interval_s=1.0)
            if checkpoint
            else None
        )
        started = time.time()
        if workload == "kafka":
            result = run_until(flow, config, records)
        else:
            result = rf.run(flow, checkpoint=config)
        ended = time.time()
        startups.append(
            {
                "runtime_started": runtime_started,
                "submitted": started,
                "first_out": w.first_out(firsts),
                "ended": ended,
                "rested": i == jobs,
            }
        )
    w.report(
        records,
        started,
        ended,
        runs[-1][1],  # what the (last) job wrote
        steady_from=result.running_at,
        checkpoints=(result.checkpoints or {}).get("completed", 0),
        startups=startups,
        **extra,
    )


if __name__ == "__main__":
    main()
