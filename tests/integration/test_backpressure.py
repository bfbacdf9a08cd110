"""A slow sink throttles a fast source; every mailbox stays within its bound."""

from __future__ import annotations

import time
from typing import Any

import rayflow as rf

BATCH = 200
SINK_SECONDS_PER_BATCH = 0.02  # the sink takes ~10,000 records/s at most


class SlowSink(rf.sinks.Sink):
    def open(self, ctx: rf.sinks.SinkContext) -> rf.sinks.SinkWriter:
        return _SlowWriter()


class _SlowWriter(rf.sinks.SinkWriter):
    def write(self, items: list[Any]) -> None:
        time.sleep(SINK_SECONDS_PER_BATCH * len(items) / BATCH)


def test_slow_sink_throttles_the_source_and_memory_stays_flat() -> None:
    config = rf.RuntimeConfig(
        batch_size=BATCH, mailbox_batches=4, mailbox_bytes=1 << 20, linger_s=0.01
    )
    flow = rf.Dataflow("throttled")
    src = flow.source("fast", rf.sources.Generator(lambda p, i: ("k" * 20, i), partitions=1))
    # A different parallelism puts the sink in its own actors, behind a channel.
    parsed = src.map("tag", lambda r: r[1], parallelism=2)
    parsed.sink("slow", SlowSink(), parallelism=2)
    handle = rf.start(flow, runtime=config)
    samples: list[dict[str, Any]] = []
    try:
        start = time.monotonic()
        while time.monotonic() - start < 12:
            time.sleep(0.5)
            m = handle.metrics()
            samples.append({"t": time.monotonic() - start, **{k: v for k, v in m.items()}})
    finally:
        result = handle.stop()

    # 1. No mailbox ever held more than its bound, in batches or bytes.
    for sample in samples:
        for step in ("tag",):
            for e in sample[step]:
                assert e["mailbox_peak_depth"] <= e["mailbox_capacity_batches"] == 4
                assert e["mailbox_peak_bytes"] <= e["mailbox_capacity_bytes"]

    # 2. The source emits at the sink's pace, not at its own.
    late = samples[len(samples) // 2 :]
    for sample in late:
        source_rate = sum(e["records_out_per_s"] for e in sample["fast"])
        sink_rate = sum(e["records_in_per_s"] for e in sample["slow"])
        assert source_rate < 2 * (BATCH / SINK_SECONDS_PER_BATCH) * 1.3
        assert abs(source_rate - sink_rate) < 0.25 * sink_rate, (source_rate, sink_rate)
        assert sum(e["backpressured_ms_per_s"] for e in sample["fast"]) > 500
    # Everything emitted but not yet consumed fits in the buffers along the way:
    # two mailboxes of 4 batches, batches in flight and output buffers.
    for sample in samples:
        emitted = sum(e["records_out"] for e in sample["fast"])
        consumed = sum(e["records_in"] for e in sample["slow"])
        assert emitted - consumed <= 2 * (4 + 2) * BATCH + 2 * BATCH

    # 3. Memory does not grow with the number of records.
    first, last = samples[2], samples[-1]
    records_first = sum(e["records_in"] for e in first["slow"])
    records_last = sum(e["records_in"] for e in last["slow"])
    assert records_last > 2 * records_first
    for step in ("fast", "tag"):
        for e_first, e_last in zip(first[step], last[step], strict=True):
            assert e_last["rss_bytes"] - e_first["rss_bytes"] < 20 * 2**20, step
    assert result.records_in("slow") == result.records_out("fast")
