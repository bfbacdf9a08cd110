"""Every job in jobs/ through ``ray job submit``, and ``rayflow`` with a Ray Jobs address,
against one Ray head started for this test (with its dashboard)."""

from __future__ import annotations

import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.clusters.head import HeadNode
from tests.support import expected_words, final_counts
from tests.support.kafka_broker import KafkaBroker

S3_BUCKET = "rayflow-test"  # the session's S3 server (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[2]


def test_every_job_runs_with_ray_job_submit_and_rayflow_takes_a_jobs_address(
    tmp_path: Path, s3_server: object, kafka_broker: KafkaBroker
) -> None:
    # The four submissions run at once, then rayflow run after the submitted wordcount
    # (each waits on Ray's start-up more than on the CPU: one after another took 89 s of
    # the suite's 20 minutes). The head offers 8 logical CPUs so that every job's operators
    # fit at once ("fit" asks for half of what is free when a job starts).
    head = HeadNode(num_cpus=8, dashboard=True)
    prefix = f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:8]}"
    try:
        head.wait_ready(dashboard=True)

        def submit(*entrypoint: str) -> subprocess.CompletedProcess[str]:
            return head.run(
                *("ray", "job", "submit", "--address", head.dashboard, "--working-dir", "."),
                *("--", *entrypoint),
                cwd=ROOT,
            )

        words, again = tmp_path / "words", tmp_path / "again"
        source, sink = kafka_broker.topic(2, "sums-in"), kafka_broker.topic(2, "sums-out")
        commands: dict[str, tuple[str, ...]] = {
            "wordcount": (
                "python",
                "jobs/wordcount.py",
                "--output",
                str(words),
                "--parallelism",
                "2",
            ),
            "clickstream": (
                "python",
                "jobs/clickstream.py",
                "--output",
                str(tmp_path / "sessions"),
            ),
            "generator": (
                *("python", "jobs/generator_to_s3.py", "--s3", prefix, "--seconds", "3"),
                *("--interval", "0.5", "--rate", "2000"),
            ),
            "kafka": (
                *("python", "jobs/kafka_sum.py", "--bootstrap", kafka_broker.bootstrap),
                *("--input", source, "--output", sink, "--produce", "1000"),
                # Until all is read, not a fixed time: 2 s were not always enough beside
                # four other jobs on the head's 2 cores.
                *("--until-read", "1000", "--seconds", "60"),
                *("--interval", "0.5", "--checkpoint", str(tmp_path / "kafka-cp")),
            ),
        }

        def rayflow_run() -> subprocess.CompletedProcess[str]:
            # rayflow itself with the dashboard address: the flow file's folder is uploaded
            # and the command runs on the cluster; its output streams back. After the
            # submitted wordcount: one job name runs once at a time.
            wordcount.result()
            return head.run(
                *("rayflow", "run", "jobs/wordcount.py", "--output", str(again)),
                *("--address", head.dashboard),
                cwd=ROOT,
            )

        with ThreadPoolExecutor(len(commands) + 1) as pool:
            futures = {name: pool.submit(submit, *cmd) for name, cmd in commands.items()}
            wordcount = futures["wordcount"]
            run = pool.submit(rayflow_run).result()
            done = {name: f.result() for name, f in futures.items()}
        for name, result in done.items():
            assert result.returncode == 0, (name, result.stdout[-3000:] + result.stderr[-3000:])
            assert "succeeded" in result.stdout, (name, result.stdout[-3000:])
        out = done["wordcount"].stdout
        assert "job wordcount FINISHED" in out
        assert "rayflow INFO: job wordcount started" in out  # the driver's log reaches Ray Jobs
        assert "job clickstream FINISHED" in done["clickstream"].stdout
        assert "job generator-to-s3 STOPPED: final checkpoint" in done["generator"].stdout
        assert f"{sink} (read_committed): 1,000 updates, 100 keys" in done["kafka"].stdout
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "submitted as Ray job" in run.stderr and "job wordcount FINISHED" in run.stdout
        listed = head.run("rayflow", "list", "--json", "--address", head.dashboard, cwd=ROOT)
        assert listed.returncode == 0, listed.stderr[-3000:]
        assert "[]" in listed.stdout  # nothing runs any more
    finally:
        head.stop()
    assert final_counts(words) == expected_words()
    assert final_counts(again) == expected_words()
