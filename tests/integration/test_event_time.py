"""Event time on a real Ray: windows, late records, idle inputs, timers, dead letters.

Every windowed result is compared with a plain-Python reference computed
from the input, per key in the order the windows were emitted.
"""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import rayflow as rf
from rayflow import windows as W
from rayflow.sources import Source, SourceReader

KEYS = [f"u{i}" for i in range(7)]
T0 = 1_700_000_000.0


def _events(n: int, disorder_s: float, seed: int = 7) -> list[dict[str, Any]]:
    """``n`` clicks about 0.7 s apart, each up to ``disorder_s`` earlier than its place."""
    rng = random.Random(seed)
    return [
        {"user": rng.choice(KEYS), "ts": T0 + i * 0.7 - rng.uniform(0, disorder_s), "n": i % 10}
        for i in range(n)
    ]


def _per_key_in_order(out: dict[int, list[Any]]) -> dict[str, list[W.Result]]:
    """Each key's results, as each partition emitted them; windows only move forward."""
    per_key: dict[str, list[W.Result]] = defaultdict(list)
    for records in out.values():
        for key, result in records:
            assert isinstance(result, W.Result), result
            previous = per_key[key][-1] if per_key[key] else None
            assert previous is None or (result.end, result.start) > (previous.end, previous.start)
            per_key[key].append(result)
    return per_key


