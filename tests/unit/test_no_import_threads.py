"""Building a flow starts no thread: imports belong to the driver's main thread.

A thread that imported Ray's modules while the main thread ran ``ray.init``
failed ``rayflow run`` with Python's ``_DeadlockError`` on ``ray._common``
(CI, 2026-11-29): two threads importing a cycle of modules from two ends.
"""

from __future__ import annotations

import subprocess
import sys

CODE = """
import threading
import rayflow as rf
flow = rf.Dataflow("a", parallelism=2)
flow.source("src", rf.sources.Generator(lambda p, o: o, limit=10)).key_by("k", lambda x: x % 2)
print(sorted(t.name for t in threading.enumerate()))
"""


def test_building_a_flow_starts_no_thread() -> None:
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['MainThread']", out.stdout + out.stderr
