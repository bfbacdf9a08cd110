"""Numeric pipeline (issue 17): (sensor_id, value) readings -> scale + clip -> keyed
running sum over the sensors -> a sink that keeps each sensor's last sum.

In one run, records per second of:

- a single-process NumPy loop of the same work (the ceiling): per chunk, make
  the readings, scale + clip, each reading's running sum and each sensor's
  latest sum (and, for reference, a loop doing less: totals only);
- rayflow, the scale + clip per record (``map``), ``reduce`` per record;
- rayflow, the scale + clip per batch (``map_batches`` with ``batch_format="numpy"``)
  on records (a per-record source, a per-record ``reduce``);
- rayflow columnar: a ``Generator(batch_fn=...)`` that makes the readings as
  NumPy columns, ``map_batches`` on them, ``key_by("sensor")`` and ``sum`` on
  the columns, and a sink with ``batch_format="numpy"``: no reading is ever a
  Python object.

Every rayflow run's sums are checked against the NumPy loop's. rayflow's rate
counts from the moment every operator runs to the job's end (deploy apart), at
parallelism 1 (``--parallelism`` for more).

    python benchmarks/numeric.py [--records 20000000] [--sensors 10000] [--repeat 3]
                                 [--parallelism 1]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any

import numpy as np
from _common import start_ray
from keyed_sum import LatestPerKey

import rayflow as rf

SCALE, LOW, HIGH = 1.5, 0.0, 100.0
#: Rows per chunk of the columnar source.
ROWS_PER_BATCH = 262_144


def reading(p: int, i: int, sensors: int, parts: int) -> tuple[int, float]:
    """A replayable reading: sensor and value are functions of the position only."""
    j = i * parts + p
    return j % sensors, float((j * 7919) % 1000) / 10.0


def numpy_loop(n: int, sensors: int, batch: int = ROWS_PER_BATCH) -> tuple[float, np.ndarray]:
    """The same work in one process with NumPy, chunk by chunk as the columnar run
    cuts them: make the readings, scale + clip, each reading's running sum for its
    sensor (what ``sum`` emits: rows grouped by a stable radix sort, one ``cumsum``
    with each sensor's carry), and each sensor's latest sum (what the sink keeps)."""
    start = time.perf_counter()
    sums = np.zeros(sensors)
    latest = np.zeros(sensors)
    small = sensors <= 1 << 16
    for lo in range(0, n, batch):
        chunk = scale_columns(reading_columns(0, lo, min(batch, n - lo), sensors, 1))
        ids, values = chunk["sensor"], chunk["value"]
        order = np.argsort(ids.astype(np.uint16) if small else ids, kind="stable")
        ranked_ids, ranked = ids[order], values[order]
        starts = np.flatnonzero(np.r_[True, ranked_ids[1:] != ranked_ids[:-1]])
        group = ranked_ids[starts]
        before, after = sums[group], sums[group] + np.add.reduceat(ranked, starts)
        steps = ranked.copy()
        steps[starts] += before
        steps[starts[1:]] -= after[:-1]
        running = np.empty_like(steps)
        running[order] = np.cumsum(steps)
        sums[group] = after
        ends = np.r_[starts[1:], len(order)] - 1
        latest[group] = running[order[ends]]
    return n / (time.perf_counter() - start), latest


def totals_loop(n: int, sensors: int, batch: int = ROWS_PER_BATCH) -> tuple[float, np.ndarray]:
    """Less than the same work, for reference: readings made up front, and only each
    sensor's total (``np.add.at``), no running sum per reading."""
    j = np.arange(n, dtype=np.int64)
    ids, values = j % sensors, ((j * 7919) % 1000).astype(np.float64) / 10.0
    start = time.perf_counter()
    sums = np.zeros(sensors)
    for lo in range(0, n, batch):
        v = np.clip(values[lo : lo + batch] * SCALE, LOW, HIGH)
        np.add.at(sums, ids[lo : lo + batch], v)
    return n / (time.perf_counter() - start), sums


def scale_one(r: tuple[int, float]) -> tuple[int, float]:
    return r[0], min(max(r[1] * SCALE, LOW), HIGH)


def scale_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # Records (sensor, value) arrive as the column "item" of pairs: split them.
    pairs = np.asarray(batch["item"])
    clipped = np.clip(pairs[:, 1] * SCALE, LOW, HIGH)
    return {"item": np.stack([pairs[:, 0], clipped], axis=1)}


def reading_columns(
    p: int, offset: int, count: int, sensors: int, parts: int
) -> dict[str, np.ndarray]:
    """``count`` readings from ``offset`` of partition ``p`` as columns (what ``reading`` gives)."""
    j = np.arange(offset, offset + count, dtype=np.int64) * parts + p
    return {"sensor": j % sensors, "value": ((j * 7919) % 1000).astype(np.float64) / 10.0}


def scale_columns(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"sensor": batch["sensor"], "value": np.clip(batch["value"] * SCALE, LOW, HIGH)}


class LatestColumns(rf.sinks.Sink):
    """Keeps each sensor's last sum from NumPy batches; on commit writes them as JSON."""

    batch_format = "numpy"

    def __init__(self, folder: str):
        self.folder = folder

    def open(self, ctx: rf.sinks.SinkContext) -> rf.sinks.SinkWriter:
        return _LatestColumnsWriter(os.path.join(self.folder, f"{ctx.partition}.json"))


class _LatestColumnsWriter(rf.sinks.SinkWriter):
    def __init__(self, path: str):
        self.path = path
        self.sums = np.zeros(0)
        self.seen = np.zeros(0, dtype=bool)

    def write(self, items: list[Any]) -> None:
        for batch in items:
            sensor, value = batch["sensor"], batch["value"]
            if len(sensor) == 0:
                continue
            size = int(sensor.max()) + 1
            if size > len(self.sums):  # sensors are small ints: arrays indexed by them
                self.sums = np.concatenate([self.sums, np.zeros(size - len(self.sums))])
                self.seen = np.concatenate([self.seen, np.zeros(size - len(self.seen), bool)])
            # The last row of each sensor holds its latest sum: np.maximum.at keeps each
            # sensor's highest row index (ufunc.at is defined for repeated indices).
            last = np.full(size, -1)
            np.maximum.at(last, sensor, np.arange(len(sensor)))
            present = np.flatnonzero(last >= 0)
            self.sums[present] = value[last[present]]
            self.seen[present] = True

    def prepare_commit(self, checkpoint_id: int) -> Any:
        present = np.flatnonzero(self.seen)
        return list(zip(present.tolist(), self.sums[present].tolist(), strict=True))

    def commit(self, committable: Any) -> None:
        with open(self.path, "w") as f:
            json.dump(committable, f)


def columnar_run(n: int, sensors: int, parallelism: int) -> tuple[float, float, dict[int, float]]:
    folder = tempfile.mkdtemp(prefix="rf-numeric-")
    flow = rf.Dataflow("numeric-columns", parallelism=parallelism)
    src = flow.source(
        "readings",
        rf.sources.Generator(
            batch_fn=lambda p, o, c, s=sensors, k=parallelism: reading_columns(p, o, c, s, k),
            partitions=parallelism,
            limit=n // parallelism,
            rows_per_batch=ROWS_PER_BATCH,
        ),
    )
    sums = (
        src.map_batches("scale", scale_columns, batch_format="numpy")
        .key_by("by_sensor", "sensor")
        .sum("sum", "value")
    )
    sums.sink("latest", LatestColumns(folder))
    return _run(flow, folder, n)


def _run(flow: rf.Dataflow, folder: str, n: int) -> tuple[float, float, dict[int, float]]:
    t0 = time.time()
    result = rf.run(flow)
    assert result.running_at is not None
    found: dict[int, float] = {}
    for name in os.listdir(folder):
        with open(os.path.join(folder, name)) as f:
            found.update({int(k): v for k, v in json.load(f)})
    return n / (result.ended_at - result.running_at), result.running_at - t0, found


def rayflow_run(n: int, sensors: int, batches: bool) -> tuple[float, float, dict[int, float]]:
    folder = tempfile.mkdtemp(prefix="rf-numeric-")
    flow = rf.Dataflow("numeric-batches" if batches else "numeric-records", parallelism=1)
    src = flow.source(
        "readings",
        rf.sources.Generator(lambda p, i, s=sensors: reading(p, i, s, 1), partitions=1, limit=n),
    )
    if batches:
        scaled = src.map_batches("scale", scale_batch, batch_format="numpy")
        scaled = scaled.map("pair", lambda r: (int(r[0]), float(r[1])))
    else:
        scaled = src.map("scale", scale_one)
    sums = scaled.key_by("by_sensor", lambda r: r[0]).reduce(
        "sum", lambda acc, r: acc + r[1], initial=0.0
    )
    sums.sink("latest", LatestPerKey(folder))
    return _run(flow, folder, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000_000)
    parser.add_argument("--sensors", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--parallelism", type=int, default=1, help="of the columnar run (the others run at 1)"
    )
    args = parser.parse_args()
    n, sensors = args.records, args.sensors
    start_ray()
    totals = max(totals_loop(n, sensors)[0] for _ in range(args.repeat))
    expected = totals_loop(n, sensors)[1]
    loops = [numpy_loop(n, sensors) for _ in range(args.repeat)]
    if not all(np.allclose(found, expected) for _, found in loops):
        raise SystemExit("NumPy loop: wrong sums")
    loop = max(rate for rate, _ in loops)
    print(f"NumPy loop, one process, same work: {loop:,.0f} records/s (best of {args.repeat})")
    print(f"NumPy totals only (np.add.at, readings made up front): {totals:,.0f} records/s")
    rates: dict[str, float] = {}
    for variant in ("records", "batches", "columns"):
        label = {
            "records": "per-record map",
            "batches": "map_batches (numpy)",
            "columns": "columnar (batch_fn, map_batches, key_by column, sum)",
        }[variant]
        runs: list[float] = []
        for _ in range(args.repeat):
            if variant == "columns":
                steady, _, found = columnar_run(n, sensors, args.parallelism)
            else:
                steady, _, found = rayflow_run(n, sensors, variant == "batches")
            got = np.array([found.get(s, 0.0) for s in range(sensors)])
            if not np.allclose(got, expected):
                raise SystemExit(f"{label}: wrong sums")
            runs.append(steady)
        rates[label] = max(runs)
        print(
            f"rayflow {label}: {rates[label]:,.0f} records/s (best of {args.repeat}: "
            f"{', '.join(f'{r:,.0f}' for r in runs)}); sums verified"
        )
    per_record, batched = rates["per-record map"], rates["map_batches (numpy)"]
    columnar = rates["columnar (batch_fn, map_batches, key_by column, sum)"]
    print(f"map_batches on records / per-record: {batched / per_record:.2f}x")
    print(
        f"columnar / per-record: {columnar / per_record:.2f}x (target >= 10x); "
        f"columnar / NumPy loop: {columnar / loop:.3f}x (target >= 0.5x); "
        f"columnar / totals only: {columnar / totals:.3f}x"
    )


if __name__ == "__main__":
    main()
