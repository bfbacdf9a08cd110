"""Tumbling 1-minute event-time count per key: 1,000,000 timestamped events, 1,000 keys.

The input is the peers comparison's ``windows`` workload (peers/workloads.py,
``window_event``): about 67 minutes of event time, one event in ten up to 3 s
late, a watermark 5 s behind the highest timestamp, partitioned by key. The
job is ``source -> with_event_time -> key_by -> window(Tumbling(60), Count())``
into a sink that keeps the results; they are checked against the baseline's.

Prints records per second of rayflow at parallelism 1 and 2 and of the
baseline, a one-process Python loop doing the same windowing (watermark,
windows fired as it passes their end) over the same events, prebuilt in a
list, in the same run; and their ratio. rayflow's rate is measured from the
moment every operator runs to the job's end (end of input drained and every
window fired and committed); the time to deploy the actors is printed apart.

    python benchmarks/windows.py [--events N] [--repeat R]

With ``--batch-bytes B1 B2 ...`` it runs instead parallelism 2 with each
``RuntimeConfig(batch_bytes=...)`` in turn, ``--repeat`` rounds alternated,
and prints each one's rates and median (batches over Ray's 100 KiB limit for
inline arguments go through the object store).

With ``--combine`` it runs instead, alternated, the same job and one whose
window has ``combine=True`` (each batch counted per key and minute before
the shuffle, Flink's local-global aggregation), at parallelism 2 and 1, and
prints both rates and their ratio. Its results are checked against the
plain job's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers"))

import workloads as w
from _common import start_ray

import rayflow as rf


class KeepResults(rf.sinks.Sink):
    """Keeps every window result; on commit writes them to a JSON file (to check them)."""

    def __init__(self, folder: str):
        self.folder = folder

    def open(self, ctx: rf.sinks.SinkContext) -> rf.sinks.SinkWriter:
        return _KeepWriter(os.path.join(self.folder, f"{ctx.partition}.json"))


class _KeepWriter(rf.sinks.SinkWriter):
    def __init__(self, path: str):
        self.path = path
        self.results: list[Any] = []

    def write(self, items: list[Any]) -> None:
        self.results.extend((key, r.start, r.end, r.value) for key, r in items)

    def prepare_commit(self, checkpoint_id: int) -> Any:
        return list(self.results)

    def commit(self, committable: Any) -> None:
        with open(self.path, "w") as f:
            json.dump(committable, f)


def pure_python(events: list[tuple[str, float]]) -> tuple[float, dict[tuple[str, int], int]]:
    start = time.perf_counter()
    tally = w.tumbling_counts(events, keep=True)
    assert tally.results is not None
    return len(events) / (time.perf_counter() - start), tally.results


def timestamped_events(flow: rf.Dataflow, n: int, parallelism: int) -> rf.Stream:
    """The workload's events, partitioned by key, with a watermark MAX_DELAY_S behind."""
    return flow.source(
        "events",
        rf.sources.Generator(
            lambda p, i, parts=parallelism: w.window_event(w.window_index(p, i, parts)),
            partitions=parallelism,
            limit=n // parallelism,
        ),
    ).with_event_time("ts", lambda e: e[1], max_delay_s=w.MAX_DELAY_S)


def rayflow_run(
    n: int, parallelism: int, runtime: rf.RuntimeConfig | None = None
) -> tuple[float, float, dict[tuple[str, int], int]]:
    folder = tempfile.mkdtemp(prefix="rf-windows-")
    flow = rf.Dataflow(f"windows-p{parallelism}", parallelism=parallelism)
    events = timestamped_events(flow, n, parallelism)
    counts = events.key_by("by_key", lambda e: e[0]).window(
        "per_min", rf.windows.Tumbling(float(w.WINDOW_S)), rf.windows.Count()
    )
    counts.sink("results", KeepResults(folder))
    t0 = time.time()
    result = rf.run(flow, runtime=runtime)
    assert result.running_at is not None
    steady = n / (result.ended_at - result.running_at)
    deploy = result.running_at - t0
    found: dict[tuple[str, int], int] = {}
    for name in os.listdir(folder):
        with open(os.path.join(folder, name)) as f:
            for key, start, end, count in json.load(f):
                if end - start != w.WINDOW_S or (key, int(start)) in found:
                    raise SystemExit(f"bad window result {(key, start, end, count)}")
                found[key, int(start)] = count
    return steady, deploy, found


