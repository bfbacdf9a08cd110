"""The sending side of channels: batching, sequence numbers and credits.

An :class:`OutputChannel` buffers records for one receiver partition, cuts
them into batches (at most ``batch_size`` records and about ``batch_bytes``
bytes, or whatever has waited ``linger_s``), numbers every batch, and sends
one only while it holds a credit: fewer than the receiver's per-channel
batch credit in flight, and their bytes within its byte credit. A credit
comes back when the receiver takes the batch out of its mailbox (the push
call returns then), so a slow consumer leaves its producers without credits
and they wait: that wait is the back-pressured time.

Routers put records into channels: FORWARD to one channel, REBALANCE
rotating over all, HASH by the key group of each ``(key, value)`` record.

With local recovery on (docs/protocol.md, "Local recovery"), every message
also goes into the sender's :class:`ReplayLog` and carries ``meta``: the
channel's generation (a receiver drops messages of an older sender), the
index of its first record on the channel (a receiver drops records it
already consumed, whatever the batch boundaries of a re-emission), and the
sender's causal log entries not sent on this channel yet. A receiver that
dies does not fail the sender: the channel pauses until the coordinator
reconnects it to the new receiver, which first gets the logged messages
after its checkpoint again.
"""

from __future__ import annotations

import asyncio
import operator
import time
from collections.abc import Callable
from concurrent.futures import Future as ConcurrentFuture
from typing import Any

from rayflow._internal.keygroups import SUPPORTED_KEY_TYPES, KeyRouter, stable_hash
from rayflow._internal.plan import ChannelId
from rayflow._internal.runtime import serde
from rayflow._internal.runtime.causal import CausalCursor, CausalLog
from rayflow._internal.runtime.columns import has_columns, hash_column, partitions_of, split
from rayflow._internal.runtime.mailbox import DATA
from rayflow._internal.runtime.pacing import INITIAL_BATCH
from rayflow._internal.runtime.replay_log import ReplayLog
from rayflow._internal.runtime.timing import BACKPRESSURED, TimeAccount

#: Batches per channel a source may read ahead of what its receivers take.
ROOM_BATCHES = 4

#: Records a channel whose receiver is being replaced (paused) keeps buffered while
#: the sender goes on serving its other channels; past this, the sender waits too.
PAUSED_BUFFER_RECORDS = 200_000

#: Bytes a channel whose receiver died may put into its log unsent ("parked": the
#: replay to the replacement sends them) before a send on it waits for the reconnect.
#: The log spills to local disk, so this bounds disk, not memory.
PARKED_BYTES = 64 << 20

#: Records per turn of a REBALANCE router: a fixed count, so that the same records
#: go to the same receivers when a restarted sender emits them again.
REBALANCE_RECORDS = 1024

#: send(seq, kind, payload, records, meta) -> a future that resolves when the receiver
#: consumed it; its result is the receiver's wish for records per batch (0: none).
#: ``meta`` is None, or (generation, first record index, causal log entries) with
#: local recovery on.
SendFn = Callable[..., "ConcurrentFuture[Any] | asyncio.Future[Any]"]


class ChannelBroken(Exception):
    """A receiver could not be reached (its actor died or the call failed)."""

    def __init__(self, receiver: str, cause: BaseException):
        super().__init__(f"cannot send to {receiver}: {type(cause).__name__}: {cause}")
        self.receiver = receiver
        self.cause = cause


