"""A job whose operators need more CPUs than the head has gets workers from the Ray autoscaler.

The autoscaler runs for real, with Ray's fake multi-node provider (nodes
are processes on this machine), as ``ray.cluster_utils.AutoscalingCluster``
does; its config is written here because the wheel lacks the example file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.clusters.head import HeadNode

ROOT = Path(__file__).resolve().parents[2]


def fake_cluster_config(gcs_address: str) -> dict[str, object]:
    return {
        "cluster_name": "rayflow-fake",
        "max_workers": 2,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 1,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "worker.cpu2": {
                "resources": {"CPU": 2},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 2,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {"ssh_user": "ubuntu"},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def test_the_autoscaler_adds_workers_for_the_job(tmp_path: Path) -> None:
    config = tmp_path / "autoscaling.json"
    head = None
    try:
        # The config names the head's GCS address, so pick the port first.
        from tests.support.ports import free_port

        port = free_port()
        config.write_text(json.dumps(fake_cluster_config(f"127.0.0.1:{port}")))
        head = HeadNode(num_cpus=0, autoscaling_config=str(config), port=port)
        head.wait_ready()
        run = head.run(
            sys.executable,
            str(ROOT / "tests" / "clusters" / "autoscaling_driver.py"),
            head.address,
            str(ROOT),
            timeout=400,
        )
        lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
        assert run.returncode == 0 and lines, run.stderr[-3000:] + head.logs()[-2000:]
        report = json.loads(lines[-1])
    finally:
        if head is not None:
            head.stop()
    assert report["nodes_before"] == 1  # the head only: no CPU to run the keyed step
    assert report["max_nodes"] >= 2  # the autoscaler added workers
    assert report["status"] == "FINISHED" and report["exact"] is True
