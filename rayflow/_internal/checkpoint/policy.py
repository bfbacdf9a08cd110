"""When to start the next checkpoint: interval, minimum pause, backoff, one at a time."""

from __future__ import annotations

import random
import time


class TriggerPolicy:
    def __init__(self, interval_s: float, min_pause_s: float, *, now: float | None = None):
        self.interval_s = interval_s
        self.min_pause_s = min_pause_s
        # The first checkpoint is due one interval after the policy starts.
        self.epoch = time.monotonic() if now is None else now
        self.last_start: float | None = None
        self.last_end: float | None = None
        self.backoff_s = 0.0  # after failures: at least this long after the last one ended

    def started(self, now: float) -> None:
        self.last_start = now

    def ended(self, now: float) -> None:
        self.last_end = now

    def backoff(self, failures: int, max_backoff_s: float) -> None:
        """After ``failures`` in a row, wait exponentially longer (with jitter), up to a cap."""
        if failures <= 0:
            self.backoff_s = 0.0
            return
        base = min(self.interval_s * 2 ** (failures - 1), max_backoff_s)
        self.backoff_s = base * random.uniform(0.8, 1.0)

    def next_due(self, now: float) -> float:
        """The time (monotonic) at which the next periodic checkpoint may start."""
        if self.last_start is None:
            return self.epoch + self.interval_s
        due = self.last_start + self.interval_s
        if self.last_end is not None:
            due = max(due, self.last_end + self.min_pause_s, self.last_end + self.backoff_s)
        return due
