"""Keyed running sum: 1,000,000 records (key, 1) over 1,000 keys into reduce.

Prints records per second of rayflow at parallelism 1 and 2 and of a
pure-Python in-process loop doing the same sums in the same run, and their
ratio. rayflow's rate is measured from the moment every operator runs to
the job's end (end of input drained and committed); the time to deploy the
actors is printed apart.

With ``--recovery-overhead`` it runs instead with checkpoints every second,
``recovery="partial"`` (senders log what they send for partial recovery)
against ``"global"`` (no logs), alternated, and prints their ratio.

With ``--cpu`` it measures instead where the CPU goes: the CPU time each
operator actor process spends from the job running to its end, per record,
at parallelism 1 (one actor: source, key_by and the sum fused) and 2 (two
source actors that shuffle to two keyed actors), alternated, medians.

    python benchmarks/keyed_sum.py [--records N] [--keys K] [--repeat R] [--recovery-overhead]
    python benchmarks/keyed_sum.py --cpu --records 4000000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any

from _common import start_ray

import rayflow as rf


class LatestPerKey(rf.sinks.Sink):
    """Keeps each key's last sum; on commit writes them to a JSON file (to check them)."""

    def __init__(self, folder: str):
        self.folder = folder

    def open(self, ctx: rf.sinks.SinkContext) -> rf.sinks.SinkWriter:
        return _LatestWriter(os.path.join(self.folder, f"{ctx.partition}.json"))


class _LatestWriter(rf.sinks.SinkWriter):
    def __init__(self, path: str):
        self.path = path
        self.latest: dict[Any, Any] = {}

    def write(self, items: list[Any]) -> None:
        self.latest.update(items)

    def prepare_commit(self, checkpoint_id: int) -> Any:
        return dict(self.latest)

    def commit(self, committable: Any) -> None:
        with open(self.path, "w") as f:
            json.dump(list(committable.items()), f)


def pure_python(records: list[tuple[int, int]]) -> tuple[float, dict[int, int]]:
    start = time.perf_counter()
    sums: dict[int, int] = {}
    get = sums.get
    for key, value in records:
        sums[key] = get(key, 0) + value
    return len(records) / (time.perf_counter() - start), sums


def _flow(n: int, keys: int, parallelism: int, folder: str) -> rf.Dataflow:
    flow = rf.Dataflow(f"keyed-sum-p{parallelism}", parallelism=parallelism)
    src = flow.source(
        "numbers",
        rf.sources.Generator(
            lambda p, i, keys=keys, parts=parallelism: ((i * parts + p) % keys, 1),
            partitions=parallelism,
            limit=n // parallelism,
        ),
    )
    sums = src.key_by("by_key", lambda r: r[0]).reduce("sum", lambda acc, r: acc + r[1], initial=0)
    sums.sink("latest", LatestPerKey(folder))
    return flow


def cpu_per_record(n: int, keys: int, parallelism: int) -> dict[str, float]:
    """Microseconds of CPU per record each step's actors spent (summed over partitions),
    from the job running to its end (sampled every 20 ms until the actors are gone)."""
    import psutil
    import ray

    flow = _flow(n, keys, parallelism, tempfile.mkdtemp(prefix="rf-keyed-sum-"))
    handle = rf.start(flow)
    stages = ["numbers"] if parallelism == 1 else ["numbers", "sum"]
    procs: dict[str, list[Any]] = {}
    for stage in stages:
        for p in range(parallelism):
            actor = ray.get_actor(f"rayflow/{flow.name}/{stage}/{p}", namespace="rayflow")
            procs.setdefault(stage, []).append(psutil.Process(ray.get(actor.where.remote())["pid"]))
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    while True:
        alive = 0
        for proc in (x for group in procs.values() for x in group):
            try:
                used = sum(proc.cpu_times()[:2])
            except psutil.Error:
                continue
            alive += 1
            first.setdefault(proc.pid, used)
            last[proc.pid] = used
        if not alive:
            break
        time.sleep(0.02)
    handle.wait()
    return {
        stage: sum(last[x.pid] - first[x.pid] for x in group) / n * 1e6
        for stage, group in procs.items()
    }


