from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _ray(ray_session: None) -> None:
    """Every integration test runs on the session's shared local Ray."""