def _tumbling(events: list[dict[str, Any]], size: float, value: Any) -> dict[str, list[Any]]:
    groups: dict[str, dict[float, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for e in events:
        groups[e["user"]][math.floor(e["ts"] / size) * size].append(e)
    return {
        k: [W.Result(s, s + size, value(v)) for s, v in sorted(g.items())]
        for k, g in groups.items()
    }


def _sliding(events: list[dict[str, Any]], size: float, every: float) -> dict[str, list[Any]]:
    sums: dict[str, dict[float, int]] = defaultdict(lambda: defaultdict(int))
    for e in events:
        last = math.floor(e["ts"] / every) * every
        start = last
        while start > e["ts"] - size:
            sums[e["user"]][start] += e["n"]
            start -= every
    return {
        k: [W.Result(s, s + size, v) for s, v in sorted(g.items(), key=lambda x: x[0])]
        for k, g in sums.items()
    }


def _sessions(events: list[dict[str, Any]], gap: float) -> dict[str, list[Any]]:
    by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in sorted(events, key=lambda e: e["ts"]):
        by_key[e["user"]].append(e)
    out: dict[str, list[Any]] = {}
    for key, evs in by_key.items():
        sessions: list[list[dict[str, Any]]] = [[evs[0]]]
        for e in evs[1:]:
            if e["ts"] <= sessions[-1][-1]["ts"] + gap:
                sessions[-1].append(e)
            else:
                sessions.append([e])
        out[key] = [W.Result(s[0]["ts"], s[-1]["ts"] + gap, [e["n"] for e in s]) for s in sessions]
    return out


def test_windows_match_a_reference_on_out_of_order_input(tmp_path: Path) -> None:
    """Tumbling, sliding and session windows over shuffled input from two partitions,
    checkpointed as they go: each window once, equal to the reference, in order."""
    events = _events(3_000, disorder_s=20.0)
    flow = rf.Dataflow("windows", parallelism=2)
    clicks = flow.source("clicks", rf.testing.from_items(events, partitions=2)).with_event_time(
        "ts", lambda e: e["ts"], max_delay_s=30.0
    )
    per_user = clicks.key_by("user", lambda e: e["user"])
    per_user.window("count", W.Tumbling(60.0), W.Count()).sink("counts", rf.testing.Collect())
    per_user.window("sum", W.Sliding(120.0, every_s=60.0), W.Sum(lambda e: e["n"])).sink(
        "sums", rf.testing.Collect()
    )
    sessions = per_user.window("sessions", W.Session(gap_s=2.0), W.Collect())
    sessions.map(
        "ns", lambda kr: (kr[0], kr[1]._replace(value=[e["n"] for e in kr[1].value]))
    ).sink("sessions_out", rf.testing.Collect())
    result = rf.run(flow, checkpoint=rf.Checkpointing(storage=str(tmp_path / "cp"), interval_s=0.2))
    assert _per_key_in_order(result.output_partitions("counts")) == _tumbling(events, 60.0, len)
    assert _per_key_in_order(result.output_partitions("sums")) == _sliding(events, 120.0, 60.0)
    got = _per_key_in_order(result.output_partitions("sessions_out"))
    expected = _sessions(events, 2.0)
    assert {k: [(r.start, r.end) for r in v] for k, v in got.items()} == {
        k: [(r.start, r.end) for r in v] for k, v in expected.items()
    }
    assert got == expected  # Collect keeps a session's records in timestamp order
    assert result.records_out("count") == sum(len(v) for v in _tumbling(events, 60.0, len).values())


def _late_event(partition: int, i: int) -> dict[str, Any]:
    # 400 records a second apart (read over about a second), then one from the first window.
    ts = 1000.0 + 5 if i == 400 else 1000.0 + i
    return {"user": "a", "ts": ts, "i": i}


def test_late_records_go_to_late_unless_allowed_lateness_keeps_them() -> None:
    flow = rf.Dataflow("late", parallelism=1)
    clicks = flow.source(
        "clicks", rf.sources.Generator(_late_event, limit=401, rate=400)
    ).with_event_time("ts", lambda e: e["ts"], max_delay_s=2.0)
    per_user = clicks.key_by("user", lambda e: e["user"])
    strict = per_user.window("strict", W.Tumbling(10.0), W.Count())
    strict.sink("strict_out", rf.testing.Collect())
    strict.late.sink("late_out", rf.testing.Collect())
    per_user.window("lenient", W.Tumbling(10.0), W.Count(), allowed_lateness_s=1000.0).sink(
        "lenient_out", rf.testing.Collect()
    )
    result = rf.run(flow)
    strict_out = dict((r.start, r.value) for _, r in result.output("strict_out"))
    lenient_out = dict((r.start, r.value) for _, r in result.output("lenient_out"))
    assert strict_out[1000.0] == 10 and lenient_out[1000.0] == 11
    assert result.output("late_out") == [("a", {"user": "a", "ts": 1005.0, "i": 400})]
    assert sum(strict_out.values()) == 400 and sum(lenient_out.values()) == 401
    assert sum(m["records_late"] for m in result.metrics["strict"]) == 1


class _OneQuietPartition(Source):
    """Partition 0: a record every 10 ms of real time; partition 1: never anything."""

    def partitions(self) -> int:
        return 2

    def open(self, partition: int, offset: Any | None) -> SourceReader:
        return _Ticks(partition, int(offset or 0))


class _Ticks(SourceReader):
    def __init__(self, partition: int, offset: int):
        self.partition, self.next, self.started = partition, offset, time.monotonic()

    def read(self, max_items: int) -> list[Any] | None:
        if self.partition == 1:
            return []
        due = int((time.monotonic() - self.started) * 100)
        out = [("k", T0 + i * 0.01) for i in range(self.next, min(due, self.next + max_items))]
        self.next += len(out)
        return out

    def offset(self) -> int:
        return self.next


def test_an_idle_partition_stops_holding_back_the_watermark() -> None:
    """Windows fire while the job runs although one source partition never sends."""
    flow = rf.Dataflow("idle", parallelism=2)
    ticks = flow.source("ticks", _OneQuietPartition()).with_event_time(
        "ts", lambda r: r[1], idle_timeout_s=0.5
    )
    windows = ticks.key_by("key", lambda r: r[0]).window("per_s", W.Tumbling(1.0), W.Count())
    windows.sink("out", rf.testing.Collect())
    handle = rf.start(flow)
    fired = 0
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline and fired < 2:
            time.sleep(0.5)
            fired = sum(m["records_out"] for m in handle.metrics().get("per_s", []))
    finally:
        result = handle.stop()
    assert fired >= 2, "no window fired: the quiet partition held the watermark back"
    full = [r for _, r in result.output("out") if r.value == 100]
    assert len(full) >= 2  # whole seconds of ticks, counted once each


def _buckets(
    state: dict[float, int] | None, record: dict[str, Any], ctx: Any
) -> tuple[Any, list[Any]]:
    if record["n"] == 9:
        raise ValueError("nines are bad")
    state = dict(state or {})
    end = math.floor(ctx.timestamp / 60.0) * 60.0 + 60.0
    state[end] = state.get(end, 0) + 1
    ctx.set_timer(end)
    return state, []


def _emit_bucket(state: dict[float, int], ts: float, ctx: Any) -> tuple[Any, list[Any]]:
    count = state.pop(ts)
    return (state or None), [(ts - 60.0, count)]


def _add_n(acc: int, e: dict[str, Any]) -> int:
    if e["n"] == 9:
        raise ValueError("nines are bad")
    return acc + e["n"]


def test_process_timers_fire_on_the_watermark_and_bad_records_are_set_aside(
    tmp_path: Path,
) -> None:
    """A hand-written per-minute count with event-time timers equals tumbling windows;
    records the functions fail on are skipped (process) or dead-lettered (window)."""
    events = _events(2_000, disorder_s=10.0, seed=3)
    flow = rf.Dataflow("timers", parallelism=2)
    clicks = flow.source("clicks", rf.testing.from_items(events, partitions=2)).with_event_time(
        "ts", lambda e: e["ts"], max_delay_s=15.0
    )
    per_user = clicks.key_by("user", lambda e: e["user"])
    counted = per_user.process("minutes", _buckets, _emit_bucket, on_error="skip")
    counted.sink("out", rf.testing.Collect())
    per_user.window("sums", W.Tumbling(60.0), W.Fold(_add_n, 0), on_error="dead_letter").sink(
        "sums_out", rf.testing.Collect()
    )
    flow.dead_letters().sink("dead", rf.testing.Collect())
    result = rf.run(flow, checkpoint=rf.Checkpointing(storage=str(tmp_path / "cp"), interval_s=0.2))
    got: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for records in result.output_partitions("out").values():
        for key, (start, count) in records:
            got[key].append((start, count))
    good = [e for e in events if e["n"] != 9]
    expected = {k: [(r.start, r.value) for r in v] for k, v in _tumbling(good, 60.0, len).items()}
    assert dict(got) == expected  # per key, in order of the timers
    sums = _per_key_in_order(result.output_partitions("sums_out"))
    assert sums == _tumbling(good, 60.0, lambda es: sum(e["n"] for e in es))
    dead = result.output("dead")
    assert sorted(d.record[1]["ts"] for d in dead) == sorted(e["ts"] for e in events if e["n"] == 9)
    assert {d.step for d in dead} == {"sums"}
    failed = {step: sum(m["records_failed"] for m in ms) for step, ms in result.metrics.items()}
    assert failed["minutes"] == failed["sums"] == len(events) - len(good)


def _parse(line: str) -> int:
    return int(line)  # "x" fails


def test_bad_records_are_skipped_or_dead_lettered_and_counted() -> None:
    items = [str(i) if i % 50 else "x" for i in range(1000)]
    flow = rf.Dataflow("dead", parallelism=2)
    src = flow.source("lines", rf.testing.from_items(items, partitions=2))
    parsed = src.map("parse", _parse, on_error="dead_letter")
    parsed.key_by("mod", lambda n: n % 3).reduce(
        "sum", lambda a, n: a + 1 // (n % 7), initial=0, on_error="skip"
    ).sink("sums", rf.testing.Collect())
    flow.dead_letters().sink("dead", rf.testing.Collect())
    result = rf.run(flow)
    dead = result.output("dead")
    assert sorted(d.record for d in dead) == ["x"] * 20
    assert all(isinstance(d, rf.DeadLetter) and d.step == "parse" for d in dead)
    assert dead[0].error_type == "builtins.ValueError" and "invalid literal" in dead[0].message
    assert "_parse" in dead[0].traceback
    good = [int(x) for x in items if x != "x"]
    failing = [n for n in good if n % 7 == 0]  # 1 // 0 in the reduce: skipped
    final: dict[int, int] = {}
    for key, acc in result.output("sums"):
        final[key] = acc
    for key in range(3):
        assert final[key] == sum(1 // (n % 7) for n in good if n % 3 == key and n % 7)
    failed = {step: sum(m["records_failed"] for m in ms) for step, ms in result.metrics.items()}
    assert failed["parse"] == 20 and failed["sum"] == len(failing)


def _mostly_in_order(p: int, i: int) -> dict[str, Any]:
    """10 ms apart per partition; one in 50 is 100 s old: late once the job ran a while."""
    ts = 1000.0 + i * 0.01 - (100.0 if i % 50 == 49 else 0.0)
    return {"user": KEYS[(i * 3 + p) % len(KEYS)], "ts": ts, "n": i % 10, "id": (p, i)}


def test_combined_windows_count_each_record_once_and_leave_late_ones_to_late(
    tmp_path: Path,
) -> None:
    """combine=True over two senders: every record is in one window or in .late, never
    both; results match the reference over the records not late, per key in order."""
    per_partition = 8_000
    flow = rf.Dataflow("combined", parallelism=2)
    clicks = flow.source(
        "clicks",
        rf.sources.Generator(_mostly_in_order, partitions=2, limit=per_partition, rate=8_000),
    ).with_event_time("ts", lambda e: e["ts"], max_delay_s=0.5)
    per_user = clicks.key_by("user", lambda e: e["user"])
    counts = per_user.window("count", W.Tumbling(1.0), W.Count(), combine=True)
    counts.sink("counts", rf.testing.Collect())
    counts.late.sink("count_late", rf.testing.Collect())
    sums = per_user.window(
        "sum", W.Tumbling(1.0), W.Sum(lambda e: e["n"]), allowed_lateness_s=0.5, combine=True
    )
    sums.sink("sums", rf.testing.Collect())
    sums.late.sink("sum_late", rf.testing.Collect())
    result = rf.run(flow, checkpoint=rf.Checkpointing(storage=str(tmp_path / "cp"), interval_s=0.3))
    events = [_mostly_in_order(p, i) for p in range(2) for i in range(per_partition)]
    for window, late, value in (
        ("counts", "count_late", len),
        ("sums", "sum_late", lambda v: sum(e["n"] for e in v)),
    ):
        dropped = {r["id"] for _, r in result.output(late)}
        assert dropped, f"{late}: nothing was late; the test would not see the rule"
        kept = [e for e in events if e["id"] not in dropped]
        expected = _tumbling(kept, 1.0, value)
        assert _per_key_in_order(result.output_partitions(window)) == expected
    for step in ("count", "sum"):
        metrics = result.metrics[step]
        assert sum(m["records_in"] for m in metrics) == 2 * per_partition
        partials = sum(m["partials_in"] for m in metrics)
        assert 0 < partials < per_partition  # fewer items crossed than records
