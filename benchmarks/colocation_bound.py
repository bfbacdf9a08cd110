"""How fast parallelism 2 could be here at best: the keyed sum with an ideal shuffle.

    python benchmarks/colocation_bound.py                 # 4M records, medians of 3
    python benchmarks/colocation_bound.py --records 8000000 --repeat 5
    python benchmarks/colocation_bound.py --spin 100 --records 1000000   # heavier records

rayflow's keyed sum at parallelism 2 is slower than at 1 on this 2-core
machine (README, "How to read it"). The design that would cut the most of
its shuffle is Bytewax's: each process runs one source partition *and* one
keyed partition, so the records of its own keys never leave the process and
only the others are pickled and sent. This script measures that design with
none of rayflow's machinery (no credits, barriers, logs, metrics or sinks):
the bound a co-located rayflow could not beat.

The work is rayflow's keyed_sum benchmark: partition p of P makes records
``((i * P + p) % keys, 1)``, keys them with a Python function, routes each by
rayflow's key groups and adds it to a running sum per key. Variants, each run
``--repeat`` times in turn:

- ``loop``: one plain Python loop in this process;
- ``ray p=1``: one Ray actor doing all of it (rayflow at parallelism 1 fuses
  the same way: nothing is pickled);
- ``ray p=2``: two Ray actors, each making half the records; each keeps the
  records of its own key groups and sends the others to the other actor in
  pickled batches of ``--batch`` (at most 4 in flight), which adds them up;
- ``pipes p=2``: the same with two processes and an OS pipe between them
  (a thread in each receives), no Ray: the cheapest way Python has to move
  records between processes;
- ``rayflow p=1``, ``rayflow p=2``: rayflow itself (a ``Generator``, ``key_by``,
  ``reduce`` and a sink), from its operators running to its end, as
  benchmarks/keyed_sum.py measures it.

``--spin N`` adds N turns of an empty Python loop to the key function of
every variant (about 25 ns each here): with heavier records the work
parallelism 2 splits grows, while what it costs to move a record between
processes stays the same, so p=2 overtakes p=1 somewhere.

Prints records per second (medians) and each variant's ratio to ``ray p=1``.
Every variant's sums are checked against the loop's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import pickle
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from _common import start_ray
from keyed_sum import LatestPerKey

import rayflow as rf
from rayflow._internal.keygroups import KeyRouter
from rayflow._internal.pickling import dumps_fast

MAX_PARALLELISM = 128


def _records(p: int, parts: int, keys: int) -> Callable[[int], tuple[int, int]]:
    return lambda i: ((i * parts + p) % keys, 1)


Key = Callable[[tuple[int, int]], int]


def key_function(spin: int) -> Key:
    """Every variant's key function: a record's key, after ``spin`` turns of an empty
    loop (``--spin``, for heavier records)."""

    def key(record: tuple[int, int], spin: int = spin) -> int:
        for _ in range(spin):
            pass
        return record[0]

    return key


class _Partition:
    """One source partition and one keyed partition (of ``parts``) in one process."""

    def __init__(self, p: int, parts: int, keys: int, batch: int, key: Key):
        self.p, self.parts, self.keys, self.batch, self.key = p, parts, keys, batch, key
        self.sums: dict[int, int] = {}  # records of its own keys made here
        self.received: dict[int, int] = {}  # those the other partition sent
        self.router = KeyRouter(MAX_PARALLELISM, parts)

    def add(self, sums: dict[int, int], pairs: list[tuple[int, tuple[int, int]]]) -> None:
        get = sums.get
        for key, record in pairs:
            sums[key] = get(key, 0) + record[1]

    def batches(self, n: int) -> Any:
        """Each batch of this partition's ``n`` records, split by receiving partition."""
        make, key = _records(self.p, self.parts, self.keys), self.key
        cache, partition = self.router._cache, self.router.partition
        for start in range(0, n, self.batch):
            records = [make(i) for i in range(start, min(n, start + self.batch))]
            pairs = [(key(r), r) for r in records]
            out: list[list[tuple[int, tuple[int, int]]]] = [[] for _ in range(self.parts)]
            get = cache.get
            for kv in pairs:
                q = get(kv[0])
                if q is None:
                    q = partition(kv[0])
                out[q].append(kv)
            yield out

    def totals(self) -> dict[int, int]:
        both = dict(self.sums)
        for key, value in self.received.items():
            both[key] = both.get(key, 0) + value
        return both


def loop(n: int, keys: int, key: Key) -> dict[int, int]:
    sums: dict[int, int] = {}
    get = sums.get
    make = _records(0, 1, keys)
    for i in range(n):
        record = make(i)
        k = key(record)
        sums[k] = get(k, 0) + record[1]
    return sums


