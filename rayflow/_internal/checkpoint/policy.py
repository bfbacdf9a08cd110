"""When to start the next checkpoint: interval, minimum pause, one at a time."""

from __future__ import annotations

import time


class TriggerPolicy:
    def __init__(self, interval_s: float, min_pause_s: float, *, now: float | None = None):
        self.interval_s = interval_s
        self.min_pause_s = min_pause_s
        # The first checkpoint is due one interval after the policy starts.
        self.epoch = time.monotonic() if now is None else now
        self.last_start: float | None = None
        self.last_end: float | None = None

    def started(self, now: float) -> None:
        self.last_start = now

    def ended(self, now: float) -> None:
        self.last_end = now

    def next_due(self, now: float) -> float:
        """The time (monotonic) at which the next periodic checkpoint may start."""
        if self.last_start is None:
            return self.epoch + self.interval_s
        due = self.last_start + self.interval_s
        if self.last_end is not None:
            due = max(due, self.last_end + self.min_pause_s)
        return due
