"""Test session setup.

Ray is started once per session (it takes seconds), privately, with every
listener on 127.0.0.1 and its files in a temp folder of this run. Unit
tests never touch it; integration tests ask for the ``ray_session`` fixture.

The S3 tests run against a real S3-compatible server (SeaweedFS ``weed
mini``) on loopback with enforced credentials, started on first use and
stopped by pid at the end. Its address and credentials go into the
environment now, before Ray starts, so that Ray's workers inherit them.
"""

from __future__ import annotations

import compileall
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "infra"))

import local_s3  # noqa: E402

from tests.support.fault_proxy import FaultProxy  # noqa: E402
from tests.support.kafka_broker import KafkaBroker  # noqa: E402

# Set before Ray is imported anywhere: Ray reads them at import and init.
_RAY_TMP = tempfile.mkdtemp(prefix="rf-ray-", dir="/tmp")
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_TMPDIR"] = _RAY_TMP
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Test jobs run back to back: idle workers for the next one start while a job runs
# (rayflow/_internal/job/warm.py; off by default, it competes with early recoveries).
# It saves the suite ~1 minute of waiting for worker processes.
os.environ.setdefault("RAYFLOW_WARM_DURING_S", "1")

# Every Ray worker process imports rayflow (Ray's preload, then the actor's modules).
# Under PYTHONDONTWRITEBYTECODE (set in some sandboxes) an editable install has no
# bytecode cache, so each worker compiled rayflow's sources anew: 0.78 s of CPU per
# worker instead of 0.64 s (benchmarks/worker_cost.py), in every worker the suite
# starts. Compile them once; Python reads caches whatever that variable says.
compileall.compile_dir(ROOT / "rayflow", quiet=1)

S3_BUCKET = "rayflow-test"
_S3 = local_s3.LocalS3(
    os.path.join(_RAY_TMP, "s3"),
    port=local_s3.find_free_base(),
    access_key="rayflow-test-key",
    secret_key="rayflow-test-secret",
)
os.environ.update(_S3.env())
# rayflow reaches the server through a proxy that tests can make slow or flaky
# (tests/support/fault_proxy.py); by default it passes everything through.
_PROXY = FaultProxy(_S3.port)
os.environ["AWS_ENDPOINT_URL"] = _PROXY.endpoint
# Tests stop the server on purpose: fail fast instead of retrying for a minute.
os.environ["RAYFLOW_S3_CONNECT_TIMEOUT"] = "1"
os.environ["RAYFLOW_S3_READ_TIMEOUT"] = "5"


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    import ray

    from rayflow._internal.job.warm import preload_in_new_ray

    preload_in_new_ray()  # as rayflow does when it starts a Ray itself
    ray.init(address="local", include_dashboard=False, num_cpus=2, log_to_driver=True)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[local_s3.LocalS3]:
    _S3.start()
    _S3.create_bucket(S3_BUCKET)
    _PROXY.start()
    try:
        yield _S3
    finally:
        _PROXY.stop()
        _S3.stop(grace_s=0)  # the session's end: its data goes with the temp folder


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """A Kafka-compatible broker (tansu, in memory) on loopback, started on first use and
    stopped by pid. ``filters_aborted`` says whether its read_committed consumers skip
    aborted transactions (tansu 0.6.0's do not: tests/support/kafka_broker.py)."""
    broker = KafkaBroker(tmp_path_factory.mktemp("kafka")).start()
    try:
        yield broker.probe()
    finally:
        broker.stop()


@pytest.fixture
def s3_proxy(s3_server: local_s3.LocalS3) -> Iterator[FaultProxy]:
    """The proxy between rayflow and the S3 server; back to pass-through afterwards."""
    _PROXY.clear()
    try:
        yield _PROXY
    finally:
        _PROXY.clear()


@pytest.fixture(params=["local", "s3"])
def storage_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh checkpoint storage: a local folder, or a prefix on the S3 server."""
    if request.param == "local":
        return str(tmp_path / "checkpoints")
    request.getfixturevalue("s3_server")
    return f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:12]}"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--chaos-full",
        action="store_true",
        help="run the chaos matrix with five seeds per scenario instead of one",
    )
    parser.addoption(
        "--chaos-seeds",
        default="",
        help="comma-separated seeds for the chaos matrix (reproduce one run), e.g. 3,4",
    )
    parser.addoption(
        "--chaos-unaligned-only",
        action="store_true",
        help="with --chaos-full, run only the unaligned variants of the scenarios",
    )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _S3.stop(grace_s=0)  # if the fixture did not (a graceful stop takes ~2.3 s)
    shutil.rmtree(_RAY_TMP, ignore_errors=True)
