"""Bytewax's side of the peer comparison (run in .venv-bytewax).

``python peer_bytewax.py WORKLOAD P CHECKPOINT`` prints one JSON line like
the other peers. Parallelism P runs P processes of one worker each,
connected with ``cluster_main`` (what ``python -m bytewax.run -i N -a ...``
starts): Bytewax's documentation recommends processes over ``-w`` worker
threads for Python work, since the workers of one process contend for the
GIL ("Workers, processes and GIL contention" in its Performance guide:
"you should try starting with multiple processes using the -i/--process-id,
-a/--addresses instead of multiple workers with -w"). On this 2-core
machine that is 1 process at P=1 and 2 at P=2. Checkpoints are Bytewax's
recovery snapshots, taken at every 1 s epoch.

The ``windows`` workload is ``bytewax.operators.windowing.count_window`` with an
``EventClock`` (timestamps as the UTC datetimes it requires, waiting
``MAX_DELAY_S`` of system time for stragglers) and a one-minute
``TumblingWindower`` aligned to the epoch. ``to_system_utc`` maps every
window close to ``None``: the input's timestamps lie in the past, and with the
default (the identity) each key's close time is already due, so Bytewax would
wake the window operator for every key at every activation to close windows
that its items close anyway (PEER_BYTEWAX_NOTIFY=1 runs that default).

The ``kafka`` workload uses Bytewax's own Kafka connectors (needs
confluent-kafka in the venv): ``KafkaSource([PEER_KAFKA], [PEER_KAFKA_IN],
tail=False)``, which reads each partition from its beginning and ends at its
end, ``key_on``, ``stateful_map`` and ``KafkaSink([PEER_KAFKA],
PEER_KAFKA_OUT)`` with its defaults: a plain producer (no transactions, so
at-least-once) that flushes every batch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bytewax.operators as op
import workloads as w
from bytewax._bytewax import RecoveryConfig, cluster_main, init_db_dir
from bytewax.connectors.files import DirSource
from bytewax.dataflow import Dataflow
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.operators.windowing import EventClock, TumblingWindower, count_window
from bytewax.outputs import DynamicSink, StatelessSinkPartition

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
NOTIFY = os.environ.get("PEER_BYTEWAX_NOTIFY") == "1"


class _NumbersPart(StatefulSourcePartition):
    def __init__(self, partition: int, partitions: int, records: int, resume: int | None):
        self.p, self.n = partition, partitions
        self.per = records // partitions
        self.next = resume or 0

    def next_batch(self) -> list[Any]:
        if self.next >= self.per:
            raise StopIteration()
        end = min(self.next + 4096, self.per)
        batch = [w.sum_record(self.p, i, self.n) for i in range(self.next, end)]
        self.next = end
        return batch

    def snapshot(self) -> int:
        return self.next


class Numbers(FixedPartitionedSource):
    def __init__(self, partitions: int, records: int):
        self.partitions = partitions
        self.records = records

    def list_parts(self) -> list[str]:
        return [str(p) for p in range(self.partitions)]

    def build_part(self, step_id: str, for_part: str, resume_state: Any) -> _NumbersPart:
        return _NumbersPart(int(for_part), self.partitions, self.records, resume_state)


class _EventsPart(StatefulSourcePartition):
    def __init__(self, partition: int, partitions: int, resume: int | None):
        self.p, self.n = partition, partitions
        self.per = w.WINDOW_EVENTS // partitions
        self.next = resume or 0

    def next_batch(self) -> list[Any]:
        if self.next >= self.per:
            raise StopIteration()
        end = min(self.next + 4096, self.per)
        p, n, event = self.p, self.n, w.window_event
        batch = [event(i * n + p) for i in range(self.next, end)]
        self.next = end
        return batch

    def snapshot(self) -> int:
        return self.next


class Events(FixedPartitionedSource):
    """The windows workload's events; partition p of P reads events ``offset * P + p``."""

    def __init__(self, partitions: int):
        self.partitions = partitions

    def list_parts(self) -> list[str]:
        return [str(p) for p in range(self.partitions)]

    def build_part(self, step_id: str, for_part: str, resume_state: Any) -> _EventsPart:
        return _EventsPart(int(for_part), self.partitions, resume_state)


class _WindowStatsPart(StatelessSinkPartition):
    def __init__(self, path: str, stamps: str):
        self.path = path
        self.stamps = stamps
        self.tally = w.WindowTally()

    def write_batch(self, items: list[Any]) -> None:
        if items and not self.tally.count:
            w.stamp_first_out(self.stamps)
        add = self.tally.add
        for key, (window_id, count) in items:
            add(key, window_id * w.WINDOW_S, count)  # windows are aligned to the epoch

    def close(self) -> None:
        self.tally.dump(self.path)


class WindowStats(DynamicSink):
    def __init__(self, folder: str):
        self.folder = folder

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _WindowStatsPart:
        path = os.path.join(self.folder, f"{os.getpid()}-{worker_index}.json")
        return _WindowStatsPart(path, os.environ["PEER_STAMPS"])


def event_time(event: tuple[str, float]) -> datetime:
    return datetime.fromtimestamp(event[1], tz=timezone.utc)


def no_wakeup(close: datetime) -> datetime | None:
    return None


class _StatsPart(StatelessSinkPartition):
    def __init__(self, path: str, stamps: str):
        self.path = path
        self.stamps = stamps
        self.latest: dict[Any, Any] = {}
        self.count = 0

    def write_batch(self, items: list[Any]) -> None:
        if items and not self.count:
            w.stamp_first_out(self.stamps)
        self.count += len(items)
        self.latest.update(items)

    def close(self) -> None:
        with open(self.path, "w") as f:
            json.dump({"count": self.count, "total": sum(self.latest.values())}, f)