def combined_run(n: int, parallelism: int) -> tuple[float, dict[tuple[str, int], int], float]:
    """The job with ``combine=True``: counted per key and minute before the shuffle."""
    folder = tempfile.mkdtemp(prefix="rf-windows-")
    flow = rf.Dataflow(f"windows-combined-p{parallelism}", parallelism=parallelism)
    events = timestamped_events(flow, n, parallelism)
    counts = events.key_by("by_key", lambda e: e[0]).window(
        "per_min", rf.windows.Tumbling(float(w.WINDOW_S)), rf.windows.Count(), combine=True
    )
    counts.sink("results", KeepResults(folder))
    result = rf.run(flow)
    assert result.running_at is not None
    if sum(m["records_in"] for m in result.metrics["per_min"]) != n:
        raise SystemExit("the window step did not count every event")
    crossed = sum(m.get("partials_in") or 0 for m in result.metrics["per_min"]) / n
    found: dict[tuple[str, int], int] = {}
    for name in os.listdir(folder):
        with open(os.path.join(folder, name)) as f:
            for key, start, _end, count in json.load(f):
                found[key, int(start)] = count
    return n / (result.ended_at - result.running_at), found, crossed


def compare_combine(n: int, repeat: int) -> None:
    start_ray()
    for parallelism in (2, 1):
        plain: list[float] = []
        combined: list[float] = []
        crossed: list[float] = []
        for _ in range(repeat):
            steady, _, expected = rayflow_run(n, parallelism)
            plain.append(steady)
            steady, found, share = combined_run(n, parallelism)
            crossed.append(share)
            if found != expected:
                raise SystemExit(f"combined results differ at parallelism {parallelism}")
            combined.append(steady)
        a, b = statistics.median(plain), statistics.median(combined)
        print(
            f"parallelism {parallelism}: window {a:,.0f} records/s, with combine=True "
            f"{b:,.0f} ({b / a:.2f}x; medians of {repeat}, runs "
            f"{', '.join(f'{r:,.0f}' for r in plain)} / {', '.join(f'{r:,.0f}' for r in combined)})"
            f"; partials per event crossing the shuffle {statistics.median(crossed):.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description="tumbling event-time window count benchmark")
    parser.add_argument("--events", type=int, default=1_000_000, help="rounded down to 4k")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-bytes", type=int, nargs="+", default=None)
    parser.add_argument("--combine", action="store_true")
    args = parser.parse_args()
    n = args.events // 4 * 4  # the same events at parallelism 1 and 2 (window_event's keys)
    if args.combine:
        compare_combine(n, args.repeat)
        return
    if args.batch_bytes:
        start_ray()
        rates: dict[int, list[float]] = {b: [] for b in args.batch_bytes}
        for _ in range(args.repeat):
            for b in args.batch_bytes:
                rates[b].append(rayflow_run(n, 2, rf.RuntimeConfig(batch_bytes=b))[0])
        for b, values in rates.items():
            print(
                f"parallelism 2, batch_bytes={b:,}: median {statistics.median(values):,.0f} "
                f"records/s (runs {', '.join(f'{r:,.0f}' for r in values)})"
            )
        return
    events = [w.window_event(i) for i in range(n)]
    start_ray()

    baseline = max(pure_python(events)[0] for _ in range(args.repeat))
    expected = pure_python(events)[1]
    print(
        f"pure Python loop: {baseline:,.0f} records/s (best of {args.repeat}; "
        f"{len(expected):,} window results)"
    )
    for parallelism in (1, 2):
        runs = []
        for _ in range(args.repeat):
            steady, deploy, found = rayflow_run(n, parallelism)
            if found != expected:
                missing = len(expected.keys() - found.keys())
                wrong = sum(1 for k, v in found.items() if expected.get(k) != v)
                raise SystemExit(
                    f"wrong window results at parallelism {parallelism}: {len(found):,} results "
                    f"({missing:,} missing, {wrong:,} wrong or extra), expected {len(expected):,}"
                )
            runs.append((steady, deploy))
        best, deploy = max(runs)
        print(
            f"rayflow parallelism {parallelism}: {best:,.0f} records/s "
            f"(best of {args.repeat}; deploy {deploy:.1f} s, runs "
            f"{', '.join(f'{r:,.0f}' for r, _ in runs)}); "
            f"ratio to pure Python {best / baseline:.1%}; window results verified"
        )


if __name__ == "__main__":
    main()
