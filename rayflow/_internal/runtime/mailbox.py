"""The receiving side of channels: a bounded, per-channel ordered mailbox.

Ray may run an actor's incoming calls in any order, so every batch carries
its channel's sequence number; the mailbox releases each channel's batches
strictly in sequence order and drops duplicates. Senders only send while
they hold credits (see ``channels.py``); a batch's credit returns to its
sender when the batch leaves the mailbox, which is when the ``done`` future
resolves and the sender's push call returns.

Channels can be *blocked* (barrier alignment): their batches stay queued,
in order, while other channels are served.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from rayflow._internal.plan import ChannelId

DATA = 0
BARRIER = 1
EOS = 2
WATERMARK = 3  # payload (watermark, idle): event time on this channel


@dataclass(slots=True)
class Envelope:
    channel: ChannelId
    seq: int
    kind: int
    payload: Any
    size: int
    done: asyncio.Future[None] | None = None
    records: int = 0
    meta: Any = None  # local recovery: (generation, first record index, causal entries)


class Mailbox:
    """Bounded inbox of one operator partition.

    ``capacity_batches`` and ``capacity_bytes`` are shared evenly by the
    input channels as credits (each channel gets at least one batch); a
    single batch larger than its channel's byte credit is admitted alone, so
    an outsized record cannot deadlock a channel.
    """

    def __init__(self, channels: Iterable[ChannelId], capacity_batches: int, capacity_bytes: int):
        self.channels: list[ChannelId] = list(channels)
        n = max(1, len(self.channels))
        self.credit_batches = max(1, capacity_batches // n)
        self.credit_bytes = max(1, capacity_bytes // n)
        self.capacity_batches = self.credit_batches * n
        self.capacity_bytes = self.credit_bytes * n
        self._next_seq: dict[ChannelId, int] = dict.fromkeys(self.channels, 0)
        self._early: dict[ChannelId, dict[int, Envelope]] = {c: {} for c in self.channels}
        self._queues: dict[ChannelId, deque[Envelope]] = {c: deque() for c in self.channels}
        self._order: deque[ChannelId] = deque()  # one token per queued envelope
        self._deferred: deque[ChannelId] = deque()  # tokens of blocked channels
        self._blocked: set[ChannelId] = set()
        self._ready = asyncio.Event()
        self.depth = 0
        self.bytes = 0
        self.records = 0  # records in the queued batches (as their senders counted them)
        self.peak_depth = 0
        self.peak_bytes = 0

    # -- receiving ---------------------------------------------------------

    def offer(
        self,
        channel: ChannelId,
        seq: int,
        kind: int,
        payload: Any,
        size: int,
        records: int = 0,
        meta: Any = None,
    ) -> asyncio.Future[None] | None:
        """Accept a batch; return a future that resolves when it is consumed.

        Returns ``None`` for a duplicate (a sequence number seen before).
        """
        try:
            expected = self._next_seq[channel]
        except KeyError:
            raise ValueError(
                f"batch on unknown channel {channel}; this mailbox reads {self.channels}"
            ) from None
        early = self._early[channel]
        if seq < expected or seq in early:
            return None
        done = asyncio.get_running_loop().create_future()
        env = Envelope(channel, seq, kind, payload, size, done, records, meta)
        self.depth += 1
        self.bytes += size
        self.records += records
        self.peak_depth = max(self.peak_depth, self.depth)
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        if seq != expected:
            early[seq] = env
            return env.done
        self._enqueue(env)
        expected += 1
        while expected in early:
            self._enqueue(early.pop(expected))
            expected += 1
        self._next_seq[channel] = expected
        return env.done

    def _enqueue(self, env: Envelope) -> None:
        self._queues[env.channel].append(env)
        if env.channel in self._blocked:
            self._deferred.append(env.channel)
        else:
            self._order.append(env.channel)
            self._ready.set()

    # -- consuming ---------------------------------------------------------

    def pop(self) -> Envelope | None:
        """The next deliverable envelope of an unblocked channel, or None."""
        order = self._order
        while order:
            channel = order.popleft()
            if channel in self._blocked:
                self._deferred.append(channel)
                continue
            return self._take(channel)
        self._ready.clear()
        return None

    def _take(self, channel: ChannelId) -> Envelope:
        """Dequeue the next envelope of ``channel`` and release its sender's credit."""
        env = self._queues[channel].popleft()
        self.depth -= 1
        self.bytes -= env.size
        self.records -= env.records
        if env.done is not None and not env.done.done():
            env.done.set_result(None)
        return env

    def pop_from(self, channel: ChannelId) -> Envelope | None:
        """The next envelope of ``channel`` (blocked or not), or None if none arrived yet
        (a restarted partition taking its input in a logged order)."""
        queue = self._queues[channel]
        if not queue:
            return None
        if channel in self._blocked:
            self._deferred.remove(channel)
        else:
            self._order.remove(channel)
        return self._take(channel)

    async def wait(self, timeout: float | None) -> None:
        """Wait until something may be deliverable (or a poke), at most ``timeout`` seconds.

        The event is cleared only by ``pop`` finding nothing, so a poke that
        comes in between is never lost.
        """
        if self._order:
            return
        if timeout == 0.0:
            await asyncio.sleep(0)
            return
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def poke(self) -> None:
        """Wake a waiting consumer (it has control work to do)."""
        self._ready.set()

    def clear_ready(self) -> None:
        if not self._order:
            self._ready.clear()

    # -- alignment ---------------------------------------------------------

    def block(self, channel: ChannelId) -> None:
        self._blocked.add(channel)

    def unblock_all(self) -> None:
        self._blocked.clear()
        if self._deferred:
            # Deferred tokens go first: they arrived before the ones queued now.
            self._order.extendleft(reversed(self._deferred))
            self._deferred.clear()
            self._ready.set()

    @property
    def blocked(self) -> frozenset[ChannelId]:
        return frozenset(self._blocked)

    def expected_seq(self, channel: ChannelId) -> int:
        return self._next_seq[channel]

    def next_unconsumed(self, channel: ChannelId) -> int:
        """The sequence number of the next envelope of ``channel`` to be popped."""
        queue = self._queues[channel]
        return queue[0].seq if queue else self._next_seq[channel]

    def unconsumed(self, channel: ChannelId) -> list[Envelope]:
        """Every envelope of ``channel`` that arrived and was not popped, in sequence order."""
        queued = list(self._queues[channel])
        return queued + [self._early[channel][s] for s in sorted(self._early[channel])]

    def reset_channel(self, channel: ChannelId, next_seq: int = 0) -> None:
        """Its sender was replaced: drop what it sent and not consumed, and expect
        ``next_seq`` next (the new sender numbers its messages afresh)."""
        queue = self._queues[channel]
        early = self._early[channel]
        for env in [*queue, *early.values()]:
            self.depth -= 1
            self.bytes -= env.size
            self.records -= env.records
            if env.done is not None and not env.done.done():
                env.done.set_result(None)
        queue.clear()
        early.clear()
        self._order = deque(c for c in self._order if c != channel)
        self._deferred = deque(c for c in self._deferred if c != channel)
        self._blocked.discard(channel)
        self._next_seq[channel] = next_seq

    def clear(self) -> None:
        """Drop everything (a reset to a checkpoint); pending senders are released."""
        for queue in self._queues.values():
            for env in queue:
                if env.done is not None and not env.done.done():
                    env.done.set_result(None)
            queue.clear()
        for early in self._early.values():
            for env in early.values():
                if env.done is not None and not env.done.done():
                    env.done.set_result(None)
            early.clear()
        self._order.clear()
        self._deferred.clear()
        self._blocked.clear()
        self._next_seq = dict.fromkeys(self.channels, 0)
        self.depth = 0
        self.bytes = 0
        self.records = 0
