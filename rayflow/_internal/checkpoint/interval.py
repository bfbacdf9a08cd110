"""The checkpoint interval in force with ``Checkpointing(interval_s="auto")``.

Two bounds, re-read after every checkpoint and every load sample, so the
interval follows the job as its state and its input drift:

- overhead: a checkpoint may be in flight at most ``max_overhead`` of the
  time, so the interval is at least the (smoothed) checkpoint duration
  divided by it. Larger state, longer checkpoints, a longer interval.
- replay: after a failure the job replays the input since the last
  checkpoint. Replaying ``I`` seconds of input at full speed takes about
  ``I`` times the busiest stage's busy fraction, so the interval is at most
  ``max_replay_s`` divided by that fraction.

When the two disagree, the overhead bound wins (a checkpoint cannot be made
cheaper by taking it more often) and ``bound`` says so.
"""

from __future__ import annotations

#: The interval while nothing is measured yet, and the smallest it becomes.
START_S = 1.0
MIN_S = 0.1
#: Weight of a new sample in the smoothed checkpoint duration.
ALPHA = 0.3


class IntervalChooser:
    def __init__(self, max_replay_s: float, max_overhead: float):
        self.max_replay_s = max_replay_s
        self.max_overhead = max_overhead
        self.duration_s: float | None = None
        self.busy = 1.0  # the busiest stage's busy fraction (1: assume the worst)
        self.interval_s = min(START_S, max_replay_s)
        self.bound = "start"

    def checkpoint_took(self, seconds: float) -> float:
        if self.duration_s is None:
            self.duration_s = seconds
        else:
            self.duration_s += ALPHA * (seconds - self.duration_s)
        return self._choose()

    def load(self, busy_fraction: float) -> float:
        self.busy = min(1.0, max(0.0, busy_fraction))
        return self._choose()

    def _choose(self) -> float:
        high = self.max_replay_s / max(self.busy, 0.05)
        if self.duration_s is None:
            self.interval_s = min(START_S, high)
            self.bound = "start"
            return self.interval_s
        low = max(MIN_S, self.duration_s / self.max_overhead)
        if low <= high:
            self.interval_s, self.bound = low, "overhead"
        else:
            self.interval_s, self.bound = low, "overhead (over max_replay_s)"
        return self.interval_s
