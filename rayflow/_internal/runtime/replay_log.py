"""The upstream log: what an actor sent on each output channel since the last completed checkpoint.

Local recovery (issue 16) restarts only a dead partition from its own
snapshot; its input since that checkpoint must then come again, from the
senders that still run, not from a rewind of every source. So every sender
keeps the messages it sent on each channel, numbered by the channel's
sequence number:

- ``append(channel, seq, kind, payload)`` after each send (data batches are
  the bytes already encoded for the wire; control payloads are pickled);
- ``mark(checkpoint_id)`` when the barrier of that checkpoint went out on
  every channel: the entries each channel holds up to here belong to it;
- ``trim(checkpoint_id)`` once the checkpoint completed: everything sent
  before its barrier can never be asked for again and is dropped;
- ``replay(channel, after=checkpoint_id)``: the messages sent after that
  checkpoint's barrier, in order, for a restarted receiver whose snapshot
  is that checkpoint's.

Memory is bounded: past ``memory_bytes`` new entries go to a spill file of
their own on local disk (``RAYFLOW_SPILL_DIR`` or the temp folder) and only
their place in it stays in memory; the file is emptied when the last entry
in it is trimmed. A log that lost entries (it was closed, or its process is
a new one) says so (:class:`LogGone`), and the caller falls back to a global
restart.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections import deque
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import IO, Any

#: Bytes of entries kept in memory before they go to the spill file.
MEMORY_BYTES = 64 << 20


class LogGone(Exception):
    """The log cannot replay what was asked (trimmed past it, or closed)."""


@dataclass(slots=True)
class _Entry:
    seq: int
    kind: int
    #: The payload in memory (bytes for data, the object for control), or None if spilled.
    payload: Any
    size: int
    #: Where a spilled payload is in the spill file.
    offset: int = -1
    pickled: bool = False
    #: What the sender sent beside the payload (kept in memory, never spilled).
    meta: Any = None


class ReplayLog:
    """The messages an actor sent on its output channels since its last completed checkpoint."""

    def __init__(self, *, memory_bytes: int = MEMORY_BYTES, spill_dir: str | None = None):
        self.memory_bytes = memory_bytes
        self._spill_dir = spill_dir or os.environ.get("RAYFLOW_SPILL_DIR") or None
        self._channels: dict[Hashable, deque[_Entry]] = {}
        self._sent_upto: dict[Hashable, int] = {}  # per channel, the last seq appended
        #: checkpoint id -> per channel, the seq of the last entry before its barrier (-1: none)
        self._marks: dict[int, dict[Hashable, int]] = {}
        #: the checkpoint trimmed to: replays may start after it, or after a later mark
        self._trimmed_to = 0
        self._in_memory = 0
        self._spill: IO[bytes] | None = None
        self._spill_path = ""
        self._spill_size = 0
        self._spilled_live = 0
        self._closed = False

    # -- writing -------------------------------------------------------------

    def append(
        self, channel: Hashable, seq: int, kind: int, payload: Any, meta: Any = None
    ) -> None:
        """Keep one message sent on ``channel``; seqs of a channel must grow by one."""
        if self._closed:
            raise LogGone("the log is closed")
        last = self._sent_upto.get(channel)
        if last is not None and seq != last + 1:
            raise ValueError(
                f"channel {channel!r}: message {seq} follows {last}; a log keeps every "
                "message of a channel, in order"
            )
        entries = self._channels.get(channel)
        if entries is None:
            entries = self._channels[channel] = deque()
        if isinstance(payload, (bytes, bytearray, memoryview)):
            data, pickled = bytes(payload), False
        else:
            data, pickled = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL), True
        size = len(data)
        self._sent_upto[channel] = seq
        if self._in_memory + size <= self.memory_bytes:
            entries.append(
                _Entry(seq, kind, payload if not pickled else data, size, -1, pickled, meta)
            )
            self._in_memory += size
        else:
            offset = self._write_spill(data)
            entries.append(_Entry(seq, kind, None, size, offset, pickled, meta))
            self._spilled_live += 1

    def start(self, checkpoint_id: int) -> None:
        """This log begins at ``checkpoint_id`` (restored, or 0: the job's start): everything
        appended from now on comes after it."""
        self._marks = {checkpoint_id: {}}
        self._trimmed_to = checkpoint_id

    def mark(self, checkpoint_id: int) -> None:
        """The barrier of ``checkpoint_id`` was sent on every channel (after what is logged)."""
        self._marks[checkpoint_id] = dict(self._sent_upto)

    def trim(self, checkpoint_id: int) -> None:
        """``checkpoint_id`` completed: drop what was sent before its barrier (and earlier
        marks). A checkpoint never marked here (e.g. it started before this log) is ignored."""
        cut = self._marks.get(checkpoint_id)
        if cut is None:
            return
        for ch, entries in self._channels.items():
            upto = cut.get(ch, -1)
            while entries and entries[0].seq <= upto:
                self._drop(entries.popleft())
        for old in [c for c in self._marks if c < checkpoint_id]:
            del self._marks[old]
        self._trimmed_to = max(self._trimmed_to, checkpoint_id)
        if self._spill is not None and self._spilled_live == 0:
            self._spill.truncate(0)
            self._spill.seek(0)
            self._spill_size = 0

    # -- reading -------------------------------------------------------------

    def replay(self, channel: Hashable, after: int) -> Iterator[tuple[int, int, Any]]:
        """``(seq, kind, payload)`` of every message sent on ``channel`` after the barrier
        of checkpoint ``after``, in order (payloads as given to :meth:`append`)."""
        for seq, kind, payload, _ in self.replay_with_meta(channel, after):
            yield seq, kind, payload

    def replay_with_meta(
        self, channel: Hashable, after: int
    ) -> Iterator[tuple[int, int, Any, Any]]:
        """Like :meth:`replay`, with the ``meta`` each message was appended with."""
        if self._closed:
            raise LogGone("the log is closed")
        cut = self._marks.get(after)
        if cut is None:
            raise LogGone(
                f"checkpoint {after} is not in the log (trimmed to {self._trimmed_to}; marked "
                f"{sorted(self._marks)})"
            )
        start = cut.get(channel, -1)
        for entry in list(self._channels.get(channel, ())):
            if entry.seq > start:
                yield entry.seq, entry.kind, self._payload(entry), entry.meta

    def replayable(self, after: int) -> bool:
        """Whether :meth:`replay` can start after checkpoint ``after``."""
        return not self._closed and after in self._marks

    # -- bookkeeping ---------------------------------------------------------

    @property
    def memory_used(self) -> int:
        return self._in_memory

    @property
    def spilled_bytes(self) -> int:
        return self._spill_size

    def entries(self, channel: Hashable) -> int:
        return len(self._channels.get(channel, ()))

    def close(self) -> None:
        """Drop everything (the process ends, or the job restarts globally)."""
        self._closed = True
        self._channels.clear()
        self._marks.clear()
        self._in_memory = 0
        if self._spill is not None:
            try:
                self._spill.close()
                os.remove(self._spill_path)
            except OSError:
                pass
            self._spill = None

    # -- internals -----------------------------------------------------------

    def _drop(self, entry: _Entry) -> None:
        if entry.offset >= 0:
            self._spilled_live -= 1
        else:
            self._in_memory -= entry.size

    def _write_spill(self, data: bytes) -> int:
        if self._spill is None:
            fd, self._spill_path = tempfile.mkstemp(
                prefix="rayflow-replay-", suffix=".log", dir=self._spill_dir
            )
            self._spill = os.fdopen(fd, "w+b")
        offset = self._spill_size
        self._spill.seek(offset)
        self._spill.write(data)
        self._spill_size = offset + len(data)
        return offset

    def _payload(self, entry: _Entry) -> Any:
        if entry.offset >= 0:
            assert self._spill is not None
            self._spill.flush()
            self._spill.seek(entry.offset)
            data = self._spill.read(entry.size)
        else:
            data = entry.payload
        return pickle.loads(data) if entry.pickled else data
