"""End-to-end latency at 50% of the maximum throughput, checkpoints every second.

The job is the keyed running sum of the peer comparison (1,000 keys) as a
``stateful_map``; every record carries the wall-clock time its source
generated it, and the sink notes ``now - that time`` for every record it
receives. Two phases, in the same run:

1. the maximum throughput: the job at full speed (no rate cap), checkpoints
   every second, its steady rate measured from every operator running to the
   end of the job;
2. the latency: the same job with the source capped at 50% of that rate for
   ``--seconds``; the first ``--warmup`` seconds are left out. Prints p50,
   p99, p99.9 and the maximum, and the checkpoints taken.

Latency is measured to the sink's ``write`` (the record has reached the sink
writer); an exactly-once sink publishes it at the next checkpoint commit, so
what a reader of committed output sees is later by up to the checkpoint
interval, as in any two-phase-commit sink.

    python benchmarks/latency.py [--parallelism 1 2] [--seconds 30] [--load 0.5]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid
from collections import Counter
from typing import Any

from _common import start_ray

import rayflow as rf

KEYS = 1_000
BUCKETS_PER_S = 100_000  # 10 µs buckets


class LatencySink(rf.sinks.Sink):
    """Counts each record's ``time.time() - source time`` into 10 µs buckets.

    Records generated in the first ``warmup`` seconds after the first one a
    writer sees are left out; each writer writes its histogram at close.
    """

    def __init__(self, folder: str, warmup: float):
        self.folder = folder
        self.warmup = warmup

    def open(self, ctx: rf.sinks.SinkContext) -> rf.sinks.SinkWriter:
        path = os.path.join(self.folder, f"{ctx.partition}-{uuid.uuid4().hex}")
        return _LatencyWriter(path, self.warmup)


class _LatencyWriter(rf.sinks.SinkWriter):
    def __init__(self, path: str, warmup: float):
        self.path = path
        self.warmup = warmup
        self.after: float | None = None
        self.seen = 0
        self.buckets: Counter[int] = Counter()

    def write(self, items: list[Any]) -> None:
        now = time.time()
        self.seen += len(items)
        if self.after is None:
            self.after = items[0][1][1] + self.warmup
        after = self.after
        self.buckets.update(int((now - ts) * BUCKETS_PER_S) for _, (_, ts) in items if ts >= after)

    def close(self) -> None:
        with open(self.path, "w") as f:
            json.dump({"seen": self.seen, "buckets": list(self.buckets.items())}, f)


def record(partition: int, offset: int) -> tuple[int, int, float]:
    return offset % KEYS, 1, time.time()


def running_sum(state: int | None, rec: tuple[int, int, float]) -> tuple[int, list[Any]]:
    total = (state or 0) + rec[1]
    return total, [(total, rec[2])]


def flow(
    parallelism: int, rate: float | None, limit: int, folder: str, warmup: float = 0.0
) -> rf.Dataflow:
    f = rf.Dataflow(f"latency-{uuid.uuid4().hex[:6]}", parallelism=parallelism)
    src = f.source(
        "events",
        rf.sources.Generator(record, partitions=parallelism, rate=rate, limit=limit),
    )
    src.key_by("by_key", lambda r: r[0]).stateful_map("sum", running_sum).sink(
        "latency", LatencySink(folder, warmup)
    )
    return f


def checkpointing(interval: float) -> rf.Checkpointing | None:
    """Checkpoints every ``interval`` seconds into a fresh folder; 0 turns them off."""
    if not interval:
        return None
    return rf.Checkpointing(storage=tempfile.mkdtemp(prefix="rf-latency-cp-"), interval_s=interval)


def max_rate(parallelism: int, records: int, interval: float) -> float:
    folder = tempfile.mkdtemp(prefix="rf-latency-")
    result = rf.run(
        flow(parallelism, None, records // parallelism, folder), checkpoint=checkpointing(interval)
    )
    assert result.running_at is not None
    return records / (result.ended_at - result.running_at)


def percentile(histogram: list[tuple[int, int]], total: int, q: float) -> float:
    """The latency (s) below which a fraction ``q`` of the records fall."""
    rank, seen = q * total, 0
    for bucket, count in histogram:
        seen += count
        if seen >= rank:
            return (bucket + 1) / BUCKETS_PER_S
    return (histogram[-1][0] + 1) / BUCKETS_PER_S


def measure(
    parallelism: int, rate: float, seconds: float, warmup: float, interval: float
) -> dict[str, Any]:
    folder = tempfile.mkdtemp(prefix="rf-latency-")
    limit = int(rate * seconds / parallelism)
    result = rf.run(
        flow(parallelism, rate, limit, folder, warmup), checkpoint=checkpointing(interval)
    )
    seen, merged = 0, Counter[int]()
    for name in os.listdir(folder):
        with open(os.path.join(folder, name)) as f:
            part = json.load(f)
        seen += part["seen"]
        merged.update({int(b): int(c) for b, c in part["buckets"]})
    if seen != limit * parallelism:
        raise SystemExit(f"the sink saw {seen:,} records, not {limit * parallelism:,}")
    histogram = sorted(merged.items())
    total = sum(merged.values())
    completed = result.checkpoints["completed"] if result.checkpoints else 0
    return {
        "records": total,
        "p50": percentile(histogram, total, 0.50),
        "p99": percentile(histogram, total, 0.99),
        "p999": percentile(histogram, total, 0.999),
        "max": (histogram[-1][0] + 1) / BUCKETS_PER_S,
        "mean": sum((b + 0.5) * c for b, c in histogram) / total / BUCKETS_PER_S,
        "checkpoints": completed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parallelism", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--load", type=float, default=0.5, help="fraction of the maximum rate")
    parser.add_argument("--max-records", type=int, default=3_000_000)
    parser.add_argument("--checkpoint-interval", type=float, default=1.0, help="0: off")
    args = parser.parse_args()
    start_ray()
    for p in args.parallelism:
        top = max_rate(p, args.max_records, args.checkpoint_interval)
        rate = top * args.load
        r = measure(p, rate, args.seconds, args.warmup, args.checkpoint_interval)
        ms = {k: r[k] * 1000 for k in ("p50", "p99", "p999", "max", "mean")}
        print(
            f"parallelism {p}: maximum {top:,.0f} rec/s; at {args.load:.0%} ({rate:,.0f} rec/s, "
            f"{r['records']:,} records after {args.warmup:.0f} s warm-up, "
            f"{r['checkpoints']} checkpoints): p50 {ms['p50']:.1f} ms, p99 {ms['p99']:.1f} ms, "
            f"p99.9 {ms['p999']:.1f} ms, max {ms['max']:.1f} ms, mean {ms['mean']:.1f} ms "
            f"(target p99 < 50 ms)",
            flush=True,
        )


if __name__ == "__main__":
    main()
