"""Run by test_autoscaling.py against the autoscaling head: the head has no CPUs
and no step sets num_cpus, so the operators' default CPU request
(RuntimeConfig.operator_cpus="fit") must make the Ray autoscaler add (fake)
worker nodes before the job can run. Prints one JSON line."""

from __future__ import annotations

import json
import sys
import threading
import time

import ray

sys.path.insert(0, sys.argv[2])

import rayflow as rf
from tests.chaos.flows import counting_flow, expected_updates

PER_PARTITION = 20_000


def main() -> None:
    ray.init(address=sys.argv[1])
    nodes_before = len([n for n in ray.nodes() if n["Alive"]])
    seen = {"max_nodes": nodes_before}
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.5):
            seen["max_nodes"] = max(seen["max_nodes"], len([n for n in ray.nodes() if n["Alive"]]))

    threading.Thread(target=watch, daemon=True).start()
    flow = counting_flow(
        "autoscaled",
        per_partition=PER_PARTITION,
        rate=None,
        sinks={"out": rf.testing.Collect()},
    )  # no num_cpus anywhere: the default ("fit") must make the cluster grow
    started = time.monotonic()
    result = rf.run(flow)
    stop.set()
    print(
        json.dumps(
            {
                "nodes_before": nodes_before,
                "max_nodes": seen["max_nodes"],
                "status": result.status.value,
                "exact": sorted(result.output("out")) == expected_updates(PER_PARTITION),
                "seconds": time.monotonic() - started,
                "cluster_cpus": ray.cluster_resources().get("CPU", 0),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
