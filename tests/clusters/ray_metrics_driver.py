"""Run by test_ray_metrics.py against a head started for it: a job whose metrics the
test then scrapes from Ray's metrics export port.

``gen`` emits exactly ``PER_PARTITION`` records per partition and ends; the
``idle`` source never ends, so the job (and its coordinator, which publishes
the metrics) keeps running until the test writes a line to stdin. Prints one
JSON line once every record reached the sink, one when the job has stopped.

Usage: python ray_metrics_driver.py <gcs address> <repo root> <checkpoint dir>
"""

from __future__ import annotations

import json
import sys
import time

import ray

sys.path.insert(0, sys.argv[2])

import rayflow as rf

JOB = "metered"
PER_PARTITION = 5_000


def build() -> rf.Dataflow:
    flow = rf.Dataflow(JOB, parallelism=2)
    gen = flow.source(
        "gen",
        rf.sources.Generator(lambda p, i: (f"k{i % 50}", 1), partitions=2, limit=PER_PARTITION),
    )
    gen.key_by("by_key", lambda r: r[0]).reduce("count", lambda acc, r: acc + 1, initial=0).sink(
        "out", rf.testing.Discard()
    )
    idle = flow.source("idle", rf.sources.Generator(lambda p, i: i, partitions=2, rate=2.0))
    idle.filter("drop", lambda r: False).sink("nothing", rf.testing.Discard())
    return flow


def main() -> None:
    ray.init(address=sys.argv[1])
    handle = rf.start(build(), checkpoint=rf.Checkpointing(storage=sys.argv[3], interval_s=0.5))
    deadline = time.monotonic() + 60
    while sum(e["records_in"] for e in handle.metrics()["out"]) < 2 * PER_PARTITION:
        if time.monotonic() > deadline:
            raise SystemExit(f"the job did not deliver its records: {handle.metrics()}")
        time.sleep(0.2)
    print(json.dumps({"job": JOB, "records": 2 * PER_PARTITION}), flush=True)
    sys.stdin.readline()  # the test has scraped what it needed
    result = handle.stop(timeout=60)
    print(json.dumps({"status": result.status.value}), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
