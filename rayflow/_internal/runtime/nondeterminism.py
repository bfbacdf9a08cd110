"""``ctx.now()`` and ``ctx.random()``: values user code may depend on, logged and replayed.

A partition restarted alone (partial recovery) must produce the same output
as the first run up to what its receivers consumed. Wall-clock time and
random numbers would differ, so the values the first run drew go into the
partition's causal log (causal.py) between the input channel entries, travel
with its messages, and the restarted partition gets them back in the same
order before it draws new ones.
"""

from __future__ import annotations

import random
import time
from collections import deque
from typing import Any

from rayflow._internal.runtime.causal import CausalLog


class Recorder:
    """Draws (and logs) values, or hands back the logged ones during a replay."""

    __slots__ = ("_rng", "log", "replay")

    def __init__(self) -> None:
        self.log: CausalLog | None = None
        self.replay: deque[Any] = deque()
        self._rng = random.Random()

    def now(self) -> float:
        return self._value(time.time)

    def random(self) -> float:
        return self._value(self._rng.random)

    def _value(self, draw: Any) -> float:
        replay = self.replay
        if replay and isinstance(replay[0], float):
            return float(replay.popleft())
        value = float(draw())
        if self.log is not None:
            self.log.entries.append(value)
        return value


#: The recorder of the task this process runs (one operator actor per process).
CURRENT = Recorder()
