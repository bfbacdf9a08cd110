"""A slow keyed step behind a fast unbounded source: does the job stay responsive?

For a step that costs 2 ms per record (an enrichment lookup) and one that
costs 0.2 s per record, it measures, after a warm-up:

- how long the slow step's own actor takes to answer ``metrics`` (asked
  directly, by name, five times);
- how many records (and seconds of the slow step's work) are in flight
  between the source and the slow step;
- how long ``handle.checkpoint()`` takes;
- how long ``handle.stop()`` takes.

Every wait has a deadline (``--deadline``); a figure that hit it is printed
as ``>N s``. The same script runs against an older rayflow (set PYTHONPATH to
its checkout) to give the "before" column; options it does not know are
left out (``--mode``).

    python benchmarks/slow_operator.py [--mode aligned|unaligned|auto] [--warmup 5]
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import tempfile
import time
from typing import Any

import ray
from _common import start_ray

import rayflow as rf

SLOW_STEP = "enrich"


def event(partition: int, offset: int) -> tuple[str, int]:
    return f"user{offset % 100}", offset


def slow_fn(delay: float) -> Any:
    def enrich(state: int | None, record: tuple[str, int]) -> tuple[int, list[Any]]:
        time.sleep(delay)
        return (state or 0) + 1, [record[1]]

    return enrich


def checkpointing(storage: str, mode: str) -> rf.Checkpointing:
    """Checkpoints on demand only; the unaligned options if this rayflow has them."""
    params = inspect.signature(rf.Checkpointing).parameters
    options: dict[str, Any] = {"storage": storage, "interval_s": 3600.0, "timeout_s": 600.0}
    if mode == "unaligned" and "unaligned" in params:
        options["unaligned"] = True
    if mode == "auto" and "aligned_timeout_s" in params:
        options["aligned_timeout_s"] = 0.5
    return rf.Checkpointing(**options)


def timed(fn: Any, deadline: float) -> float | None:
    """Seconds ``fn`` took, or None if it did not finish within ``deadline``."""
    import concurrent.futures

    pool = concurrent.futures.ThreadPoolExecutor(1)
    started = time.monotonic()
    future = pool.submit(fn)
    try:
        future.result(timeout=deadline)
    except concurrent.futures.TimeoutError:
        pool.shutdown(wait=False)
        return None
    pool.shutdown(wait=False)
    return time.monotonic() - started


def show(seconds: float | None, deadline: float, unit: str = "s") -> str:
    if seconds is None:
        return f">{deadline:.0f} s"
    return f"{seconds * 1000:.0f} ms" if unit == "ms" else f"{seconds:.2f} s"


def run_case(delay: float, args: argparse.Namespace) -> dict[str, Any]:
    job = f"slow-{int(delay * 1000)}ms"
    flow = rf.Dataflow(job)
    src = flow.source("events", rf.sources.Generator(event, partitions=1))
    src.key_by("by_user", lambda e: e[0]).stateful_map(SLOW_STEP, slow_fn(delay)).sink(
        "out", rf.testing.Discard()
    )
    storage = tempfile.mkdtemp(prefix="rf-slow-")
    handle = rf.start(flow, checkpoint=checkpointing(storage, args.mode))
    time.sleep(args.warmup)
    actor = ray.get_actor(f"rayflow/{job}/{SLOW_STEP}/0", namespace="rayflow")
    answers: list[float | None] = []
    for _ in range(5):
        answers.append(timed(lambda: ray.get(actor.metrics.remote()), args.deadline))
        if answers[-1] is None:
            break  # it does not answer: asking again would only wait again
        time.sleep(0.2)
    metrics = handle.metrics()
    emitted = sum(e["records_out"] for e in metrics.get("by_user", metrics.get("events", [])))
    consumed = sum(e["records_in"] for e in metrics.get(SLOW_STEP, []))
    in_flight = max(0, emitted - consumed)
    checkpoint = timed(lambda: handle.checkpoint(timeout=args.deadline), args.deadline)
    stop = timed(lambda: handle.stop(timeout=args.deadline), args.deadline)
    answered = [a for a in answers if a is not None]
    return {
        "delay": delay,
        "metrics_median": statistics.median(answered) if len(answered) == len(answers) else None,
        "metrics_max": max(answered) if len(answered) == len(answers) else None,
        "in_flight_records": in_flight,
        "in_flight_s": in_flight * delay,
        "checkpoint": checkpoint,
        "stop": stop,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="responsiveness with a slow step")
    parser.add_argument("--mode", choices=["aligned", "unaligned", "auto"], default="aligned")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--deadline", type=float, default=60.0)
    parser.add_argument("--delays", default="0.002,0.2")
    args = parser.parse_args()
    d = args.deadline
    print(f"rayflow {getattr(rf, '__version__', '?')} from {rf.__file__}, mode {args.mode}")
    print(
        f"{'step cost':>10} {'metrics p50':>12} {'metrics max':>12} {'in flight':>22} "
        f"{'checkpoint':>11} {'stop':>9}",
        flush=True,
    )
    for delay in [float(x) for x in args.delays.split(",")]:
        start_ray()
        r = run_case(delay, args)
        flight = f"{r['in_flight_records']:,} rec = {r['in_flight_s']:.1f} s"
        print(
            f"{r['delay'] * 1000:>8.0f}ms {show(r['metrics_median'], d, 'ms'):>12} "
            f"{show(r['metrics_max'], d, 'ms'):>12} {flight:>22} "
            f"{show(r['checkpoint'], d):>11} {show(r['stop'], d):>9}",
            flush=True,
        )
        if r["stop"] is None:
            break  # the job is still draining; a new Ray here would share the machine with it
        ray.shutdown()
    # Calls that hit their deadline may still wait in threads: leave without them.
    os._exit(0)


if __name__ == "__main__":
    main()