def rayflow_run(
    n: int, keys: int, parallelism: int, recovery: str | None = None
) -> tuple[float, float, dict[int, int]]:
    folder = tempfile.mkdtemp(prefix="rf-keyed-sum-")
    flow = _flow(n, keys, parallelism, folder)
    t0 = time.time()
    checkpoint = None
    if recovery is not None:
        checkpoint = rf.Checkpointing(
            storage=tempfile.mkdtemp(prefix="rf-keyed-sum-cp-"), interval_s=1.0, recovery=recovery
        )
    result = rf.run(flow, checkpoint=checkpoint)
    assert result.running_at is not None
    steady = n / (result.ended_at - result.running_at)
    deploy = result.running_at - t0
    found: dict[int, int] = {}
    for name in os.listdir(folder):
        with open(os.path.join(folder, name)) as f:
            found.update({int(k): v for k, v in json.load(f)})
    return steady, deploy, found


def main() -> None:
    parser = argparse.ArgumentParser(description="keyed running sum benchmark")
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--recovery-overhead", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="CPU per record of each step's actors")
    args = parser.parse_args()
    n, keys = args.records, args.keys
    if args.cpu:
        start_ray()
        cpu_split(n, keys, args.repeat)
        return
    if args.recovery_overhead:
        start_ray()
        recovery_overhead(n, keys, args.repeat)
        return
    records = [(i % keys, 1) for i in range(n)]
    start_ray()

    baseline = max(pure_python(records)[0] for _ in range(args.repeat))
    expected = pure_python(records)[1]
    print(f"pure Python loop: {baseline:,.0f} records/s (best of {args.repeat})")
    for parallelism in (1, 2):
        runs = []
        for _ in range(args.repeat):
            steady, deploy, found = rayflow_run(n, keys, parallelism)
            if found != expected:
                raise SystemExit(f"wrong sums at parallelism {parallelism}")
            runs.append((steady, deploy))
        best, deploy = max(runs)
        print(
            f"rayflow parallelism {parallelism}: {best:,.0f} records/s "
            f"(best of {args.repeat}; deploy {deploy:.1f} s, runs "
            f"{', '.join(f'{r:,.0f}' for r, _ in runs)}); "
            f"ratio to pure Python {best / baseline:.1%}; sums verified"
        )


def cpu_split(n: int, keys: int, repeat: int) -> None:
    """Where the CPU goes at parallelism 1 and 2 (alternated runs, medians)."""
    runs: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    for _ in range(repeat):
        for parallelism in (1, 2):
            runs[parallelism].append(cpu_per_record(n, keys, parallelism))
    for parallelism, results in runs.items():
        per_stage = {s: statistics.median(r[s] for r in results) for s in results[0]}
        total = statistics.median(sum(r.values()) for r in results)
        parts = ", ".join(f"{s} {v:.2f}" for s, v in per_stage.items())
        print(
            f"parallelism {parallelism}: {total:.2f} us of CPU per record in the operator "
            f"actors ({parts}; median of {repeat})"
        )


def recovery_overhead(n: int, keys: int, repeat: int) -> None:
    """Checkpoints every 1 s: partial recovery's logs on against off, alternated."""
    for parallelism in (1, 2):
        rates: dict[str, list[float]] = {"partial": [], "global": []}
        for _ in range(repeat):
            for recovery in ("partial", "global"):
                rates[recovery].append(rayflow_run(n, keys, parallelism, recovery)[0])
        best = {r: max(v) for r, v in rates.items()}
        print(
            f"parallelism {parallelism}, checkpoints every 1 s: recovery=partial "
            f"{best['partial']:,.0f} rec/s, recovery=global {best['global']:,.0f} rec/s "
            f"(best of {repeat}); partial/global {best['partial'] / best['global']:.2f}x"
        )


if __name__ == "__main__":
    main()
