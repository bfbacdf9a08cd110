"""Building a flow imports, in the background, what the first job's start would import."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
import rayflow as rf
from rayflow._internal import driver_preload
wanted = ("pyarrow", "rayflow._internal.job.coordinator", "rayflow._internal.runtime.actor")
before = [m in sys.modules for m in wanted]
rf.Dataflow("a")
rf.Dataflow("b")  # once per process
thread = driver_preload._thread
thread.join(60)
print(before, [m in sys.modules for m in wanted], thread.name, thread.daemon)
"""


def test_the_first_dataflow_starts_importing_what_a_job_start_needs() -> None:
    # A fresh interpreter: the test session has imported all of it already.
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[0] == (
        "[False, False, False] [True, True, True] rayflow-preload True"
    ), out.stdout + out.stderr
