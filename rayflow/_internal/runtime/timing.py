"""Where an operator's time goes: busy, idle or back-pressured (as Flink reports).

The actor's loop is always in exactly one of the three modes; switching is
one ``perf_counter`` call, so it is cheap enough to do per batch. Rates
("milliseconds per second busy", records per second) are computed over a
sliding window of cumulative samples.
"""

from __future__ import annotations

import time
from collections import deque

BUSY = 0
IDLE = 1
BACKPRESSURED = 2


class TimeAccount:
    __slots__ = ("_mode", "_since", "_totals")

    def __init__(self) -> None:
        self._totals = [0.0, 0.0, 0.0]
        self._mode = BUSY
        self._since = time.perf_counter()

    def switch(self, mode: int) -> int:
        """Enter ``mode``; return the previous mode (to switch back to)."""
        now = time.perf_counter()
        previous = self._mode
        self._totals[previous] += now - self._since
        self._since = now
        self._mode = mode
        return previous

    def totals(self) -> tuple[float, float, float]:
        """Seconds spent busy, idle and back-pressured so far (including now)."""
        t = list(self._totals)
        t[self._mode] += time.perf_counter() - self._since
        return t[0], t[1], t[2]


class RateWindow:
    """Per-second rates of cumulative counters over the last ``window_s`` seconds."""

    def __init__(self, window_s: float = 2.0, min_gap_s: float = 0.2):
        self.window_s = window_s
        self.min_gap_s = min_gap_s
        self._samples: deque[tuple[float, tuple[float, ...]]] = deque()

    def due(self) -> bool:
        """Whether a new sample would be kept now."""
        return not self._samples or time.monotonic() - self._samples[-1][0] >= self.min_gap_s

    def rates(self, values: tuple[float, ...]) -> tuple[float, ...]:
        """Record ``values`` now and return their rates per second over the window."""
        now = time.monotonic()
        samples = self._samples
        if not samples or now - samples[-1][0] >= self.min_gap_s:
            samples.append((now, values))
        # Keep one sample at least window_s old as the base of the rate.
        while len(samples) > 2 and now - samples[1][0] >= self.window_s:
            samples.popleft()
        base_t, base = samples[0]
        dt = now - base_t
        if dt <= 0:
            return tuple(0.0 for _ in values)
        return tuple((v - b) / dt for v, b in zip(values, base, strict=True))
