"""The infra files work as they stand (checked without a cloud or a Kubernetes cluster).

infra/ray-cluster.yaml goes through Ray's own cluster-config validator, as
`ray up` does; the KubeRay RayJob goes through the RayJob CRD's schema of the
oldest and newest KubeRay release we support (vendored in tests/data/kuberay,
see vendor.py there), and every field in it must be one the CRD knows, since
Kubernetes silently drops unknown ones; the image it runs is the one
infra/Dockerfile builds, on the Ray that pyproject.toml pins.
"""

from __future__ import annotations

import copy
import importlib.metadata as metadata
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
KUBERAY = sorted((ROOT / "tests" / "data" / "kuberay").glob("rayjobs-*.v1.json"))
IMAGE_HOME = "/home/ray/rayflow"


def _launcher_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())
    return config


def _prepared(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` validates: the config merged with Ray's AWS defaults."""
    prepared: dict[str, Any] = prepare_config(copy.deepcopy(config))
    return prepared


def _rayjob() -> dict[str, Any]:
    job: dict[str, Any] = yaml.safe_load((INFRA / "kuberay-rayjob.yaml").read_text())
    return job


def _seaweedfs() -> dict[str, dict[str, Any]]:
    docs = yaml.safe_load_all((INFRA / "k8s-seaweedfs.yaml").read_text())
    return {d["kind"]: d for d in docs}


def _crd(path: Path) -> dict[str, Any]:
    crd: dict[str, Any] = json.loads(path.read_text())
    return crd


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of infra/Dockerfile, continuation lines joined."""
    steps: list[tuple[str, str]] = []
    pending = ""
    for line in (INFRA / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            instruction, _, args = pending.strip().partition(" ")
            steps.append((instruction.upper(), " ".join(args.split())))
            pending = ""
    return steps


def _built_image_name() -> str:
    """The name infra/Dockerfile says to build it as (`docker build ... -t NAME .`)."""
    found = re.search(
        r"docker build -f infra/Dockerfile -t (\S+) \.", (INFRA / "Dockerfile").read_text()
    )
    assert found, "infra/Dockerfile's header must say: docker build -f infra/Dockerfile -t NAME ."
    return found.group(1)


def _unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Paths in ``value`` that ``schema`` does not declare.

    Kubernetes prunes unknown fields of a custom resource instead of rejecting
    them, so a misspelled field is silently ignored; JSON Schema alone allows
    them too (the CRD has no ``additionalProperties: false``). This walks the
    structural schema as the API server's pruning does.
    """
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    unknown: list[str] = []
    if isinstance(value, dict):
        known = schema.get("properties", {})
        every = schema.get("additionalProperties")
        for key, item in value.items():
            if key in known:
                unknown += _unknown_fields(item, known[key], f"{path}.{key}")
            elif isinstance(every, dict):
                unknown += _unknown_fields(item, every, f"{path}.{key}")
            else:
                unknown.append(f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            unknown += _unknown_fields(item, schema["items"], f"{path}[{i}]")
    return unknown


def _fields_with_cel_rules(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields of ``value`` whose schema has CEL rules (x-kubernetes-validations),
    which JSON Schema cannot check."""
    found = [path] if "x-kubernetes-validations" in schema else []
    if isinstance(value, dict):
        known = schema.get("properties", {})
        for key, item in value.items():
            if key in known:
                found += _fields_with_cel_rules(item, known[key], f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += _fields_with_cel_rules(item, schema["items"], f"{path}[{i}]")
    return found


def _schema_errors(value: Any, schema: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft4Validator(schema)  # OpenAPI v3 schemas are draft-4-like
    return [
        f"{'.'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}"
        for e in validator.iter_errors(value)
    ]


def _containers(job: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = job["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


# --- the Ray cluster launcher (AWS) -------------------------------------------------


def test_the_cluster_launcher_config_passes_rays_own_validator() -> None:
    config = _launcher_config()
    validate_config(_prepared(config))  # raises jsonschema.ValidationError, as `ray up` would
    # ... and that validator does reject a mistake (a misspelled field, as here):
    broken = copy.deepcopy(config)
    broken["available_node_types"]["workers"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(_prepared(broken))


def test_the_cluster_launcher_installs_pip_and_rayflow_from_the_synced_repo_on_every_node() -> None:
    config = _launcher_config()
    mounted = config["file_mounts"]["~/rayflow"]
    assert (ROOT / mounted / "pyproject.toml").is_file(), "~/rayflow must be this repository"
    prepared = _prepared(config)
    install = f'pip install "ray[default]=={ray.__version__}" -e "$HOME/rayflow[s3,otel,cluster]"'
    for node in ("head", "worker"):
        commands = prepared[f"{node}_setup_commands"]
        setup = " ".join(commands)
        assert "apt-get" in setup and "python3-pip" in setup and "python3-venv" in setup, node
        assert any(install in c for c in commands), f"{node}: no `{install}`"
        venv = re.search(r"(\S+)/python -m pip install", setup)
        assert venv, f"{node}: rayflow is not installed with a venv's python"
        for start in prepared[f"{node}_start_ray_commands"]:
            ray_bin = re.search(r"(\S+)/ray (?:start|stop)", start)
            assert ray_bin and ray_bin.group(1) == venv.group(1), (
                f"{node}: `{start}` does not run the Ray of the venv rayflow is in"
            )
        for command in commands + prepared[f"{node}_start_ray_commands"]:
            checked = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
            assert checked.returncode == 0, f"{node}: not valid bash: {command}\n{checked.stderr}"
    excluded = config["rsync_filter"] + config["rsync_exclude"]
    assert ".gitignore" in excluded and "**/.git" in excluded


def test_the_cluster_launcher_puts_operators_on_autoscaled_workers_not_the_head() -> None:
    config = _launcher_config()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"]["CPU"] == 0, "the head must offer no CPU, so operators go to workers"
    assert any("--num-cpus=0" in c for c in config["head_start_ray_commands"])
    (workers,) = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers["min_workers"] == 0 < workers["max_workers"] <= config["max_workers"]
    assert workers["resources"]["CPU"] > 0, "workers must offer the CPUs operators ask for"


# --- KubeRay -------------------------------------------------------------------------


def test_the_vendored_kuberay_schemas_say_where_they_come_from() -> None:
    assert [_crd(p)["tag"] for p in KUBERAY] == ["v1.3.2", "v1.7.0"]
    for path in KUBERAY:
        crd = _crd(path)
        assert (crd["crd"], crd["kind"], crd["version"]) == ("rayjobs.ray.io", "RayJob", "v1")
        assert re.fullmatch(r"[0-9a-f]{40}", crd["commit"]) and crd["tag"] in crd["source"]


@pytest.mark.parametrize("crd_file", KUBERAY, ids=[p.name for p in KUBERAY])
def test_the_rayjob_is_valid_for_the_kuberay_crd(crd_file: Path) -> None:
    crd = _crd(crd_file)
    schema = crd["openAPIV3Schema"]
    job = _rayjob()
    assert job["apiVersion"] == f"{crd['group']}/{crd['version']}" and job["kind"] == crd["kind"]
    assert not _schema_errors(job, schema), _schema_errors(job, schema)
    # metadata is the API server's ObjectMeta (the CRD says only `type: object`).
    assert set(job["metadata"]) <= {"name", "namespace", "labels", "annotations"}
    unknown = _unknown_fields(job["spec"], schema["properties"]["spec"], "spec")
    assert not unknown, f"fields KubeRay {crd['tag']} does not know (it drops them): {unknown}"
    cel = _fields_with_cel_rules(job["spec"], schema["properties"]["spec"], "spec")
    assert not cel, f"fields with CEL rules, which this test does not evaluate: {cel}"


def test_the_schema_checks_catch_mistakes_in_a_rayjob() -> None:
    """The two checks above are not vacuous: a typo and a wrong type are found."""
    schema = _crd(KUBERAY[0])["openAPIV3Schema"]
    typo = _rayjob()
    typo["spec"]["rayClusterSpec"]["enableInTreeAutoscalling"] = True
    unknown = _unknown_fields(typo["spec"], schema["properties"]["spec"], "spec")
    assert "spec.rayClusterSpec.enableInTreeAutoscalling" in unknown
    wrong_type = _rayjob()
    wrong_type["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    assert any("num-cpus" in e for e in _schema_errors(wrong_type, schema))


def test_the_seaweedfs_pod_template_is_a_valid_kubernetes_pod_template() -> None:
    """Checked with the PodTemplateSpec schema that the RayJob CRD embeds."""
    spec = _crd(KUBERAY[-1])["openAPIV3Schema"]["properties"]["spec"]
    pod_template = spec["properties"]["rayClusterSpec"]["properties"]["headGroupSpec"][
        "properties"
    ]["template"]
    template = _seaweedfs()["Deployment"]["spec"]["template"]
    assert not _schema_errors(template, pod_template), _schema_errors(template, pod_template)
    assert not _unknown_fields(template, pod_template, "template")


def test_the_rayjob_runs_a_job_of_the_image_that_infra_dockerfile_builds() -> None:
    job = _rayjob()
    image = _built_image_name()
    assert image == f"rayflow:{metadata.version('rayflow')}", "tag the image with rayflow's version"
    images = {c["image"] for c in _containers(job)}
    assert images == {image}, f"the RayJob runs {images}; infra/Dockerfile builds {image}"
    assert "runtimeEnvYAML" not in job["spec"], "the job's code is in the image, not a working_dir"
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    python, script, *args = shlex.split(job["spec"]["entrypoint"])
    assert python == "python" and script.startswith(f"{IMAGE_HOME}/jobs/")
    local = ROOT / script.removeprefix(f"{IMAGE_HOME}/")
    assert local.is_file(), f"{script} is not in jobs/"
    helped = subprocess.run(
        [sys.executable, str(local), "--help"], capture_output=True, text=True, timeout=120
    )
    assert helped.returncode == 0, helped.stderr
    flags = {a.split("=")[0] for a in args if a.startswith("--")}
    assert flags and all(f in helped.stdout for f in flags), (flags, helped.stdout)
    copies = [args for step, args in _dockerfile() if step == "COPY"]
    assert f"jobs/ {IMAGE_HOME}/jobs/" in copies


def test_the_dockerfile_builds_on_the_pinned_ray_with_the_cluster_extras() -> None:
    steps = _dockerfile()
    (base,) = [args for step, args in steps if step == "FROM"]
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert base == f"rayproject/ray:{ray.__version__}-{py}", (
        f"FROM {base}: use the installed Ray {ray.__version__} and this Python ({py})"
    )
    runs = " ".join(args for step, args in steps if step == "RUN")
    assert f'"ray[default]=={ray.__version__}"' in runs
    assert '".[s3,otel,cluster]"' in runs
    extras = set(metadata.metadata("rayflow").get_all("Provides-Extra") or [])
    assert {"s3", "otel", "cluster"} <= extras
    for step, args in steps:
        if step == "COPY":
            *sources, _ = [a for a in args.split() if not a.startswith("--")]
            assert all((ROOT / s).exists() for s in sources), f"COPY {args}: a source is missing"


def test_the_rayjob_puts_operators_on_autoscaled_workers_not_the_head() -> None:
    cluster = _rayjob()["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", (
        "the head must offer no CPU, so operators go to workers"
    )
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 < group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        cpus = group["rayStartParams"]["num-cpus"]
        assert float(cpus) > 0 and cpus == container["resources"]["limits"]["cpu"], (
            f"worker group {group['groupName']}: num-cpus {cpus} must be its container's CPU limit"
        )


def test_the_rayjob_reaches_the_bucket_that_seaweedfs_creates_with_the_secrets_credentials() -> (
    None
):
    job = _rayjob()
    storage = _seaweedfs()
    secret, service = storage["Secret"], storage["Service"]
    assert job["metadata"]["namespace"] == secret["metadata"]["namespace"]
    for container in _containers(job):
        env = {e["name"]: e for e in container["env"]}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"]
            assert ref["key"] in secret["stringData"]
        host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
        assert (
            env["AWS_ENDPOINT_URL"]["value"]
            == f"http://{host}:{service['spec']['ports'][0]['port']}"
        )
    (bucket,) = re.findall(r"--s3 s3://([^/\s]+)", job["spec"]["entrypoint"])
    weed = storage["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert f"-bucket={bucket}" in weed["args"], "the S3 server must create the job's bucket"
    assert weed["readinessProbe"]["httpGet"]["path"] == f"/buckets/{bucket}/", (
        "the server must be ready only once the bucket exists"
    )


def test_the_s3_deployment_serves_port_8333_with_enforced_credentials() -> None:
    kinds = _seaweedfs()
    assert {"Namespace", "Secret", "Deployment", "Service"} <= set(kinds)
    assert kinds["Service"]["spec"]["ports"][0]["port"] == 8333
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"] for e in container["env"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
