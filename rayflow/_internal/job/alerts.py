"""Alerts: what a person watching the job should know, decided from its metrics.

The job coordinator feeds an :class:`AlertMonitor` the operators' metrics
and the checkpoint figures about once a second; the monitor keeps the
alerts that are active, each from the moment its condition began, and
reports every one that fires or clears (the coordinator logs them; the
driver exports them through OpenTelemetry and shows them).

Kinds (``handle.alerts()`` lists the active ones as ``{kind, step,
partition, since, message}``):

- ``stalled``: a partition has input waiting (or is inside user code) and
  has taken no record for ``stall_after_s`` (a function stuck in a call).
- ``backlog_growing``: a source partition's backlog (records due but not
  read: a rate-limited generator behind its schedule, a log's lag) grew over
  the last ``backlog_window_s``.
- ``checkpoint_failing``: the last checkpoint(s) failed; the message names
  the cause.
- ``hot_key``: one key group takes ``hot_share`` or more of a partition's
  records (the message names the group and its busiest keys).
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

KINDS = ("backlog_growing", "stalled", "checkpoint_failing", "hot_key")
#: A backlog must grow by at least this many records to count as growing.
BACKLOG_MIN_GROWTH = 100


@dataclass
class Alert:
    kind: str
    step: str | None
    partition: int | None
    since: float
    message: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


Key = tuple[str, str | None, int | None]


class AlertMonitor:
    def __init__(
        self,
        job: str,
        *,
        stall_after_s: float = 30.0,
        backlog_window_s: float = 10.0,
        hot_share: float = 0.5,
        hot_min_records: int = 500,
    ):
        self.job = job
        self.stall_after_s = stall_after_s
        self.backlog_window_s = backlog_window_s
        self.hot_share = hot_share
        self.hot_min_records = hot_min_records
        self._active: dict[Key, Alert] = {}
        self._progress: dict[tuple[str, int], tuple[int, float]] = {}  # records_in, since
        self._backlog: dict[tuple[str, int], deque[tuple[float, float]]] = {}

    def active(self) -> list[dict[str, Any]]:
        return [a.as_dict() for a in sorted(self._active.values(), key=lambda a: a.since)]

    def observe(
        self,
        now: float,
        metrics: dict[str, list[dict[str, Any]]],
        checkpoints: dict[str, Any] | None,
    ) -> list[tuple[str, Alert]]:
        """Update from one sample; returns ``("fired"|"cleared", alert)`` for what changed."""
        wanted: dict[Key, Alert] = {}
        for step, entries in metrics.items():
            for entry in entries:
                partition = int(entry["partition"])
                for alert in (
                    self._stalled(now, step, partition, entry),
                    self._backlog_growing(now, step, partition, entry),
                    self._hot_key(now, step, partition, entry),
                ):
                    if alert is not None:
                        wanted[(alert.kind, step, partition)] = alert
        failing = self._checkpoint_failing(now, checkpoints)
        if failing is not None:
            wanted[(failing.kind, None, None)] = failing
        changes: list[tuple[str, Alert]] = []
        for key, alert in wanted.items():
            current = self._active.get(key)
            if current is None:
                self._active[key] = alert
                changes.append(("fired", alert))
            else:
                current.message = alert.message  # keep when it began; refresh the figures
        for key in [k for k in self._active if k not in wanted]:
            changes.append(("cleared", self._active.pop(key)))
        return changes

    # -- the rules -------------------------------------------------------------

    def _since(self, kind: str, step: str | None, partition: int | None, now: float) -> float:
        current = self._active.get((kind, step, partition))
        return current.since if current is not None else now

    def _stalled(
        self, now: float, step: str, partition: int, entry: dict[str, Any]
    ) -> Alert | None:
        if "inflight_records" not in entry:
            return None  # not the head of its stage: its input is the head's
        key = (step, partition)
        taken = int(entry.get("records_in", 0))
        previous = self._progress.get(key)
        if previous is None or previous[0] != taken:
            self._progress[key] = (taken, now)
            return None
        waiting = int(entry.get("inflight_records") or 0)
        inside = float(entry.get("in_user_code_s") or 0.0)
        still = now - previous[1]
        if (waiting <= 0 and inside <= 0) or still < self.stall_after_s:
            return None
        message = (
            f"step {step!r} partition {partition} has taken no record for {still:.0f} s "
            f"with {waiting:,} record(s) waiting"
        )
        if inside > 0:
            message += f"; it has been inside user code for {inside:.0f} s"
        return Alert("stalled", step, partition, previous[1] + self.stall_after_s, message)

    def _backlog_growing(
        self, now: float, step: str, partition: int, entry: dict[str, Any]
    ) -> Alert | None:
        backlog = entry.get("source_backlog")
        if backlog is None:
            return None
        samples = self._backlog.setdefault((step, partition), deque())
        samples.append((now, float(backlog)))
        while len(samples) > 2 and now - samples[1][0] >= self.backlog_window_s:
            samples.popleft()
        if now - samples[0][0] < self.backlog_window_s * 0.9:
            return None
        first = samples[0][1]
        recent = [v for t, v in samples if t >= now - self.backlog_window_s / 2]
        last = samples[-1][1]
        # Grown by half at least, and by more than a read's worth of noise, and
        # still above where the window began (not a spike that came back down).
        if not (last >= first * 1.5 and last - first >= BACKLOG_MIN_GROWTH and min(recent) > first):
            return None
        rate = (last - first) / max(1e-9, now - samples[0][0])
        message = (
            f"the backlog of source {step!r} partition {partition} grew from {first:,.0f} to "
            f"{last:,.0f} records in {now - samples[0][0]:.0f} s ({rate:,.0f}/s): the job "
            "does not keep up with its input"
        )
        since = self._since("backlog_growing", step, partition, now)
        return Alert("backlog_growing", step, partition, since, message)

    def _hot_key(
        self, now: float, step: str, partition: int, entry: dict[str, Any]
    ) -> Alert | None:
        groups = entry.get("hot_key_groups")
        if not groups or int(entry.get("key_groups") or 0) < 2:
            return None
        top = groups[0]
        share = float(top["share"])
        active = ("hot_key", step, partition) in self._active
        threshold = self.hot_share * (0.8 if active else 1.0)  # hysteresis: no flapping
        if share < threshold or int(entry.get("sampled_records") or 0) < self.hot_min_records:
            return None
        keys = ", ".join(top["keys"])
        message = (
            f"key group {top['group']} takes {share:.0%} of the records of step {step!r} "
            f"partition {partition} (its busiest keys: {keys}); more parallelism will not "
            "spread it: split the key or pre-aggregate it"
        )
        since = self._since("hot_key", step, partition, now)
        return Alert("hot_key", step, partition, since, message)

    def _checkpoint_failing(self, now: float, stats: dict[str, Any] | None) -> Alert | None:
        if not stats or int(stats.get("consecutive_failures") or 0) < 1:
            return None
        failure = stats.get("last_failure") or {}
        n = int(stats["consecutive_failures"])
        message = f"{n} checkpoint(s) in a row failed; the last: {failure.get('reason', 'unknown')}"
        since = self._since("checkpoint_failing", None, None, float(failure.get("time", now)))
        return Alert("checkpoint_failing", None, None, since, message)
