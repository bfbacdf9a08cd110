"""The ``rayflow`` command, through its entry point, against the session's Ray."""

from __future__ import annotations

import json
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import ray

import rayflow as rf


def rayflow(*args: str, address: bool = True) -> subprocess.CompletedProcess[str]:
    extra = ["--address", ray.get_runtime_context().gcs_address] if address else []
    return subprocess.run(["rayflow", *args, *extra], capture_output=True, text=True, timeout=180)


FLOW_FILE = textwrap.dedent("""
    import rayflow as rf

    def double(x):
        return 2 * x

    flow = rf.Dataflow("cli-flow", parallelism=2)
    nums = flow.source("nums", rf.sources.Generator(lambda p, i: i, partitions=2, limit=5000))
    nums.map("double", double).key_by("parity", lambda x: x % 4).reduce(
        "sum", lambda a, x: a + x, initial=0).sink("out", rf.testing.Discard())
""")


def test_help_lists_the_commands_and_usage_errors_exit_2() -> None:
    out = rayflow("--help", address=False)
    assert out.returncode == 0
    for command in ("run", "resume", "status", "stop", "savepoint", "checkpoints"):
        assert command in out.stdout
    assert "Exit codes" in out.stdout
    assert rayflow("frobnicate", address=False).returncode == 2


def test_run_a_flow_file_with_checkpoints_then_list_show_and_delete(tmp_path: Path) -> None:
    script = tmp_path / "flow.py"
    script.write_text(FLOW_FILE)
    storage = str(tmp_path / "checkpoints")
    out = rayflow("run", str(script), "--checkpoint", storage, "--interval", "0.2", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["status"] == "FINISHED"
    steps = {s["step"]: s for s in result["steps"]}
    assert steps["nums"]["records_out"] == 10_000 and steps["sum"]["partitions"] == 2
    final = result["final_checkpoint"]

    listed = rayflow("checkpoints", "list", storage, "--json", address=False)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["id"] for r in rows][-1] == final and {r["job"] for r in rows} == {"cli-flow"}
    table = rayflow("checkpoints", "list", storage, address=False).stdout
    assert table.splitlines()[0].split()[:3] == ["JOB", "ID", "KIND"]

    shown = rayflow("checkpoints", "show", rows[-1]["uri"], "--json", address=False)
    info = json.loads(shown.stdout)
    assert {s["step"] for s in info["steps"]} == {"nums", "double", "parity", "sum", "out"}
    assert {(o["step"], o["partition"], o["offset"]) for o in info["offsets"]} == {
        ("nums", 0, 5000),
        ("nums", 1, 5000),
    }

    deleted = rayflow("checkpoints", "delete", rows[0]["uri"], "--json", address=False)
    assert deleted.returncode == 0, deleted.stderr
    after = json.loads(rayflow("checkpoints", "list", storage, "--json", address=False).stdout)
    assert [r["id"] for r in after] == [r["id"] for r in rows[1:]]
    # What the kept checkpoints need is still there.
    assert rayflow("checkpoints", "show", rows[-1]["uri"], address=False).returncode == 0


def test_bad_input_and_missing_things_have_their_exit_codes(tmp_path: Path) -> None:
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    out = rayflow("run", str(empty), "--json")
    assert out.returncode == 2
    assert "needs exactly one module-level rf.Dataflow" in json.loads(out.stdout)["error"]
    assert rayflow("run", str(tmp_path / "missing.py")).returncode == 3
    assert rayflow("status", "no-such-job").returncode == 3
    assert rayflow("checkpoints", "list", str(tmp_path), address=False).returncode == 3
    bad = rayflow("checkpoints", "show", str(tmp_path / "nothing"), address=False)
    assert bad.returncode == 3 and "manifest.json" in bad.stderr


def test_status_savepoint_and_stop_a_running_job(tmp_path: Path) -> None:
    flow = rf.Dataflow("cli-running", parallelism=2)
    src = flow.source(
        "gen", rf.sources.Generator(lambda p, i: (i % 50, 1), partitions=2, rate=5000)
    )
    src.key_by("k", lambda r: r[0]).reduce("count", lambda a, r: a + 1, initial=0).sink(
        "out", rf.testing.Discard()
    )
    handle = rf.start(
        flow, checkpoint=rf.Checkpointing(storage=str(tmp_path / "cp"), interval_s=0.5)
    )
    try:
        time.sleep(1.0)
        status = rayflow("status", "cli-running", "--json")
        assert status.returncode == 0, status.stderr
        data: dict[str, Any] = json.loads(status.stdout)
        assert data["status"] == "RUNNING"
        assert {s["step"] for s in data["steps"]} == {"gen", "k", "count", "out"}
        assert "BACKPRESSURED_MS_S" in rayflow("status", "cli-running").stdout

        savepoint = str(tmp_path / "sp")
        saved = rayflow("savepoint", "cli-running", savepoint, "--json")
        assert saved.returncode == 0, saved.stderr
        assert json.loads(saved.stdout)["kind"] == "savepoint"
        shown = json.loads(
            rayflow("checkpoints", "show", savepoint, "--json", address=False).stdout
        )
        assert shown["kind"] == "savepoint" and shown["job"] == "cli-running"

        stopped = rayflow("stop", "cli-running", "--json")
        assert stopped.returncode == 0, stopped.stderr
        assert json.loads(stopped.stdout)["status"] == "STOPPED"
    finally:
        result = handle.stop()
    assert result.status is rf.JobStatus.STOPPED


def test_resume_continues_from_the_latest_checkpoint(tmp_path: Path) -> None:
    script = tmp_path / "flow.py"
    script.write_text(FLOW_FILE)
    storage = str(tmp_path / "checkpoints")
    assert rayflow("run", str(script), "--checkpoint", storage, "--interval", "0.2").returncode == 0
    again = rayflow("run", str(script), "--checkpoint", storage, "--json")
    assert again.returncode == 2 and "resume=True" in json.loads(again.stdout)["error"]
    resumed = rayflow("resume", storage, str(script), "--json")
    assert resumed.returncode == 0, resumed.stderr
    data = json.loads(resumed.stdout)
    assert data["status"] == "FINISHED" and data["restored_checkpoint"] is not None
    # Everything was read before: the resumed run reads nothing again.
    assert {s["step"]: s["records_out"] for s in data["steps"]}["nums"] == 0
