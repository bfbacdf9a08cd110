"""A job's metrics in Ray's Prometheus export, scraped from a real head's metrics port.

This is where KubeRay's PodMonitor and the dashboard's Grafana read: every
node's ``--metrics-export-port``. The series are published by the job's
coordinator through ``ray.util.metrics``; Ray names them ``ray_<name>`` (and
``_total`` for counters).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.clusters.head import HeadNode

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(180)

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics_port(head: HeadNode) -> int:
    """The ``--metrics-export-port`` the head was started with."""
    args = [str(a) for a in head.process.args]
    (port,) = [a.split("=", 1)[1] for a in args if a.startswith("--metrics-export-port=")]
    return int(port)


def scrape(port: int) -> Series:
    """Every ``ray_rayflow_*`` sample: (name, labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("ray_rayflow_")
    }


def values(series: Series, name: str, **labels: str) -> list[float]:
    wanted = set(labels.items())
    return [v for (n, tags), v in series.items() if n == name and wanted <= tags]


def test_operator_metrics_reach_rays_prometheus_export(tmp_path: Path) -> None:
    started = time.monotonic()
    # Metrics reach the export every second instead of every 10 s (Ray's default), so
    # the test waits for the counts seconds, not tens of seconds.
    head = HeadNode(num_cpus=2, dashboard=True, env={"RAY_metrics_report_interval_ms": "1000"})
    driver = None
    try:
        head.wait_ready(dashboard=True)
        port = metrics_port(head)
        driver = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "clusters" / "ray_metrics_driver.py"),
                head.address,
                str(ROOT),
                str(tmp_path / "checkpoints"),
            ],
            env=head.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert driver.stdout is not None and driver.stdin is not None
        line = driver.stdout.readline()
        assert line.startswith("{"), driver.stderr.read()[-3000:] if driver.stderr else ""
        ready = json.loads(line)
        job, per_partition = ready["job"], ready["records"] // 2

        # Scrape as Prometheus would until the job's counts have arrived.
        deadline = time.monotonic() + 45
        while True:
            series = scrape(port)
            out = values(
                series, "ray_rayflow_records_out_total", rayflow_job=job, rayflow_step="gen"
            )
            delivered = values(
                series, "ray_rayflow_records_in_total", rayflow_job=job, rayflow_step="out"
            )
            done = values(series, "ray_rayflow_checkpoints_completed_total", rayflow_job=job)
            if sorted(out) == [per_partition] * 2 and sum(delivered) == 2 * per_partition and done:
                break
            assert time.monotonic() < deadline, f"series so far: {sorted(series)[:40]}"
            time.sleep(1.0)
        driver.stdin.write("stop\n")
        driver.stdin.flush()
        ended = driver.communicate(timeout=90)[0]
        assert json.loads(ended.strip().splitlines()[-1])["status"] == "STOPPED"
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        head.stop()

    # Every partition of gen put out exactly its records, under Prometheus-safe labels.
    for partition in ("0", "1"):
        assert values(
            series, "ray_rayflow_records_out_total",
            rayflow_job=job, rayflow_step="gen", rayflow_partition=partition,
        ) == [per_partition]  # fmt: skip
    for (_, labels), _value in series.items():
        names = dict(labels)
        assert names.get("rayflow_job") == job
        assert "job" not in names  # Prometheus' own label stays free
    # Utilization is a share of time, per step and partition.
    busy = values(series, "ray_rayflow_busy_ratio", rayflow_job=job, rayflow_step="count")
    assert len(busy) == 2 and all(0.0 <= b <= 1.0 for b in busy)
    assert values(series, "ray_rayflow_mailbox_depth", rayflow_job=job, rayflow_step="count")
    assert values(series, "ray_rayflow_records_uncommitted", rayflow_job=job, rayflow_step="out")
    # Checkpoint durations: a histogram in seconds, one count per completed checkpoint.
    (count,) = values(
        series, "ray_rayflow_checkpoint_duration_seconds_count",
        rayflow_job=job, rayflow_checkpoint_outcome="completed",
    )  # fmt: skip
    assert count >= 1
    assert values(
        series, "ray_rayflow_checkpoint_duration_seconds_bucket",
        rayflow_job=job, rayflow_checkpoint_outcome="completed", le="+Inf",
    ) == [count]  # fmt: skip
    assert time.monotonic() - started < 90  # budget: < 60 s on this machine
