"""The ``rayflow`` command, through its entry point, against the session's Ray."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import ray

import rayflow as rf
from tests.support import expected_words, final_counts


def rayflow(
    *args: str, address: bool = True, env: dict[str, str | None] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the command (its ``--address`` the session's Ray unless ``address=False``).

    The timeout is a guard against hanging, not a measurement.
    """
    extra = ["--address", ray.get_runtime_context().gcs_address] if address else []
    environ = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            environ.pop(key, None)
        else:
            environ[key] = value
    return subprocess.run(
        ["rayflow", *args, *extra], capture_output=True, text=True, timeout=180, env=environ
    )


FLOW_FILE = textwrap.dedent("""
    import rayflow as rf

    def double(x):
        return 2 * x

    flow = rf.Dataflow("cli-flow", parallelism=2)
    nums = flow.source("nums", rf.sources.Generator(lambda p, i: i, partitions=2, limit=5000,
                                                     rate=8000))
    nums.map("double", double).key_by("parity", lambda x: x % 4).reduce(
        "sum", lambda a, x: a + x, initial=0).sink("out", rf.testing.Discard())
""")


def test_help_version_and_usage_errors() -> None:
    out = rayflow("--help", address=False)
    assert out.returncode == 0
    for command in ("run", "resume", "list", "status", "stop", "savepoint", "checkpoints"):
        assert command in out.stdout
    assert "Exit codes" in out.stdout
    version = rayflow("--version", address=False)
    assert version.returncode == 0 and rf.__version__ in version.stdout
    module = subprocess.run(
        [sys.executable, "-m", "rayflow", "--version"], capture_output=True, text=True
    )
    assert module.returncode == 0 and module.stdout == version.stdout
    bare = rayflow(address=False)
    assert bare.returncode == 2 and bare.stdout.count("Usage: rayflow") == 1, bare.stdout
    unknown = rayflow("frobnicate", address=False)
    assert unknown.returncode == 2 and "No such command" in unknown.stderr
    bad_json = rayflow("status", "--json", address=False)  # the job name is missing
    assert bad_json.returncode == 2 and json.loads(bad_json.stdout)["exit_code"] == 2


def test_an_unreachable_ray_fails_in_seconds_with_exit_code_4() -> None:
    refused = rayflow("status", "x", "--address", "127.0.0.1:1", "--json", address=False)
    assert refused.returncode == 4
    assert json.loads(refused.stdout)["error"].startswith("cannot reach Ray at 127.0.0.1:1")
    assert "Traceback" not in refused.stderr
    # Something listens, but it is not Ray: ray.init would retry for minutes.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        silent = rayflow("list", "--address", f"127.0.0.1:{port}", address=False)
    assert silent.returncode == 4 and "does not answer as Ray's GCS" in silent.stderr
    client = rayflow("list", address=False, env={"RAY_ADDRESS": "ray://127.0.0.1:10001"})
    assert client.returncode == 2 and "http://HOST:8265" in client.stderr
    jobs = rayflow("status", "x", address=False, env={"RAY_ADDRESS": "http://127.0.0.1:1"})
    assert jobs.returncode == 4 and "cannot reach Ray Jobs at http://127.0.0.1:1" in jobs.stderr


