"""Lose a whole worker node of a two-node cluster (run in a process of its own)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_losing_a_worker_node_recovers_exactly_once() -> None:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "chaos" / "node_loss.py"), str(ROOT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # only the process group we started
            proc.wait()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, f"exit {proc.returncode}\n{err[-3000:]}"
    report = json.loads(lines[-1])
    assert report["count_actor_nodes"] == [report["victim_node"]]  # the keyed step ran there
    assert report["status"] == "FINISHED"
    assert report["exact"] is True
    assert report["restarts"] >= 1
    assert {"rayflow/chaos-node/count/0", "rayflow/chaos-node/count/1"} <= set(report["replaced"])
    assert report["detected_after_s"] < 5.0
    # Partial recovery was asked for; a lost node is recovered globally, and says why.
    assert report["scopes"][0] == "global"
    assert "was lost with its node" in report["reason"]
