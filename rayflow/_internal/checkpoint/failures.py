"""Counting failed checkpoints: too many in a row fail the job."""

from __future__ import annotations


class CheckpointFailureManager:
    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total = 0
        self.reasons: list[str] = []

    def failed(self, reason: str) -> bool:
        """Record a failure; True when the job should fail because of it."""
        self.consecutive += 1
        self.total += 1
        self.reasons.append(reason)
        del self.reasons[: -self.max_consecutive]
        return self.consecutive >= self.max_consecutive

    def succeeded(self) -> None:
        self.consecutive = 0
        self.reasons.clear()
