"""Test session setup.

Ray is started once per session (it takes seconds), privately, with every
listener on 127.0.0.1 and its files in a temp folder of this run. Unit
tests never touch it; integration tests ask for the ``ray_session`` fixture.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

# Set before Ray is imported anywhere: Ray reads them at import and init.
_RAY_TMP = tempfile.mkdtemp(prefix="rf-ray-", dir="/tmp")
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_TMPDIR"] = _RAY_TMP
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    import ray

    ray.init(address="local", include_dashboard=False, num_cpus=2, log_to_driver=True)
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(_RAY_TMP, ignore_errors=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_RAY_TMP, ignore_errors=True)