def test_s3_errors_are_one_line_with_their_exit_code(s3_server: Any) -> None:
    no_credentials = {
        "AWS_ACCESS_KEY_ID": None,
        "AWS_SECRET_ACCESS_KEY": None,
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    out = rayflow(
        "checkpoints", "list", "s3://rayflow-test/x", "--json", address=False, env=no_credentials
    )
    assert out.returncode == 4, out.stderr
    assert "no AWS credentials" in json.loads(out.stdout)["error"]
    assert "Traceback" not in out.stderr
    wrong = rayflow(
        "checkpoints",
        "list",
        "s3://rayflow-test/x",
        address=False,
        env={"AWS_SECRET_ACCESS_KEY": "wrong"},
    )
    assert wrong.returncode == 4 and "refused" in wrong.stderr, wrong.stderr


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
    # 1.25 s of input at 8,000 records/s: several checkpoints, one of them to delete.
    assert len(rows) >= 2, rows
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
    assert "restore" not in bad.stderr  # no API (restore_from=) or other command's words


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
    # The API's words become the flags a command-line user types.
    error = json.loads(again.stdout)["error"]
    assert again.returncode == 2 and "--resume" in error and "resume=True" not in error
    resumed = rayflow("resume", storage, str(script), "--json")
    assert resumed.returncode == 0, resumed.stderr
    data = json.loads(resumed.stdout)
    assert data["status"] == "FINISHED" and data["restored_checkpoint"] is not None
    # Everything was read before: the resumed run reads nothing again.
    assert {s["step"]: s["records_out"] for s in data["steps"]}["nums"] == 0


ROOT = Path(__file__).resolve().parents[2]


def test_every_job_in_jobs_runs_with_rayflow_run(tmp_path: Path, s3_server: Any) -> None:
    out = tmp_path / "wc"
    wordcount = rayflow(
        "run", str(ROOT / "jobs" / "wordcount.py"), "--output", str(out), "--progress-every", "0"
    )
    assert wordcount.returncode == 0, wordcount.stderr
    assert "job wordcount FINISHED" in wordcount.stdout
    assert "rayflow INFO: job wordcount started" in wordcount.stderr
    assert final_counts(out) == expected_words()

    sessions = rayflow(
        "run", str(ROOT / "jobs" / "clickstream.py"), "--output", str(tmp_path / "s"), "--json"
    )
    assert sessions.returncode == 0, sessions.stderr
    steps = {s["step"]: s for s in json.loads(sessions.stdout)["steps"]}
    events = sum(
        len(p.read_text().splitlines()) for p in (ROOT / "jobs" / "data" / "clicks").glob("*")
    )
    assert steps["events"]["records_out"] == events

    prefix = f"s3://rayflow-test/{tmp_path.name}"
    generated = rayflow(
        "run",
        str(ROOT / "jobs" / "generator_to_s3.py"),
        "--s3",
        prefix,
        "--limit",
        "3000",
        "--rate",
        "20000",
        "--checkpoint",
        f"{prefix}/checkpoints",
        "--interval",
        "0.3",
        "--json",
    )
    assert generated.returncode == 0, generated.stderr
    result = json.loads(generated.stdout)
    assert result["status"] == "FINISHED" and result["final_checkpoint"] is not None
    assert {s["step"]: s for s in result["steps"]}["views"]["records_out"] == 6000
    assert "checkpoint 1 completed" in generated.stderr


def test_print_output_and_progress_lines_reach_the_terminal(tmp_path: Path) -> None:
    script = tmp_path / "printer.py"
    script.write_text(
        textwrap.dedent("""
            import rayflow as rf

            def flow():
                f = rf.Dataflow("printer", parallelism=1)
                nums = f.source("n", rf.sources.Generator(lambda p, i: i, rate=400, limit=1000))
                nums.filter("big", lambda x: x >= 995).map("sq", lambda x: x * x).sink(
                    "p", rf.sinks.Print(prefix="square="))
                return f
        """)
    )
    out = rayflow("run", str(script), "--progress-every", "0.5")
    assert out.returncode == 0, out.stderr
    printed = out.stdout + out.stderr  # Ray forwards the operators' output
    for x in range(995, 1000):
        assert f"square={x * x}" in printed
    progress = [line for line in out.stderr.splitlines() if line.startswith("printer RUNNING")]
    assert len(progress) >= 2, out.stderr  # ~2.5 s of running, a line every 0.5 s
    assert "read " in progress[-1] and "written " in progress[-1]
    assert "rayflow INFO: job printer FINISHED" in out.stderr


def test_list_watch_and_sigterm_stop_a_running_job(tmp_path: Path) -> None:
    script = tmp_path / "endless.py"
    script.write_text(
        textwrap.dedent("""
            import rayflow as rf

            flow = rf.Dataflow("cli-endless", parallelism=1)
            src = flow.source("gen", rf.sources.Generator(lambda p, i: (i % 7, 1), rate=2000))
            src.key_by("k", lambda r: r[0]).reduce("count", lambda a, r: a + 1, initial=0).sink(
                "out", rf.testing.Discard())
        """)
    )
    storage = tmp_path / "cp"
    command = ["rayflow", "run", str(script), "--checkpoint", str(storage), "--interval", "0.3"]
    command += ["--json", "--address", ray.get_runtime_context().gcs_address]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        listed: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            out = rayflow("list", "--json")
            assert out.returncode == 0, out.stderr
            listed = [r for r in json.loads(out.stdout) if r["job"] == "cli-endless"]
            if listed and listed[0]["status"] == "RUNNING" and listed[0]["last_checkpoint"]:
                break
            time.sleep(0.5)
        assert listed and listed[0]["status"] == "RUNNING" and listed[0]["steps"] == 4
        assert "cli-endless" in rayflow("list").stdout

        # status --watch refreshes until the job ends; SIGTERM (what `ray job stop` and
        # Kubernetes send) stops it like Ctrl-C: drain, final checkpoint, exit 0.
        watch = subprocess.Popen(
            [
                *("rayflow", "status", "cli-endless", "--watch", "--interval", "0.3", "--json"),
                *("--address", ray.get_runtime_context().gcs_address),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # The watcher's own start (interpreter, imports, connecting to Ray) can take
        # seconds on a loaded host: stop the job only once it has printed a snapshot.
        assert watch.stdout is not None
        first: list[str] = []
        while not first or first[-1] != "}\n":
            line = watch.stdout.readline()
            assert line, f"status --watch ended before printing: {watch.stderr.read()}"  # type: ignore[union-attr]
            first.append(line)
        time.sleep(1.0)  # a few more refreshes at --interval 0.3
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
        rest, _ = watch.communicate(timeout=60)
        watched = "".join(first) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    result = json.loads(stdout)
    assert result["status"] == "STOPPED" and result["final_checkpoint"] is not None
    assert "stopping job cli-endless" in stderr
    assert watch.returncode == 0
    snapshots = [json.loads(chunk) for chunk in watched.replace("}\n{", "}\x00{").split("\x00")]
    assert len(snapshots) >= 3 and snapshots[0]["status"] == "RUNNING"
    assert snapshots[-1]["status"] in ("STOPPING", "STOPPED", "ENDED")
