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
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bytewax.operators as op
import workloads as w
from bytewax._bytewax import RecoveryConfig, cluster_main, init_db_dir
from bytewax.connectors.files import DirSource
from bytewax.dataflow import Dataflow
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import DynamicSink, StatelessSinkPartition


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
