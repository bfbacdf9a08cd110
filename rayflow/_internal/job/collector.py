"""The actor that holds what ``rf.testing.Collect`` sinks committed.

One per driver, shared by the jobs it starts (each under a key of its own
start), and owned by the driver, not by a coordinator, so committed output
survives a coordinator restart. One actor per driver rather than one per
job: every actor is a Ray worker process of its own, 0.64 s of CPU to start
with rayflow's modules preloaded (``benchmarks/worker_cost.py``, 2 cores),
and most test and notebook jobs collect. Commits are keyed by (step, partition, run,
checkpoint), which makes a re-issued commit a no-op, and a commit of a new
run a new one whatever its checkpoint id. A job's share is dropped once its
result took it (``forget``).
"""

from __future__ import annotations

from typing import Any


class _Collected:
    """What one start of a job committed."""

    def __init__(self) -> None:
        # step -> partition -> [(run, checkpoint id, records)] in commit order
        self.committed: dict[str, dict[int, list[tuple[str, int, list[Any]]]]] = {}
        self.seen: set[tuple[str, int, str, int]] = set()


class Collector:
    def __init__(self) -> None:
        self._jobs: dict[str, _Collected] = {}

    def commit(
        self,
        key: str,
        step: str,
        partition: int,
        run: str,
        checkpoint_id: int,
        records: list[Any],
    ) -> bool:
        """Store one committed batch of the job start ``key``; False if it was committed
        before."""
        job = self._jobs.setdefault(key, _Collected())
        seen = (step, partition, run, checkpoint_id)
        if seen in job.seen:
            return False
        job.seen.add(seen)
        job.committed.setdefault(step, {}).setdefault(partition, []).append(
            (run, checkpoint_id, records)
        )
        return True

    def _steps(self, key: str) -> dict[str, dict[int, list[tuple[str, int, list[Any]]]]]:
        job = self._jobs.get(key)
        return {} if job is None else job.committed

    def output(self, key: str, step: str) -> list[Any]:
        """Committed records of a sink: partition by partition, in commit order."""
        parts = self._steps(key).get(step, {})
        out: list[Any] = []
        for partition in sorted(parts):
            for _, _, records in parts[partition]:
                out.extend(records)
        return out

    def by_partition(self, key: str, step: str) -> dict[int, list[Any]]:
        """Committed records of a sink per partition, each in commit order."""
        return {
            p: [r for _, _, records in commits for r in records]
            for p, commits in self._steps(key).get(step, {}).items()
        }

    def keys(self) -> list[str]:
        """The job starts whose output is held."""
        return sorted(self._jobs)

    def forget(self, key: str) -> None:
        """Drop what the job start ``key`` committed (its result has it, or it failed)."""
        self._jobs.pop(key, None)
