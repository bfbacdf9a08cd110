"""Run by test_node_loss.py in a process of its own: a two-node Ray cluster on
this machine (``ray.cluster_utils.Cluster``, loopback only) loses the worker
node that runs the keyed step; a replacement node joins (as an autoscaler
would add one), the job recovers and its output is checked. Prints one JSON
line with what happened."""

from __future__ import annotations

import json
import sys
import tempfile
import time

import ray
from ray.cluster_utils import Cluster

sys.path.insert(0, sys.argv[1])

import rayflow as rf
from tests.chaos.flows import check_exactly_once, collect_streams, counting_flow, expected_counts

# Health checks that notice a lost node in about a second (RAY-NOTES.md).
FAST = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
}
PER_PARTITION = 40_000


def main() -> None:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": False, "_system_config": FAST},
    )
    try:
        victim = cluster.add_node(num_cpus=1, resources={"victim": 1})
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        flow = counting_flow(
            "chaos-node",
            per_partition=PER_PARTITION,
            rate=12_000,
            sinks={"out": rf.testing.Collect()},
            count_options={"resources": {"victim": 0.1}},
        )
        # Partial recovery asked for: a lost node must still be recovered globally.
        config = rf.Checkpointing(storage=tempfile.mkdtemp(), interval_s=0.5, recovery="partial")
        handle = rf.start(flow, checkpoint=config)
        while (handle.checkpoint_stats() or {}).get("completed", 0) < 2:
            time.sleep(0.1)
        homes = {
            p: ray.get(
                ray.get_actor(f"rayflow/chaos-node/count/{p}", namespace="rayflow").where.remote()
            )["node_id"]
            for p in range(2)
        }
        lost = time.time()
        cluster.remove_node(victim, allow_graceful=False)
        time.sleep(1.0)
        cluster.add_node(num_cpus=1, resources={"victim": 1})
        result = handle.wait(timeout=240)
        try:  # per key, in order
            check_exactly_once(
                collect_streams(result, "out"), expected_counts(PER_PARTITION), "out"
            )
            exact: bool | str = True
        except AssertionError as exc:
            exact = str(exc)
        print(
            json.dumps(
                {
                    "victim_node": victim.node_id,
                    "count_actor_nodes": sorted(set(homes.values())),
                    "exact": exact,
                    "status": result.status.value,
                    "restarts": result.restarts,
                    "detected_after_s": (result.recoveries[0]["detected_at"] - lost)
                    if result.recoveries
                    else None,
                    "replaced": result.recoveries[0]["replaced"] if result.recoveries else [],
                    "scopes": [r["scope"] for r in result.recoveries],
                    "reason": result.recoveries[0].get("reason") if result.recoveries else None,
                }
            ),
            flush=True,
        )
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
