"""Recovery time: from killing one operator actor to the first record processed again.

A keyed count holds 10,000 (then 1,000,000) keys in one partition, with a
checkpoint every second. Once that state is in a checkpoint, the keyed
actor is killed with ``ray.kill``; the job restarts from the checkpoint
(a new actor for the dead one, the others reset in place) and the time
until the first record is processed again is measured, along with how long
the failure took to notice. Target: under 2 s for 10,000 keys.

    python benchmarks/recovery.py [--repeat R] [--keys 10000 1000000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid

import ray
from _common import start_ray

import rayflow as rf


def measure(keys: int) -> dict[str, float]:
    name = f"recovery-{uuid.uuid4().hex[:6]}"
    flow = rf.Dataflow(name)
    src = flow.source(
        "updates",
        rf.sources.Generator(lambda p, i, keys=keys: (i % keys, 1), rate=max(50_000, keys / 3)),
    )
    src.key_by("key", lambda r: r[0]).reduce("count", lambda acc, r: acc + r[1], initial=0).sink(
        "out", rf.testing.Discard()
    )
    config = rf.Checkpointing(storage=tempfile.mkdtemp(prefix="rf-recovery-"), interval_s=1.0)
    handle = rf.start(flow, checkpoint=config)
    try:
        while sum(e.get("state_keys", 0) for e in handle.metrics()["count"]) < keys:
            time.sleep(0.2)
        # Make sure the whole state is in a complete checkpoint.
        handle.checkpoint()
        state_bytes = (handle.checkpoint_stats() or {})["last"]["state_bytes"]
        victim = ray.get_actor(f"rayflow/{name}/count/0", namespace="rayflow")
        killed_at = time.time()
        ray.kill(victim)
        while True:
            recoveries = handle.recoveries()
            if recoveries and recoveries[-1]["recovered_in_s"] is not None:
                break
            time.sleep(0.02)
        record = recoveries[-1]
        first_record = record["detected_at"] + record["recovered_in_s"]
        return {
            "kill_to_first_record_s": first_record - killed_at,
            "kill_to_detected_s": record["detected_at"] - killed_at,
            "records_replayed": record["records_replayed"],
            "state_mib": state_bytes / 2**20,
        }
    finally:
        handle.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="recovery time after an actor is killed")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keys", type=int, nargs="+", default=[10_000, 1_000_000])
    args = parser.parse_args()
    start_ray()
    for keys in args.keys:
        runs = [measure(keys) for _ in range(args.repeat)]
        total = [r["kill_to_first_record_s"] for r in runs]
        detect = [r["kill_to_detected_s"] for r in runs]
        print(
            f"{keys:>9,} keys ({runs[0]['state_mib']:.1f} MiB of state): kill -> first record "
            f"again median {statistics.median(total):.2f} s (runs "
            f"{', '.join(f'{t:.2f}' for t in total)}); noticed after "
            f"{statistics.median(detect) * 1000:.0f} ms; records replayed "
            f"{', '.join(str(r['records_replayed']) for r in runs)}"
        )
    print("target: under 2 s for 10,000 keys")


if __name__ == "__main__":
    main()
