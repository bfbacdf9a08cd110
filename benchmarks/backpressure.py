"""A fast source into a slow sink for 60 s: memory and mailboxes must stay flat.

Every 5 s it prints the records that went through, the source and sink
rates, the peak mailbox bytes against the bound, and the resident memory of
every operator process and of the driver. At the end it prints how much
each process grew between the first and the last report while the number
of records multiplied.

    python benchmarks/backpressure.py [--seconds 60]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import psutil
from _common import start_ray

import rayflow as rf

BATCH = 500


class SlowSink(rf.sinks.Sink):
    """Sleeps 10 ms per 500 records: about 50,000 records/s per partition."""

    def open(self, ctx: rf.sinks.SinkContext) -> rf.sinks.SinkWriter:
        return _SlowWriter()


class _SlowWriter(rf.sinks.SinkWriter):
    def write(self, items: list[Any]) -> None:
        time.sleep(0.01 * len(items) / BATCH)


def main() -> None:
    parser = argparse.ArgumentParser(description="backpressure and memory over time")
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    start_ray()
    config = rf.RuntimeConfig(batch_size=BATCH, mailbox_batches=8, mailbox_bytes=4 << 20)
    flow = rf.Dataflow("backpressure")
    src = flow.source(
        "fast", rf.sources.Generator(lambda p, i: {"id": i, "payload": "x" * 100}, partitions=1)
    )
    src.map("enrich", lambda e: {**e, "len": len(e["payload"])}, parallelism=2).sink(
        "slow", SlowSink(), parallelism=2
    )
    handle = rf.start(flow, runtime=config)
    driver = psutil.Process(os.getpid())
    rows = []
    print(
        f"{'t':>5} {'records':>11} {'source/s':>10} {'sink/s':>10} "
        f"{'peak mailbox':>16} {'operator RSS MB':>24} {'driver MB':>9}"
    )
    try:
        start = time.monotonic()
        next_report = 5.0
        while (elapsed := time.monotonic() - start) < args.seconds:
            time.sleep(max(0.0, min(next_report - elapsed, 1.0)))
            if time.monotonic() - start < next_report:
                continue
            next_report += 5.0
            m = handle.metrics()
            records = sum(e["records_in"] for e in m["slow"])
            src_rate = sum(e["records_out_per_s"] for e in m["fast"])
            sink_rate = sum(e["records_in_per_s"] for e in m["slow"])
            peak = max(e["mailbox_peak_bytes"] for e in m["enrich"])
            cap = m["enrich"][0]["mailbox_capacity_bytes"]
            rss = {e["actor"]: e["rss_bytes"] >> 20 for s in m.values() for e in s}
            drv = driver.memory_info().rss >> 20
            rows.append((records, rss, drv))
            print(
                f"{time.monotonic() - start:5.0f} {records:11,d} {src_rate:10,.0f} "
                f"{sink_rate:10,.0f} {peak / 2**20:6.2f}/{cap / 2**20:.0f} MiB "
                f"{' '.join(str(v) for v in rss.values()):>24} {drv:9d}"
            )
    finally:
        result = handle.stop()
    if len(rows) >= 2:
        (r0, rss0, d0), (r1, rss1, d1) = rows[0], rows[-1]
        growth = {a.split("/", 2)[2]: rss1[a] - rss0[a] for a in rss0 if a in rss1}
        print(
            f"records x{r1 / max(r0, 1):.1f} between the first and last report; "
            f"RSS growth MB per actor: {growth}; driver {d1 - d0:+d} MB"
        )
    print(
        f"drained on stop: sink took {result.records_in('slow'):,} of "
        f"{result.records_out('fast'):,} emitted"
    )


if __name__ == "__main__":
    main()
