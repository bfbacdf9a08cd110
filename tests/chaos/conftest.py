from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _ray(ray_session: None) -> None:
    """Chaos tests kill actors of the session's shared local Ray (never other processes)."""
