"""Helpers shared by the tests (not part of rayflow)."""

from __future__ import annotations

import time
from typing import Any


def wait_for(predicate: Any, timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something true; return that, or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s"
        time.sleep(0.05)
