"""The infra examples parse and point at what exists (they cannot run on this machine)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_launcher_config_autoscales_workers() -> None:
    config = yaml.safe_load((ROOT / "infra" / "ray-cluster.yaml").read_text())
    workers = config["available_node_types"]["workers"]
    assert workers["min_workers"] == 0 and workers["max_workers"] > 0
    assert config["available_node_types"][config["head_node_type"]]["resources"]["CPU"] == 0
    assert any("ray[default]==2.60.0" in c for c in config["setup_commands"])


def test_rayjob_runs_a_job_from_jobs_with_s3_credentials_from_the_secret() -> None:
    job = yaml.safe_load((ROOT / "infra" / "kuberay-rayjob.yaml").read_text())
    assert job["kind"] == "RayJob"
    script = job["spec"]["entrypoint"].split()[1]
    assert (ROOT / script).is_file()
    spec = job["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["workerGroupSpecs"][0]["maxReplicas"] > spec["workerGroupSpecs"][0]["minReplicas"]
    env = {e["name"] for e in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= env


def test_the_s3_deployment_serves_port_8333_with_enforced_credentials() -> None:
    docs = list(yaml.safe_load_all((ROOT / "infra" / "k8s-seaweedfs.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert {"Namespace", "Secret", "Deployment", "Service"} <= set(kinds)
    assert kinds["Service"]["spec"]["ports"][0]["port"] == 8333
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"] for e in container["env"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
