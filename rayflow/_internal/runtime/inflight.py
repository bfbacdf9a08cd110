"""Unaligned checkpoints: the in-flight input that becomes part of a snapshot.

When barrier *n* reaches a task unaligned (it overtakes the queued data),
the task snapshots its state at once, at the position it has processed on
every input channel. What that state has not seen yet, but what comes
before barrier *n* on each channel, is *in flight*: the rest of the batch in
progress, the batches queued in the mailbox, and batches still on the wire.
They are processed as usual and also copied into the snapshot, so that a
restore replays them into the restored state before anything newer.

A channel's in-flight data ends at its barrier's sequence number (or at its
end of stream); the capture is complete when every channel's bound is known
and every batch below it has arrived. Only then is the snapshot uploaded
and acknowledged.
"""

from __future__ import annotations

from typing import Any

from rayflow._internal.plan import ChannelId
from rayflow._internal.runtime.mailbox import DATA, Envelope


class InflightCapture:
    def __init__(self, checkpoint_id: int, channels: list[ChannelId]):
        self.checkpoint_id = checkpoint_id
        self.bounds: dict[ChannelId, int | None] = dict.fromkeys(channels)
        self._start: dict[ChannelId, int] = {}
        self._batches: dict[ChannelId, dict[int, bytes]] = {c: {} for c in channels}
        self._seen: dict[ChannelId, set[int]] = {c: set() for c in channels}
        self.partial: dict[ChannelId, list[Any]] = {}  # the rest of the batch in progress

    def begin(
        self,
        channel: ChannelId,
        next_unconsumed: int,
        waiting: list[Envelope],
        bound: int | None,
    ) -> None:
        """Take what ``channel`` holds now: envelopes from ``next_unconsumed`` on."""
        self._start[channel] = next_unconsumed
        if bound is not None:
            self.bounds[channel] = bound
        for env in waiting:
            self.offer(channel, env.seq, env.kind, env.payload)

    def offer(self, channel: ChannelId, seq: int, kind: int, payload: Any) -> None:
        """A message that arrived (or was waiting) on ``channel``."""
        if channel not in self._start or seq < self._start[channel]:
            return
        bound = self.bounds.get(channel)
        if bound is not None and seq >= bound:
            return
        self._seen[channel].add(seq)
        if kind == DATA:
            self._batches[channel][seq] = payload

    def close(self, channel: ChannelId, seq: int) -> None:
        """``channel`` delivered barrier *n* (or ended) at ``seq``: nothing after is in flight."""
        if self.bounds.get(channel) is None:
            self.bounds[channel] = seq
            self._batches[channel] = {s: p for s, p in self._batches[channel].items() if s < seq}
            self._seen[channel] = {s for s in self._seen[channel] if s < seq}

    @property
    def complete(self) -> bool:
        for channel, bound in self.bounds.items():
            if bound is None:
                return False
            start = self._start.get(channel, bound)
            if len(self._seen[channel]) < bound - start:
                return False
        return True

    def missing(self) -> list[ChannelId]:
        return [c for c, b in self.bounds.items() if b is None]

    def data(self) -> dict[ChannelId, dict[str, Any]]:
        """Per channel: the rest of the batch in progress, then the batches, in order."""
        return {
            channel: {
                "partial": self.partial.get(channel, []),
                "batches": [batches[s] for s in sorted(batches)],
            }
            for channel, batches in self._batches.items()
            if batches or self.partial.get(channel)
        }
