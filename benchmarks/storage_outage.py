"""Stop the S3 server under a running job for a while: does the job live through it?

Starts a local S3-compatible server (SeaweedFS ``weed mini`` on loopback,
``infra/local_s3.py``), runs a keyed count from a rate-limited generator with
checkpoints every second into S3 and exactly-once output into S3JsonLines,
stops the server for ``--outage`` seconds, starts it again, and prints:

- whether the job was RUNNING throughout and finished, and the restarts;
- records per second before the outage, during it, and after;
- the peak of uncommitted records (what a restart would replay) and of the
  sink's spilled bytes (staged on local disk while S3 is away);
- the seconds from the server's return to the next completed checkpoint.

It runs once with the default ``max_uncommitted_records`` and once with
``--bound`` (the sources pause at it).

    python benchmarks/storage_outage.py [--outage 120] [--rate 20000] [--bound 200000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "infra"))

import local_s3  # noqa: E402
from _common import start_ray  # noqa: E402

import rayflow as rf  # noqa: E402

BUCKET = "bench"


def count_flow(name: str, rate: float, seconds: float, prefix: str) -> rf.Dataflow:
    per_partition = int(rate * seconds / 2)
    flow = rf.Dataflow(name, parallelism=2)
    src = flow.source(
        "events",
        rf.sources.Generator(
            lambda p, i: (f"k{(i * 31 + p) % 1000}", 1), partitions=2, rate=rate,
            limit=per_partition,
        ),
    )  # fmt: skip
    src.key_by("key", lambda e: e[0]).reduce("count", lambda a, e: a + 1, initial=0).sink(
        "out", rf.sinks.S3JsonLines(f"s3://{BUCKET}/{prefix}/out")
    )
    return flow


def run(server: local_s3.LocalS3, args: argparse.Namespace, bound: int | None) -> dict[str, Any]:
    name = f"outage-{uuid.uuid4().hex[:6]}"
    total_s = args.before + args.outage + args.after
    flow = count_flow(name, args.rate, total_s, name)
    options: dict[str, Any] = {"storage": f"s3://{BUCKET}/{name}/cp", "interval_s": 1.0}
    if bound is not None:
        options["max_uncommitted_records"] = bound
    handle = rf.start(flow, checkpoint=rf.Checkpointing(**options))
    samples: list[dict[str, Any]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.5):
            try:
                m = handle.metrics()
                stats = handle.checkpoint_stats() or {}
                samples.append(
                    {
                        "t": time.monotonic(),
                        "status": handle.status().value,
                        "emitted": sum(e["records_out"] for e in m["events"]),
                        "uncommitted": sum(e.get("uncommitted_records", 0) for e in m["events"]),
                        "spilled": sum(e.get("spilled_bytes", 0) for e in m["out"]),
                        "completed": stats.get("completed", 0),
                    }
                )
            except Exception:
                pass

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    time.sleep(args.before)
    down = time.monotonic()
    server.stop()
    time.sleep(args.outage)
    server.start()
    up = time.monotonic()
    result = handle.wait(timeout=total_s + 600)
    stop.set()
    watcher.join(5)

    def rate_between(a: float, b: float) -> float:
        inside = [s for s in samples if a <= s["t"] <= b]
        if len(inside) < 2:
            return 0.0
        return (inside[-1]["emitted"] - inside[0]["emitted"]) / (inside[-1]["t"] - inside[0]["t"])

    during = [s for s in samples if down <= s["t"] <= up]
    completed_at_up = next((s["completed"] for s in samples if s["t"] >= up), 0)
    resumed = next(
        (s["t"] - up for s in samples if s["t"] >= up and s["completed"] > completed_at_up), None
    )
    return {
        "bound": bound,
        "status": result.status.value,
        "restarts": result.restarts,
        "running_throughout": {s["status"] for s in during} <= {"RUNNING"},
        "before": rate_between(down - args.before + 2, down),
        "during": rate_between(down, up),
        "after": rate_between(up, up + args.after),
        "peak_uncommitted": max((s["uncommitted"] for s in during), default=0),
        "peak_spilled": max((s["spilled"] for s in during), default=0),
        "checkpoint_after_s": resumed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="a job through an S3 outage")
    parser.add_argument("--outage", type=float, default=120.0)
    parser.add_argument("--before", type=float, default=10.0)
    parser.add_argument("--after", type=float, default=15.0)
    parser.add_argument("--rate", type=float, default=20_000)
    parser.add_argument("--bound", type=int, default=200_000)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="rf-bench-s3-")
    server = local_s3.LocalS3(os.path.join(folder, "s3"), port=local_s3.find_free_base())
    os.environ.update(server.env())
    os.environ.setdefault("RAYFLOW_S3_CONNECT_TIMEOUT", "2")
    os.environ.setdefault("RAYFLOW_S3_READ_TIMEOUT", "10")
    server.start()
    server.create_bucket(BUCKET)
    try:
        start_ray()
        rows = [run(server, args, None), run(server, args, args.bound)]
    finally:
        server.stop()
    print(f"S3 down for {args.outage:.0f} s under a job reading {args.rate:,.0f} records/s")
    print(
        f"{'max_uncommitted':>16} {'status':>9} {'restarts':>8} {'running':>8} "
        f"{'rec/s before':>12} {'during':>8} {'after':>8} {'peak uncommitted':>17} "
        f"{'peak spilled':>13} {'checkpoint after':>17}"
    )
    for r in rows:
        bound = f"{r['bound']:,}" if r["bound"] else "default (10M)"
        resumed = f"{r['checkpoint_after_s']:.1f} s" if r["checkpoint_after_s"] else "-"
        print(
            f"{bound:>16} {r['status']:>9} {r['restarts']:>8} {r['running_throughout']!s:>8} "
            f"{r['before']:>12,.0f} {r['during']:>8,.0f} {r['after']:>8,.0f} "
            f"{r['peak_uncommitted']:>17,} {r['peak_spilled'] / 2**20:>10.1f} MiB {resumed:>17}"
        )


if __name__ == "__main__":
    main()
