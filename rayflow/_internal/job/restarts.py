"""The restart strategy's bookkeeping: may the job restart, and after what delay?"""

from __future__ import annotations

from collections import deque

from rayflow.config import RestartStrategy
from rayflow.errors import Failure


class RestartTracker:
    def __init__(self, strategy: RestartStrategy | None):
        self.strategy = strategy
        self._times: deque[float] = deque()
        self._streak = 0  # restarts since the last completed checkpoint
        self.history: list[tuple[float, Failure]] = []  # every failure, root cause of each

    def failed(self, now: float, root: Failure) -> float | None:
        """Record a failure; the delay before restarting, or None to give up."""
        self.history.append((now, root))
        strategy = self.strategy
        if strategy is None:
            return None
        self._times.append(now)
        while self._times and now - self._times[0] > strategy.window_s:
            self._times.popleft()
        if len(self._times) > strategy.max_failures:
            return None
        self._streak += 1
        return min(strategy.backoff_s * 2 ** (self._streak - 1), strategy.max_backoff_s)

    def stable(self) -> None:
        """A checkpoint completed after a restart: the backoff starts over."""
        self._streak = 0

    def give_up_message(self) -> str:
        strategy = self.strategy
        if strategy is None:
            return "the job does not restart (it has no checkpointing)"
        return (
            f"{len(self._times)} failures within {strategy.window_s:.0f} s exceed "
            f"RestartStrategy.max_failures={strategy.max_failures}"
        )