def rayflow_run(parts: int, n: int, keys: int, key: Key) -> tuple[float, dict[int, int]]:
    """rayflow's keyed sum (benchmarks/keyed_sum.py's flow, with this script's key function)."""
    folder = tempfile.mkdtemp(prefix="rf-bound-")
    flow = rf.Dataflow(f"bound-p{parts}", parallelism=parts)
    make = [_records(p, parts, keys) for p in range(parts)]
    src = flow.source(
        "numbers",
        rf.sources.Generator(lambda p, i: make[p](i), partitions=parts, limit=n // parts),
    )
    sums = src.key_by("by_key", key).reduce("sum", lambda acc, r: acc + r[1], initial=0)
    sums.sink("sums", LatestPerKey(folder))
    result = rf.run(flow)
    assert result.running_at is not None
    found: dict[int, int] = {}
    for name in os.listdir(folder):
        with open(os.path.join(folder, name)) as f:
            found.update({int(k): v for k, v in json.load(f)})
    return n / (result.ended_at - result.running_at), found


def _ray_actor() -> Any:
    import ray

    @ray.remote
    class RayPartition(_Partition):
        def connect(self, peer: Any) -> None:
            self.peer = peer

        async def push(self, data: bytes) -> None:
            self.add(self.received, pickle.loads(data))

        async def run(self, n: int) -> dict[int, int]:
            in_flight: list[Any] = []
            for out in self.batches(n):
                for q, pairs in enumerate(out):
                    if q == self.p:
                        self.add(self.sums, pairs)
                    elif pairs:
                        in_flight.append(self.peer.push.remote(dumps_fast(pairs)))
                if len(in_flight) > 4:
                    await in_flight.pop(0)
                await asyncio.sleep(0)  # let the other partition's batches in
            for ref in in_flight:
                await ref
            return self.sums

        def totals_(self) -> dict[int, int]:
            return self.totals()

    return RayPartition


def ray_run(parts: int, n: int, keys: int, batch: int, key: Key) -> tuple[float, dict[int, int]]:
    import ray

    cls = _ray_actor()
    actors = [cls.remote(p, parts, keys, batch, key) for p in range(parts)]
    ray.get([a.connect.remote(actors[(i + 1) % parts]) for i, a in enumerate(actors)])
    started = time.perf_counter()
    ray.get([a.run.remote(n // parts) for a in actors])
    seconds = time.perf_counter() - started
    sums: dict[int, int] = {}
    for part in ray.get([a.totals_.remote() for a in actors]):
        sums.update(part)
    for a in actors:
        ray.kill(a)
    return n / seconds, sums


def _pipe_partition(
    p: int, n: int, keys: int, batch: int, key: Key, conn: Any, results: Any, go: Any
) -> None:
    part = _Partition(p, 2, keys, batch, key)

    def receive() -> None:
        while True:
            data = conn.recv_bytes()
            if not data:
                return
            part.add(part.received, pickle.loads(data))

    receiver = threading.Thread(target=receive)
    receiver.start()
    results.put(("ready", p))
    go.wait()
    for out in part.batches(n):
        for q, pairs in enumerate(out):
            if q == p:
                part.add(part.sums, pairs)
            elif pairs:
                conn.send_bytes(dumps_fast(pairs))
    conn.send_bytes(b"")
    receiver.join()
    results.put(("done", part.totals()))


def pipes_run(n: int, keys: int, batch: int, key: Key) -> tuple[float, dict[int, int]]:
    ctx = mp.get_context("fork")
    a, b = ctx.Pipe()
    results, go = ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(target=_pipe_partition, args=(p, n // 2, keys, batch, key, conn, results, go))
        for p, conn in ((0, a), (1, b))
    ]
    for proc in procs:
        proc.start()
    # The clock starts once both processes are up (as the Ray variants' actors are).
    ready = [results.get() for _ in procs]
    assert all(kind == "ready" for kind, _ in ready)
    started = time.perf_counter()
    go.set()
    done = [results.get() for _ in procs]
    seconds = time.perf_counter() - started
    for proc in procs:
        proc.join()
    sums: dict[int, int] = {}
    for _, part in done:
        sums.update(part)
    return n / seconds, sums


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=4_000_000)
    parser.add_argument("--keys", type=int, default=1_000)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--spin", type=int, default=0, help="iterations of busy work per record (heavier records)"
    )
    args = parser.parse_args()
    n, keys, batch, key = args.records, args.keys, args.batch, key_function(args.spin)
    expected = loop(n, keys, key)
    start_ray()
    names = ["loop", "ray p=1", "ray p=2", "pipes p=2", "rayflow p=1", "rayflow p=2"]
    rates: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.repeat):
        started = time.perf_counter()
        loop(n, keys, key)
        rates["loop"].append(n / (time.perf_counter() - started))
        for name, run in (
            ("ray p=1", lambda: ray_run(1, n, keys, batch, key)),
            ("ray p=2", lambda: ray_run(2, n, keys, batch, key)),
            ("pipes p=2", lambda: pipes_run(n, keys, batch, key)),
            ("rayflow p=1", lambda: rayflow_run(1, n, keys, key)),
            ("rayflow p=2", lambda: rayflow_run(2, n, keys, key)),
        ):
            rate, sums = run()
            if sums != expected:
                raise SystemExit(f"{name}: wrong sums")
            rates[name].append(rate)
    base = statistics.median(rates["ray p=1"])
    print(
        f"keyed sum, {n:,} records over {keys:,} keys, {args.spin} spins per record, "
        f"medians of {args.repeat}:"
    )
    for name, values in rates.items():
        median = statistics.median(values)
        print(
            f"  {name:10s} {median / 1e6:5.2f}M records/s "
            f"({min(values) / 1e6:.2f}-{max(values) / 1e6:.2f})  {median / base:.2f}x ray p=1"
        )


if __name__ == "__main__":
    main()
