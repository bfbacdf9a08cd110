"""The actor that holds what ``rf.testing.Collect`` sinks committed.

It is owned by the driver, not by the coordinator, so committed output
survives a coordinator restart. Commits are keyed by (step, partition,
checkpoint), which makes a re-issued commit a no-op.
"""

from __future__ import annotations

from typing import Any


class Collector:
    def __init__(self) -> None:
        # step -> partition -> checkpoint id -> records
        self._committed: dict[str, dict[int, dict[int, list[Any]]]] = {}

    def commit(self, step: str, partition: int, checkpoint_id: int, records: list[Any]) -> bool:
        """Store one committed batch; False if it was committed before."""
        parts = self._committed.setdefault(step, {}).setdefault(partition, {})
        if checkpoint_id in parts:
            return False
        parts[checkpoint_id] = records
        return True

    def output(self, step: str) -> list[Any]:
        """Committed records of a sink: partition by partition, in commit order."""
        parts = self._committed.get(step, {})
        out: list[Any] = []
        for partition in sorted(parts):
            for checkpoint_id in sorted(parts[partition]):
                out.extend(parts[partition][checkpoint_id])
        return out

    def steps(self) -> list[str]:
        return sorted(self._committed)
