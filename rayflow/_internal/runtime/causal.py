"""The causal log of local recovery: in which order a partition took its input, and
the values of ``ctx.now()``/``ctx.random()`` it drew.

A partition with several input channels takes their batches in an order
that the next run will not repeat (the channels race). Its outputs depend on
that order, so a partition restarted alone must take its replayed input in
the order of the first run, or its output would differ from what its
receivers already consumed. The order is logged as the index of the input
channel of every envelope taken since the last checkpoint (its *base*), and
every message the partition sends carries the entries its receiver has not
had yet: the log lives on in the receivers, which outlive the sender.

When the sender is restarted, the coordinator asks each receiver for what
it consumed (:meth:`CausalStore.get`), takes the longest (they are
prefixes of one sequence), and the new sender takes its input in that order
first (docs/protocol.md, "Local recovery").
"""

from __future__ import annotations

from typing import Any

#: What a message carries: (base checkpoint, index of the first entry, entries). An
#: entry is an input channel's index (int), or a value ``ctx.now()`` or ``ctx.random()``
#: returned (float; nondeterminism.py).
Determinants = tuple[int, int, list[Any]]


class CausalLog:
    """The sender's side: input channel indices taken since checkpoint ``base``."""

    __slots__ = ("base", "entries")

    def __init__(self, base: int = 0):
        self.base = base
        self.entries: list[Any] = []

    def restart(self, base: int) -> None:
        """Restored to checkpoint ``base``: the order before it is never asked for."""
        self.base = base
        self.entries = []

    def mark(self, checkpoint_id: int) -> None:
        """This partition took its snapshot of ``checkpoint_id`` here.

        The entries before it are kept until the checkpoint *completes*: a
        recovery goes back to the last completed checkpoint, and one taken
        here may still be given up (rule P10 in docs/protocol.md)."""
        self.entries.append(mark_of(checkpoint_id))

    def trim(self, checkpoint_id: int) -> None:
        """Checkpoint ``checkpoint_id`` completed: drop the order up to its barrier."""
        if checkpoint_id <= self.base:
            return
        try:
            at = self.entries.index(mark_of(checkpoint_id))
        except ValueError:
            return  # not taken here (cannot complete without it): keep everything
        self.base = checkpoint_id
        self.entries = self.entries[at + 1 :]


def mark_of(checkpoint_id: int) -> str:
    """The entry that marks where a partition took its snapshot of ``checkpoint_id``."""
    return f"@{checkpoint_id}"


def order_since(found: tuple[int, list[Any]] | None, checkpoint_id: int) -> list[Any] | None:
    """From a receiver's copy of a sender's log, the order the sender took its input
    in after its snapshot of ``checkpoint_id`` (marks left out); None if the copy does
    not reach back that far."""
    if found is None:
        return None
    base, entries = found
    if base > checkpoint_id:
        return None
    if base < checkpoint_id:
        mark = mark_of(checkpoint_id)
        if mark not in entries:
            return []  # the receiver consumed nothing the sender sent after that barrier
        entries = entries[entries.index(mark) + 1 :]
    return [e for e in entries if not isinstance(e, str)]


class CausalCursor:
    """What one output channel sent of its sender's log so far."""

    __slots__ = ("base", "log", "sent")

    def __init__(self, log: CausalLog):
        self.log = log
        self.base = log.base
        self.sent = 0

    def take(self) -> Determinants | None:
        """The entries not sent on this channel yet (None: nothing new)."""
        log = self.log
        if log.base != self.base:
            self.base = log.base
            self.sent = 0
        n = len(log.entries)
        if n <= self.sent:
            return None
        start, self.sent = self.sent, n
        return (log.base, start, log.entries[start:n])


class CausalStore:
    """The receiver's side: the causal log of each sender, as far as it consumed."""

    __slots__ = ("_logs",)

    def __init__(self) -> None:
        self._logs: dict[Any, tuple[int, list[Any]]] = {}

    def add(self, channel: Any, determinants: Determinants) -> None:
        base, start, entries = determinants
        current = self._logs.get(channel)
        if current is None or current[0] != base:
            if current is not None and base < current[0]:
                return  # an older checkpoint's order (a resend): already superseded
            current = self._logs[channel] = (base, [])
        have = current[1]
        if start > len(have):
            return  # a gap (cannot happen in order); keep the prefix that is whole
        have.extend(entries[len(have) - start :])

    def get(self, channel: Any) -> tuple[int, list[Any]] | None:
        found = self._logs.get(channel)
        return (found[0], list(found[1])) if found is not None else None
