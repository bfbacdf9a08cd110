"""Judging failed checkpoints: the job fails once none completed for too long.

Tolerance is measured in time (``max_checkpoint_gap_s``), not in attempts,
since the number of attempts depends on the interval and the backoff; an
attempt count (``max_consecutive_failures``) can be added, and then
whichever limit is reached first fails the job.
"""

from __future__ import annotations

import time


class CheckpointFailureManager:
    def __init__(
        self,
        max_consecutive: int | None = None,
        max_gap_s: float | None = None,
        *,
        now: float | None = None,
    ):
        self.max_consecutive = max_consecutive
        self.max_gap_s = max_gap_s
        self.consecutive = 0
        self.total = 0
        self.reasons: list[str] = []
        self.last_success = time.monotonic() if now is None else now  # or the start

    def failed(self, reason: str, now: float | None = None) -> str | None:
        """Record a failure; a message if the job should fail because of it."""
        now = time.monotonic() if now is None else now
        self.consecutive += 1
        self.total += 1
        self.reasons.append(reason)
        del self.reasons[:-10]
        if self.max_consecutive is not None and self.consecutive >= self.max_consecutive:
            return (
                f"{self.consecutive} checkpoints failed in a row (the limit is "
                f"Checkpointing.max_consecutive_failures={self.max_consecutive}); the last: "
                f"{reason}"
            )
        gap = now - self.last_success
        if self.max_gap_s is not None and gap > self.max_gap_s:
            return (
                f"no checkpoint completed for {gap:.0f} s (the limit is "
                f"Checkpointing.max_checkpoint_gap_s={self.max_gap_s:g}); {self.consecutive} "
                f"attempts failed, the last: {reason}"
            )
        return None

    def succeeded(self, now: float | None = None) -> None:
        self.consecutive = 0
        self.reasons.clear()
        self.last_success = time.monotonic() if now is None else now

    def restarted(self, now: float | None = None) -> None:
        """A restart: the gap counts from it (the restored checkpoint is complete)."""
        self.last_success = time.monotonic() if now is None else now
