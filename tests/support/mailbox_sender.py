"""A channel send function for tests without Ray: straight into a receiver's mailbox."""

from __future__ import annotations

import asyncio
from typing import Any

from rayflow._internal.runtime.mailbox import DATA, Mailbox


def sender_into(mailbox: Mailbox, channel: tuple[int, int], alive: list[bool] | None = None) -> Any:
    """A send function that delivers straight into ``mailbox`` (what Ray does, minus Ray);
    while ``alive[0]`` is False, a send fails as one to a dead actor does."""

    def send(
        seq: int, kind: int, payload: Any, records: int = 0, meta: Any = None
    ) -> asyncio.Future[Any]:
        if alive is not None and not alive[0]:
            failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            failed.set_exception(RuntimeError("the actor died"))
            return failed
        size = len(payload) if kind == DATA else 0
        done = mailbox.offer(channel, seq, kind, payload, size, records, meta)
        # What the receiving actor answers: its full credit, batches as large as they come.
        grant = (10**6, mailbox.credit_batches)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if done is None:
            fut.set_result(grant)
        else:
            done.add_done_callback(lambda _: fut.set_result(grant))
        return fut

    return send
