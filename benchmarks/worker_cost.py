"""CPU a Ray worker process costs to start: bare, and with rayflow preloaded.

    python benchmarks/worker_cost.py                  # 8 actors per variant
    python benchmarks/worker_cost.py --actors 12

Every actor of a job (its coordinator, each operator partition) is a Ray
worker process of its own, and on a small machine starting those processes
is much of what a job's start costs. For each variant this starts a private
local Ray (``ray.init(address="local")``), creates ``--actors`` trivial actors
one after the other, and reads each one's process CPU time (user + system)
once it answered: what the process spent from its start to serving a call.

Variants:

- ``bare``: Ray's worker only;
- ``preload``: Ray's workers import rayflow first (``RAY_preload_python_modules``,
  as rayflow sets it for a Ray it starts; rayflow/_internal/preload.py);
- ``preload-uncached``: the same with no bytecode cache for rayflow's modules
  (``PYTHONDONTWRITEBYTECODE`` set and no ``__pycache__``, as an editable
  install in such an environment has): each worker compiles them.

Each variant runs in a child process of its own, so that the environment
each one's Ray starts with is its own. Prints the median CPU seconds per
worker of each variant and their ratio to ``bare``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys, time
import psutil, ray
ray.init(address="local", include_dashboard=False, num_cpus=2)

@ray.remote(num_cpus=0)
class Probe:
    def pid(self):
        module = sys.modules.get("rayflow")
        return os.getpid(), getattr(module, "__file__", None)

time.sleep(3)  # Ray's own start-up settles
costs, where = [], None
for _ in range(int(sys.argv[1])):
    actor = Probe.remote()
    pid, where = ray.get(actor.pid.remote())
    times = psutil.Process(pid).cpu_times()
    costs.append(times.user + times.system)
    ray.kill(actor)
print(json.dumps([costs, where]))
"""


def run_variant(name: str, actors: int) -> tuple[list[float], str | None]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_preload")}
    env.update(
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="disabled",
        RAY_TMPDIR=tempfile.mkdtemp(prefix="rf-worker-cost-"),
    )
    cache = None
    if name.startswith("preload"):
        env["RAY_preload_python_modules"] = "rayflow._internal.preload"
    if name == "preload-uncached":
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        # rayflow's sources with no cache beside them: a copy, to leave the tree alone.
        cache = tempfile.mkdtemp(prefix="rf-uncached-")
        shutil.copytree(ROOT / "rayflow", Path(cache) / "rayflow",
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
        env["PYTHONPATH"] = cache + os.pathsep + env.get("PYTHONPATH", "")
    elif name == "preload":
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "rayflow")],
                       check=True)  # fmt: skip
    try:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(actors)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            cwd=cache or str(ROOT),
        ).stdout
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    costs, where = json.loads(out.strip().splitlines()[-1])
    return costs, where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--actors", type=int, default=8)
    args = parser.parse_args()
    medians = {}
    for name in ("bare", "preload", "preload-uncached"):
        costs, where = run_variant(name, args.actors)
        medians[name] = statistics.median(costs)
        print(
            f"{name:17s} CPU per worker: median {medians[name]:.2f} s "
            f"(min {min(costs):.2f}, max {max(costs):.2f}, {len(costs)} actors); "
            f"rayflow in the worker: {where or 'not imported'}"
        )
    for name in ("preload", "preload-uncached"):
        print(f"{name} / bare: {medians[name] / medians['bare']:.2f}x")


if __name__ == "__main__":
    main()
