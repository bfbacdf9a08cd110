"""The actor that holds what ``rf.testing.Collect`` sinks committed.

It is owned by the driver, not by the coordinator, so committed output
survives a coordinator restart. Commits are keyed by (step, partition, run,
checkpoint), which makes a re-issued commit a no-op, and a commit of a new
run a new one whatever its checkpoint id.
"""

from __future__ import annotations

from typing import Any


class Collector:
    def __init__(self) -> None:
        # step -> partition -> [(run, checkpoint id, records)] in commit order
        self._committed: dict[str, dict[int, list[tuple[str, int, list[Any]]]]] = {}
        self._seen: set[tuple[str, int, str, int]] = set()

    def commit(
        self, step: str, partition: int, run: str, checkpoint_id: int, records: list[Any]
    ) -> bool:
        """Store one committed batch; False if it was committed before."""
        key = (step, partition, run, checkpoint_id)
        if key in self._seen:
            return False
        self._seen.add(key)
        self._committed.setdefault(step, {}).setdefault(partition, []).append(
            (run, checkpoint_id, records)
        )
        return True

    def output(self, step: str) -> list[Any]:
        """Committed records of a sink: partition by partition, in commit order."""
        parts = self._committed.get(step, {})
        out: list[Any] = []
        for partition in sorted(parts):
            for _, _, records in parts[partition]:
                out.extend(records)
        return out

    def by_partition(self, step: str) -> dict[int, list[Any]]:
        """Committed records of a sink per partition, each in commit order."""
        return {
            p: [r for _, _, records in commits for r in records]
            for p, commits in self._committed.get(step, {}).items()
        }

    def steps(self) -> list[str]:
        return sorted(self._committed)
