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


def final_counts(folder: Any) -> dict[Any, int]:
    """A JsonLines folder of ``reduce`` updates ``(key, count)``: each key's last count."""
    import json
    from pathlib import Path

    totals: dict[Any, int] = {}
    for part in sorted(Path(folder).glob("part-*.jsonl")):
        for line in part.read_text().splitlines():
            key, count = json.loads(line)
            totals[key] = max(totals.get(key, 0), count)
    return totals


def expected_words() -> dict[str, int]:
    """What jobs/wordcount.py must count in the sample texts it ships."""
    import sys
    from collections import Counter
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "jobs"))
    from wordcount import tokenize

    expected: Counter[str] = Counter()
    for path in sorted((root / "jobs" / "data").glob("*.txt")):
        for line in path.read_text().splitlines():
            expected.update(tokenize(line))
    return dict(expected)
