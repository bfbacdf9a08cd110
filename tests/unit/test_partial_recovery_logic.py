"""The parts of partial recovery that run in one process: the causal log, a sender that
survives its receiver and replays to the new one, a receiver that drops what it had."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from rayflow._internal.runtime import serde
from rayflow._internal.runtime.causal import CausalCursor, CausalLog, CausalStore
from rayflow._internal.runtime.channels import (
    REBALANCE_RECORDS,
    OutputChannel,
    Outputs,
    rebalance_router,
)
from rayflow._internal.runtime.mailbox import BARRIER, DATA, Mailbox
from rayflow._internal.runtime.replay_log import ReplayLog
from rayflow._internal.runtime.timing import TimeAccount
from tests.support.mailbox_sender import sender_into


def test_receivers_keep_prefixes_of_one_order_and_the_longest_covers_them_all() -> None:
    log = CausalLog(base=4)
    fast, slow = CausalCursor(log), CausalCursor(log)
    at_fast, at_slow = CausalStore(), CausalStore()
    rng = random.Random(3)
    for _ in range(50):
        log.entries.append(rng.randrange(3))
        if (d := fast.take()) is not None:
            at_fast.add("x", d)
        if rng.random() < 0.3 and (d := slow.take()) is not None:
            at_slow.add("x", d)
    assert at_fast.get("x") == (4, log.entries)
    base, prefix = at_slow.get("x") or (0, [])
    assert base == 4 and prefix == log.entries[: len(prefix)]
    # A resend of entries it had changes nothing; a checkpoint starts a new order.
    at_fast.add("x", (4, 0, log.entries[:10]))
    assert at_fast.get("x") == (4, log.entries)
    log.restart(7)
    log.entries.append(2)
    at_fast.add("x", fast.take() or (0, 0, []))
    assert at_fast.get("x") == (7, [2])


def test_a_sender_waits_for_a_dead_receiver_and_replays_what_it_sent_after_the_checkpoint() -> None:
    async def scenario() -> None:
        channel = (0, 0)
        old = Mailbox([channel], capacity_batches=8, capacity_bytes=10**6)
        alive = [True]
        ch = OutputChannel(
            channel,
            "rx",
            sender_into(old, channel, alive),
            credit_batches=8,
            credit_bytes=10**6,
            batch_size=100,
        )
        log = ReplayLog()
        log.start(0)
        ch.enable_log(log, gen=0, causal=None)
        outputs = Outputs(batch_size=100, batch_bytes=10**6, linger_s=0.0, clock=TimeAccount())
        outputs.add(ch)

        async def emit(records: list[int]) -> None:
            ch.buffer.extend(records)
            await outputs.flush(force=True)

        def drain(box: Mailbox) -> list[Any]:
            got = []
            while (env := box.pop()) is not None:
                got.append(
                    (
                        env.kind,
                        serde.loads(env.payload) if env.kind == DATA else env.payload,
                        env.meta[1],
                    )
                )
            return got

        await emit([1, 2, 3])
        drain(old)
        await asyncio.sleep(0.01)
        await outputs.send_control(BARRIER, "barrier 1")
        log.mark(1)
        drain(old)
        await asyncio.sleep(0.01)
        await emit([4, 5])
        drain(old)
        await asyncio.sleep(0.01)
        alive[0] = False  # the receiver dies; the sender goes on, then waits
        await emit([6, 7])
        await asyncio.sleep(0.01)
        assert ch.paused and ch.failure is None
        new = Mailbox([channel], capacity_batches=8, capacity_bytes=10**6)
        new.reset_channel(channel, 2)  # restored: the barrier of 1 was message 1
        alive[0] = True
        entries = ch.reconnect(sender_into(new, channel, alive), after=1)
        replay = asyncio.ensure_future(ch.replay(entries))
        got: list[Any] = []
        while not replay.done():  # the new receiver takes its input as it comes
            got.extend(drain(new))
            await asyncio.sleep(0.01)
        await emit([8])
        got.extend(drain(new))
        # Everything after the barrier, once, in order, with each batch's first index.
        assert got == [(DATA, [4, 5], 3), (DATA, [6, 7], 5), (DATA, [8], 7)]
        assert not ch.paused

    asyncio.run(scenario())


def test_a_reset_channel_drops_what_the_old_sender_queued_and_renumbers() -> None:
    async def scenario() -> None:
        a, b = (0, 0), (0, 1)
        box = Mailbox([a, b], capacity_batches=10, capacity_bytes=10**6)
        for seq in range(3):
            box.offer(a, seq, DATA, b"xx", 2, 1)
            box.offer(b, seq, DATA, b"yy", 2, 1)
        box.offer(a, 5, DATA, b"early", 5, 1)
        box.reset_channel(a, 0)
        assert box.depth == 3 and box.records == 3
        box.offer(a, 0, DATA, b"new", 3, 1)
        assert box.pop_from(a) is not None and box.pop_from(a) is None
        assert [box.pop().channel for _ in range(3)] == [b, b, b]  # type: ignore[union-attr]
        assert box.pop() is None and box.depth == 0

    asyncio.run(scenario())


def test_rebalance_sends_the_same_records_to_the_same_receivers_whatever_the_batches() -> None:
    async def scenario() -> list[list[list[int]]]:
        runs = []
        for seed in (1, 2):
            channels = [
                OutputChannel(
                    (0, 0),
                    f"r{q}",
                    lambda *a: None,
                    credit_batches=1,
                    credit_bytes=1,
                    batch_size=10**6,
                )
                for q in range(3)
            ]
            route = rebalance_router(channels)
            rng = random.Random(seed)
            records = list(range(5 * REBALANCE_RECORDS + 17))
            i = 0
            while i < len(records):
                n = rng.randrange(1, 700)
                route(records[i : i + n])
                i += n
            runs.append([ch.buffer for ch in channels])
        return runs

    first, second = asyncio.run(scenario())
    assert first == second
    assert sorted(r for buf in first for r in buf) == list(range(5 * REBALANCE_RECORDS + 17))


def test_now_and_random_are_logged_and_a_replay_gets_the_same_values_back() -> None:
    from collections import deque

    from rayflow._internal.runtime.nondeterminism import Recorder

    first = Recorder()
    first.log = CausalLog(base=2)
    first.log.entries.append(0)  # an input channel's entry, between the values
    drawn = [first.random(), first.now(), first.random()]
    assert first.log.entries[1:] == drawn
    again = Recorder()
    again.replay = deque(first.log.entries[1:])
    assert [again.random(), again.now(), again.random()] == drawn
    fresh = again.random()  # past the log: drawn anew
    assert fresh not in drawn and not again.replay
