"""Numeric pipeline (issue 17): (sensor_id, value) readings -> scale + clip -> keyed
running sum over the sensors -> a sink that keeps each sensor's last sum.

In one run, records per second of:

- a single-process NumPy loop of the same work (the ceiling): per batch,
  scale + clip with NumPy, then the running sums with ``np.add.at``;
- rayflow, the scale + clip per record (``map``);
- rayflow, the scale + clip per batch (``map_batches`` with ``batch_format="numpy"``).

Every rayflow run's sums are checked against the NumPy loop's. rayflow's rate
counts from the moment every operator runs to the job's end (deploy apart), at
parallelism 1.

    python benchmarks/numeric.py [--records 2000000] [--sensors 10000] [--repeat 3]

What it does not have yet: the readings travel between actors as Python
records, and the keyed sum is per record (no columnar channels, no
vectorized keyed step), so map_batches saves only the per-record function calls
of the one step it replaces.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
from _common import start_ray
from keyed_sum import LatestPerKey

import rayflow as rf

SCALE, LOW, HIGH = 1.5, 0.0, 100.0


def reading(p: int, i: int, sensors: int, parts: int) -> tuple[int, float]:
    """A replayable reading: sensor and value are functions of the position only."""
    j = i * parts + p
    return j % sensors, float((j * 7919) % 1000) / 10.0


def numpy_loop(n: int, sensors: int, batch: int = 8192) -> tuple[float, np.ndarray]:
    """The same work in one process with NumPy (batches as rayflow's sources read them)."""
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
    t0 = time.time()
    result = rf.run(flow)
    assert result.running_at is not None
    found: dict[int, float] = {}
    for name in os.listdir(folder):
        with open(os.path.join(folder, name)) as f:
            found.update({int(k): v for k, v in json.load(f)})
    return n / (result.ended_at - result.running_at), result.running_at - t0, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=2_000_000)
    parser.add_argument("--sensors", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    n, sensors = args.records, args.sensors
    start_ray()
    loop = max(numpy_loop(n, sensors)[0] for _ in range(args.repeat))
    expected = numpy_loop(n, sensors)[1]
    print(f"NumPy loop, one process: {loop:,.0f} records/s (best of {args.repeat})")
    rates: dict[str, float] = {}
    for batches in (False, True):
        label = "map_batches (numpy)" if batches else "per-record map"
        runs: list[float] = []
        for _ in range(args.repeat):
            steady, _, found = rayflow_run(n, sensors, batches)
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
    print(
        f"map_batches / per-record: {batched / per_record:.2f}x (target >= 10x); "
        f"map_batches / NumPy loop: {batched / loop:.3f}x (target >= 0.5x)"
    )


if __name__ == "__main__":
    main()