class OutputChannel:
    __slots__ = (
        "_event",
        "_loop",
        "_send",
        "batch_limit",
        "buffer",
        "causal",
        "channel",
        "credit_batches",
        "credit_bytes",
        "credit_max",
        "failure",
        "gen",
        "hint",
        "in_flight",
        "in_flight_bytes",
        "incarnation",
        "key",
        "log",
        "next_seq",
        "parked_bytes",
        "parking",
        "paused",
        "pending",
        "receiver",
        "records_sent",
        "since",
    )

    def __init__(
        self,
        channel: ChannelId,
        receiver: str,
        send: SendFn,
        *,
        credit_batches: int,
        credit_bytes: int,
        batch_size: int,
    ):
        self.channel = channel
        self.receiver = receiver
        self._send = send
        self.credit_max = credit_batches
        self.credit_bytes = credit_bytes
        # Small, and one at a time, until the receiver says what it wants (pacing.py).
        self.credit_batches = 1
        self.batch_limit = min(batch_size, INITIAL_BATCH)
        self.hint = 0  # records per batch the receiver asked for (0: not yet)
        self.pending: list[Any] | None = None  # a batch taken from the buffer, not sent yet
        self.buffer: list[Any] = []
        self.since = 0.0  # when the oldest buffered record arrived
        self.next_seq = 0
        self.in_flight = 0
        self.in_flight_bytes = 0
        self.failure: BaseException | None = None
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        # Local recovery (enable_log): the log key, generation, records sent so far,
        # and whether sending waits for a reconnect (the receiver died) or a replay.
        self.key = (channel[0], receiver)
        self.log: ReplayLog | None = None
        self.causal: CausalCursor | None = None
        self.gen = 0
        self.records_sent = 0
        self.paused = False
        # The receiver died and no replacement is connected yet: messages go into the
        # log only (they are sent by the replay), so that no send waits for a dead actor.
        self.parking = False
        self.parked_bytes = 0
        self.incarnation = 0

    def enable_log(self, log: ReplayLog, gen: int, causal: CausalLog | None) -> None:
        """Local recovery: log every message, and survive the receiver's death."""
        self.log = log
        self.gen = gen
        self.causal = CausalCursor(causal) if causal is not None else None

    def has_credit(self, size: int) -> bool:
        if self.paused:
            return self.parking and self.parked_bytes + size <= PARKED_BYTES
        return self._credit(size)

    def _credit(self, size: int) -> bool:
        if self.in_flight >= self.credit_batches:
            return False
        return self.in_flight == 0 or self.in_flight_bytes + size <= self.credit_bytes

    async def wait_credit(self, size: int) -> None:
        while not self.has_credit(size):
            self._raise_if_broken()
            self._event.clear()
            await self._event.wait()
        self._raise_if_broken()

    def send_now(self, kind: int, payload: Any, size: int, records: int = 0) -> None:
        """Send one message; the caller made sure a credit is held (or it is a priority one)."""
        self._raise_if_broken()
        seq = self.next_seq
        self.next_seq = seq + 1
        meta = None
        log = self.log
        if log is not None:
            if not self.parking:  # parked: the causal entries wait for the replacement
                causal = self.causal
                meta = (self.gen, self.records_sent, causal.take() if causal is not None else None)
            log.append(self.key, seq, kind, payload, (self.records_sent, records))
            self.records_sent += records
        if self.parking:
            # Logged under its number, not sent: the replay to the replacement sends it.
            self.parked_bytes += size
            return
        self._dispatch(seq, kind, payload, size, records, meta)

    def _dispatch(
        self, seq: int, kind: int, payload: Any, size: int, records: int, meta: Any
    ) -> None:
        self.in_flight += 1
        self.in_flight_bytes += size
        if meta is None:
            future = self._send(seq, kind, payload, records)
        else:
            future = self._send(seq, kind, payload, records, meta)
        loop = self._loop
        incarnation = self.incarnation

        def done(f: Any, size: int = size) -> None:
            loop.call_soon_threadsafe(self._on_done, f, size, incarnation)

        future.add_done_callback(done)

    def _on_done(self, future: Any, size: int, incarnation: int = 0) -> None:
        if incarnation != self.incarnation:
            return  # a send to a receiver that was replaced since: its credit is void
        self.in_flight -= 1
        self.in_flight_bytes -= size
        if future.cancelled():
            self.failure = self.failure or asyncio.CancelledError("send cancelled")
        else:
            exc = future.exception()
            if exc is not None:
                if self.log is not None:
                    # The receiver died: park what comes until the coordinator
                    # reconnects this channel to its replacement (or restarts the job).
                    self.paused = True
                    self.parking = True
                elif self.failure is None:
                    self.failure = exc
            else:
                hint = future.result()
                if isinstance(hint, tuple) and hint[0] > 0:
                    self.grant(hint[0], hint[1])
        self._event.set()

    def grant(self, records: int, batches: int) -> None:
        """The receiver's wish: ``records`` per batch, ``batches`` in flight (up to its credit)."""
        self.hint = records
        self.credit_batches = max(1, min(self.credit_max, batches))

    async def drain(self) -> None:
        """Wait until the receiver consumed everything sent."""
        while self.in_flight or self.paused:
            self._event.clear()
            await self._event.wait()
        self._raise_if_broken()

    def reconnect(self, send: SendFn, after: int) -> list[tuple[int, int, Any, Any]]:
        """The receiver was replaced: send to the new one, starting with what was sent
        after checkpoint ``after`` (returned; :meth:`replay` sends it)."""
        assert self.log is not None
        self.incarnation += 1
        self._send = send
        self.in_flight = 0
        self.in_flight_bytes = 0
        self.failure = None
        self.credit_batches = 1
        self.paused = True  # new messages wait behind the replay
        self.parking = False  # what was parked is in the log: the replay sends it
        self.parked_bytes = 0
        return list(self.log.replay_with_meta(self.key, after))

    async def replay(self, entries: list[tuple[int, int, Any, Any]]) -> None:
        """Resend logged messages under their sequence numbers, within the credits."""
        incarnation = self.incarnation
        for seq, kind, payload, (first, records) in entries:
            size = len(payload) if kind == DATA else 0
            while not self._credit(size):
                self._event.clear()
                await self._event.wait()
            if incarnation != self.incarnation:
                return  # reconnected again meanwhile: that replay takes over
            self._dispatch(seq, kind, payload, size, records, (self.gen, first, None))
        self.paused = False
        self._event.set()

    def _raise_if_broken(self) -> None:
        if self.failure is not None:
            raise ChannelBroken(self.receiver, self.failure)