class Stats(DynamicSink):
    def __init__(self, folder: str):
        self.folder = folder

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _StatsPart:
        path = os.path.join(self.folder, f"{os.getpid()}-{worker_index}.json")
        return _StatsPart(path, os.environ["PEER_STAMPS"])


def build(workload: str, parallelism: int, out: str) -> tuple[Dataflow, int]:
    flow = Dataflow(f"peer_{workload}")
    if workload in ("keyed_sum", "startup"):
        records = w.SUM_RECORDS if workload == "keyed_sum" else w.STARTUP_RECORDS
        source = Numbers(parallelism, records)
        nums = op.map("stamp", op.input("numbers", flow, source), w.stamp)
        keyed = op.key_on("by_key", nums, lambda r: str(r[0]))
        sums = op.stateful_map(
            "sum", op.map_value("value", keyed, lambda r: r[1]), lambda s, v: ((s or 0) + v,) * 2
        )
        op.output("out", sums, Stats(out))
        return flow, records
    if workload == "windows":
        events = op.map("stamp", op.input("events", flow, Events(parallelism)), w.stamp)
        clock: EventClock[tuple[str, float]] = EventClock(
            ts_getter=event_time,
            wait_for_system_duration=timedelta(seconds=w.MAX_DELAY_S),
            **({} if NOTIFY else {"to_system_utc": no_wakeup}),
        )
        windower = TumblingWindower(length=timedelta(seconds=w.WINDOW_S), align_to=EPOCH)
        counts = count_window("per_min", events, clock, windower, key=lambda e: e[0])
        op.output("out", counts.down, WindowStats(out))
        return flow, w.WINDOW_EVENTS
    if workload == "kafka":
        from bytewax.connectors.kafka import KafkaSink, KafkaSinkMessage, KafkaSource

        brokers = [os.environ["PEER_KAFKA"]]
        source = KafkaSource(brokers, [os.environ["PEER_KAFKA_IN"]], tail=False)
        messages = op.map("stamp", op.input("in", flow, source), w.stamp)
        keyed = op.key_on("by_key", messages, lambda m: m.key.decode())
        values = op.map_value("decode", keyed, lambda m: int(m.value))
        sums = op.stateful_map("sum", values, lambda s, v: ((s or 0) + v,) * 2)
        updates = op.map(
            "encode", sums, lambda kv: KafkaSinkMessage(kv[0].encode(), str(kv[1]).encode())
        )
        op.output("out", updates, KafkaSink(brokers, os.environ["PEER_KAFKA_OUT"]))
        return flow, w.SUM_RECORDS
    if workload == "wordcount":
        folder = w.make_text(w.text_megabytes())
        lines = op.map(
            "stamp", op.input("lines", flow, DirSource(Path(folder), glob_pat="*.txt")), w.stamp
        )
        words = op.flat_map("split", lines, str.split)
        keyed = op.key_on("by_word", words, lambda x: x)
        counts = op.stateful_map("count", keyed, lambda s, _: ((s or 0) + 1,) * 2)
        op.output("out", counts, Stats(out))
        return flow, w.count_words(folder)
    folder = w.make_events()
    lines = op.map(
        "stamp", op.input("events", flow, DirSource(Path(folder), glob_pat="*.jsonl")), w.stamp
    )
    events = op.map("parse", lines, json.loads)
    keyed = op.key_on("by_user", events, lambda e: e["user"])
    closed = op.stateful_map("sessionize", keyed, w.session_step)
    sessions = op.flat_map_value("flatten", closed, lambda s: s)
    pairs = op.map(
        "pair", sessions, lambda kv: (kv[1]["user"] + str(kv[1]["start"]), kv[1]["clicks"])
    )
    op.output("out", pairs, Stats(out))
    return flow, w.SESSION_EVENTS


def worker(
    workload: str, parallelism: int, checkpoint: str, proc_id: int, addresses: list[str], out: str
) -> None:
    flow, _ = build(workload, parallelism, out)
    kwargs: dict[str, Any] = {}
    if checkpoint:
        kwargs = {
            "epoch_interval": timedelta(seconds=1),
            "recovery_config": RecoveryConfig(checkpoint),
        }
    cluster_main(flow, addresses, proc_id, **kwargs)


def main() -> None:
    if sys.argv[1] == "--worker":
        _, _, workload, par, cp, proc, addrs, out = sys.argv
        worker(workload, int(par), cp, int(proc), addrs.split(","), out)
        return
    workload, parallelism, checkpoint = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    out = tempfile.mkdtemp(prefix="peer-out-")
    _, records = build(workload, parallelism, out)
    recovery = ""
    if checkpoint:
        recovery = tempfile.mkdtemp(prefix="peer-bytewax-recovery-")
        init_db_dir(recovery, parallelism)
    ports = []
    for _ in range(parallelism):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    addresses = ",".join(f"127.0.0.1:{p}" for p in ports)
    started = time.time()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                workload,
                str(parallelism),
                recovery,
                str(i),
                addresses,
                out,
            ]
        )
        for i in range(parallelism)
    ]
    codes = [p.wait() for p in procs]
    ended = time.time()
    if any(codes):
        raise SystemExit(f"bytewax workers exited with {codes}")
    # Bytewax has no runtime apart from the job's processes: its start-up is their
    # start (interpreter, imports, building the flow) up to the first record out.
    first = w.first_out(os.environ["PEER_STAMPS"])
    startup = {"runtime_started": started, "submitted": started, "first_out": first, "ended": ended}
    w.report(records, started, ended, out, startups=[startup])


if __name__ == "__main__":
    main()