class Outputs:
    """All output channels of one actor, and the policy of when to send."""

    def __init__(self, *, batch_size: int, batch_bytes: int, linger_s: float, clock: TimeAccount):
        self.batch_size = batch_size
        self.batch_bytes = batch_bytes
        self.linger_s = linger_s
        self.channels: list[OutputChannel] = []
        self._clock = clock

    def add(self, channel: OutputChannel) -> OutputChannel:
        self.channels.append(channel)
        return channel

    def next_deadline(self) -> float | None:
        """When the oldest buffered record's linger time runs out (monotonic)."""
        deadline = None
        for ch in self.channels:
            if ch.buffer and not ch.paused:  # a paused one is sent when it is reconnected
                d = ch.since + self.linger_s
                if deadline is None or d < deadline:
                    deadline = d
        return deadline

    async def flush(self, *, force: bool = False, paused_too: bool = False) -> None:
        """Send full batches, and partial ones whose linger ran out (or all, with force).

        A channel whose receiver is being replaced keeps its records (up to
        ``PAUSED_BUFFER_RECORDS``) so that the others go on; ``paused_too`` waits
        for it (a control message must follow its records)."""
        now = time.monotonic()
        for ch in self.channels:
            if not ch.buffer:
                continue
            if ch.paused and not paused_too and len(ch.buffer) < PAUSED_BUFFER_RECORDS:
                continue
            while len(ch.buffer) >= ch.batch_limit:
                await self._send_batch(ch, ch.batch_limit)
            if ch.buffer and (force or now - ch.since >= self.linger_s):
                await self._send_batch(ch, len(ch.buffer))

    async def _send_batch(self, ch: OutputChannel, n: int) -> None:
        buf = ch.buffer
        if n >= len(buf):
            batch, ch.buffer = buf, []
        else:
            batch = buf[:n]
            del buf[:n]
            ch.since = time.monotonic()
        payload = serde.dumps(batch)
        size = len(payload)
        # Batches stay near batch_bytes, and within what the receiver asked for
        # (its drain rate times its target in-flight time, see pacing.py).
        per_record = max(1, size // len(batch))
        wanted = ch.hint or INITIAL_BATCH
        ch.batch_limit = max(1, min(self.batch_size, self.batch_bytes // per_record, wanted))
        if not ch.has_credit(size):
            ch.pending = batch  # an unaligned snapshot meanwhile counts it as unsent
            previous = self._clock.switch(BACKPRESSURED)
            try:
                await ch.wait_credit(size)
            finally:
                self._clock.switch(previous)
                ch.pending = None
        ch.send_now(DATA, payload, size, len(batch))

    async def send_control(self, kind: int, payload: Any) -> None:
        """Send a barrier or end-of-stream on every channel, after its buffered records."""
        await self.flush(force=True, paused_too=True)
        for ch in self.channels:
            if not ch.has_credit(0):
                previous = self._clock.switch(BACKPRESSURED)
                try:
                    await ch.wait_credit(0)
                finally:
                    self._clock.switch(previous)
            ch.send_now(kind, payload, 0)

    def send_priority(self, kind: int, payload: Any) -> None:
        """Send a control message on every channel now, ahead of what is buffered and
        whatever the credits say (an unaligned barrier: it overtakes the data)."""
        for ch in self.channels:
            ch.send_now(kind, payload, 0)

    def unsent(self) -> dict[int, list[Any]]:
        """Records produced but not sent, per output edge, in order (an unaligned snapshot
        keeps them: the receivers will count them as after the barrier)."""
        out: dict[int, list[Any]] = {}
        for ch in self.channels:
            records = [*(ch.pending or []), *ch.buffer]
            if records:
                out.setdefault(ch.channel[0], []).extend(records)
        return out

    async def drain(self) -> None:
        for ch in self.channels:
            await ch.drain()

    def room(self) -> int:
        """Records the receivers take in a few batches each, less what is buffered already
        (0 or less: full batches wait for credits). A few, not one: a read that fills
        every channel to just under a batch would leave them all waiting for the
        linger time; with a slow receiver a batch is a few records anyway."""
        if not self.channels:
            return self.batch_size
        # What waits for a receiver being replaced does not hold up the others (up to a cap).
        held = sum(
            len(ch.buffer)
            for ch in self.channels
            if ch.paused and len(ch.buffer) < PAUSED_BUFFER_RECORDS
        )
        return ROOM_BATCHES * sum(ch.batch_limit for ch in self.channels) - self.buffered + held

    @property
    def in_flight(self) -> int:
        return sum(ch.in_flight for ch in self.channels)

    @property
    def buffered(self) -> int:
        return sum(len(ch.buffer) for ch in self.channels)


class UnroutableKey(Exception):
    """A key that cannot be hashed stably; carries the offending record."""

    def __init__(self, record: Any, cause: BaseException):
        super().__init__(str(cause))
        self.record = record
        self.cause = cause


def forward_router(channel: OutputChannel) -> Callable[[list[Any]], None]:
    def route(items: list[Any]) -> None:
        buf = channel.buffer
        if not buf:
            channel.since = time.monotonic()
        buf.extend(items)

    return route


def rebalance_router(channels: list[OutputChannel], sent: int = 0) -> Callable[[list[Any]], None]:
    """Runs of ``REBALANCE_RECORDS`` records go round-robin over the receivers.

    By record count, not by batch: which receiver gets a record depends only
    on its place in the stream, so a restarted sender sends the same records
    to the same receivers (local recovery) whatever its batches are. ``sent``:
    the records the router had routed when the sender was restored (the sum
    of its channels' positions), so a restarted router goes on mid-turn where
    the first one was, not from the first receiver (rule P1).
    """
    n = len(channels)
    state = {
        "next": (sent // REBALANCE_RECORDS) % n,
        "left": REBALANCE_RECORDS - sent % REBALANCE_RECORDS,
    }

    def route(items: list[Any]) -> None:
        i = 0
        total = len(items)
        while i < total:
            ch = channels[state["next"]]
            take = min(state["left"], total - i)
            if not ch.buffer:
                ch.since = time.monotonic()
            ch.buffer.extend(items if (i == 0 and take == total) else items[i : i + take])
            i += take
            state["left"] -= take
            if state["left"] == 0:
                state["next"] = (state["next"] + 1) % n
                state["left"] = REBALANCE_RECORDS

    return route


def hash_router(channels: list[OutputChannel], max_parallelism: int) -> Callable[[list[Any]], None]:
    """Route ``(key, value)`` records by the key group of ``key``."""
    if len(channels) == 1:
        return _checking_forward_router(channels[0])
    router = KeyRouter(max_parallelism, len(channels))
    cache = router._cache
    partition = router.partition
    buffers = [ch.buffer for ch in channels]

    def route(items: list[Any]) -> None:
        nonlocal buffers
        # The channels swap their buffer lists when they send; refresh them.
        for i, ch in enumerate(channels):
            if buffers[i] is not ch.buffer:
                buffers[i] = ch.buffer
            if not ch.buffer:
                ch.since = time.monotonic()
        if has_columns(items):
            _route_chunks(items, channels, max_parallelism)
            return
        get = cache.get
        kv: Any = None
        try:
            for kv in items:
                p = get(kv[0])
                if p is None:
                    p = partition(kv[0])
                buffers[p].append(kv)
        except TypeError as exc:
            # Blame the user's record (the value), not our (key, value) pair.
            raise UnroutableKey(kv[1], TypeError(_key_message(kv[0], exc))) from None

    return route


def _route_chunks(items: list[Any], channels: list[OutputChannel], max_parallelism: int) -> None:
    """Chunks keyed by a column: each split by its rows' partitions (hashed in NumPy)."""
    n = len(channels)
    for chunk in items:
        try:
            parts = partitions_of(chunk.data[chunk.key], max_parallelism, n)
        except TypeError as exc:
            raise UnroutableKey(chunk, TypeError(_key_message(chunk.key, exc))) from None
        for p, piece in split(chunk, parts, n):
            channels[p].buffer.append(piece)


def _checking_forward_router(channel: OutputChannel) -> Callable[[list[Any]], None]:
    """One receiver: every record goes to it, but each new key is still checked.

    A key that cannot be hashed stably would run at parallelism 1 and break
    the job at any other (a resume at parallelism 2 would fail for good).
    """
    return keys_checked(forward_router(channel))


def keys_checked(feed: Callable[[list[Any]], None]) -> Callable[[list[Any]], None]:
    """``feed`` behind a :func:`key_checker`: keyed records that reach one partition
    without a hash (one receiver, or a keyed step in the sender's actor)."""
    check = key_checker()

    def checked(items: list[Any]) -> None:
        check(items)
        feed(items)

    return checked


def key_checker() -> Callable[[list[Any]], None]:
    """Raises UnroutableKey for a ``(key, value)`` whose key cannot be hashed stably.

    For keyed records that go to one partition without hashing (one receiver,
    or a keyed step in the sender's actor): they must still be routable at
    another parallelism. The distinct keys of a batch are found at C speed;
    only new ones are hashed.
    """
    checked: set[Any] = set()
    first = operator.itemgetter(0)

    def check(items: list[Any]) -> None:
        if has_columns(items):
            # Chunks: numbers always hash; other key columns are hashed here once.
            for chunk in items:
                column = chunk.data[chunk.key]
                if column.dtype.kind not in "iubf":
                    try:
                        hash_column(column)
                    except TypeError as exc:
                        error = TypeError(_key_message(chunk.key, exc))
                        raise UnroutableKey(chunk, error) from None
            return
        try:
            keys = set(map(first, items))
        except TypeError:
            keys = None  # an unhashable key: find it below
        new = keys - checked if keys is not None else None
        if new is None or new:
            for kv in items:
                key = kv[0]
                if new is not None and key not in new:
                    continue
                try:
                    stable_hash(key)
                except TypeError as exc:
                    raise UnroutableKey(kv[1], TypeError(_key_message(key, exc))) from None
            if new is not None:
                if len(checked) > 200_000:
                    checked.clear()
                checked.update(new)

    return check


def _key_message(key: Any, exc: BaseException) -> str:
    message = str(exc)
    if "keys must be" in message:
        return message
    return (
        f"key {key!r:.80} of type {type(key).__name__} cannot be used: {exc}; "
        f"keys must be {SUPPORTED_KEY_TYPES}"
    )
