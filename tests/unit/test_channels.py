"""The channel and credit logic, in one process (no Ray)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from rayflow._internal.runtime import serde
from rayflow._internal.runtime.channels import (
    ChannelBroken,
    OutputChannel,
    Outputs,
    forward_router,
    hash_router,
)
from rayflow._internal.runtime.mailbox import DATA, EOS, Mailbox
from rayflow._internal.runtime.timing import BACKPRESSURED, TimeAccount
from tests.support.mailbox_sender import sender_into


def test_mailbox_delivers_each_channel_in_sequence_order() -> None:
    async def scenario() -> None:
        a, b = (0, 0), (0, 1)
        box = Mailbox([a, b], capacity_batches=100, capacity_bytes=10**6)
        arrivals = [(a, i) for i in range(20)] + [(b, i) for i in range(20)]
        random.Random(7).shuffle(arrivals)
        for ch, seq in arrivals:
            box.offer(ch, seq, DATA, f"{ch}-{seq}", 1)
        # A duplicate (a retried call) is dropped.
        assert box.offer(a, 3, DATA, "dup", 1) is None
        assert box.depth == 40
        got: dict[tuple[int, int], list[int]] = {a: [], b: []}
        while (env := box.pop()) is not None:
            got[env.channel].append(env.seq)
        assert got == {a: list(range(20)), b: list(range(20))}
        assert box.depth == 0 and box.bytes == 0

    asyncio.run(scenario())


def test_blocked_channels_are_held_back_in_order() -> None:
    async def scenario() -> None:
        a, b = (0, 0), (1, 0)
        box = Mailbox([a, b], 100, 10**6)
        box.block(a)
        for i in range(3):
            box.offer(a, i, DATA, f"a{i}", 1)
            box.offer(b, i, DATA, f"b{i}", 1)
        served = [box.pop().payload for _ in range(3)]  # type: ignore[union-attr]
        assert served == ["b0", "b1", "b2"]
        assert box.pop() is None
        box.unblock_all()
        assert [box.pop().payload for _ in range(3)] == ["a0", "a1", "a2"]  # type: ignore[union-attr]

    asyncio.run(scenario())


def test_credits_bound_batches_in_flight_and_return_on_consumption() -> None:
    async def scenario() -> None:
        box = Mailbox([(0, 0)], capacity_batches=2, capacity_bytes=10**6)
        ch = OutputChannel(
            (0, 0),
            "rx",
            sender_into(box, (0, 0)),
            credit_batches=box.credit_batches,
            credit_bytes=box.credit_bytes,
            batch_size=10,
        )
        assert ch.credit_batches == 1  # until the receiver answers
        ch.grant(10, 2)
        ch.send_now(DATA, b"x", 1)
        ch.send_now(DATA, b"y", 1)
        assert not ch.has_credit(1)
        waiter = asyncio.ensure_future(ch.wait_credit(1))
        await asyncio.sleep(0.01)
        assert not waiter.done()  # no credit until the receiver consumes
        assert box.pop() is not None
        await asyncio.wait_for(waiter, 1)
        assert ch.in_flight == 1

    asyncio.run(scenario())


def test_byte_credits_and_an_outsized_batch_is_admitted_alone() -> None:
    box = Mailbox([(0, 0)], capacity_batches=10, capacity_bytes=100)

    async def scenario() -> None:
        ch = OutputChannel(
            (0, 0),
            "rx",
            sender_into(box, (0, 0)),
            credit_batches=10,
            credit_bytes=box.credit_bytes,
            batch_size=10,
        )
        ch.grant(10, 10)
        assert ch.has_credit(500)  # nothing in flight: a huge batch may go alone
        ch.send_now(DATA, b"a" * 60, 60)
        assert not ch.has_credit(60)  # 60 + 60 > 100 bytes
        assert ch.has_credit(40)

    asyncio.run(scenario())


def test_a_slow_consumer_stops_a_fast_producer() -> None:
    """The producer can never be more than the mailbox's capacity ahead."""

    async def scenario() -> tuple[list[int], int, float, int]:
        box = Mailbox([(0, 0)], capacity_batches=4, capacity_bytes=10**6)
        clock = TimeAccount()
        outputs = Outputs(batch_size=10, batch_bytes=10**6, linger_s=0.0, clock=clock)
        ch = outputs.add(
            OutputChannel(
                (0, 0),
                "rx",
                sender_into(box, (0, 0)),
                credit_batches=box.credit_batches,
                credit_bytes=box.credit_bytes,
                batch_size=10,
            )
        )
        route = forward_router(ch)
        received: list[int] = []
        max_lead = 0
        sent = 0

        async def consumer() -> None:
            while True:
                env = box.pop()
                if env is None:
                    await box.wait(None)
                    continue
                if env.kind == EOS:
                    return
                received.extend(serde.loads(env.payload))
                await asyncio.sleep(0.002)  # slow

        task = asyncio.ensure_future(consumer())
        for start in range(0, 2000, 10):
            route(list(range(start, start + 10)))
            await outputs.flush()
            sent += 10
            max_lead = max(max_lead, sent - len(received))
        await outputs.send_control(EOS, None)
        await outputs.drain()
        await task
        return received, box.peak_depth, clock.totals()[BACKPRESSURED], max_lead

    received, peak_depth, bp_seconds, max_lead = asyncio.run(scenario())
    assert received == list(range(2000))
    assert peak_depth <= 4
    assert bp_seconds > 0.1  # the producer spent its time waiting for credits
    # Mailbox (4 batches) + one batch being consumed, 10 records each.
    assert max_lead <= 5 * 10


def test_hash_router_sends_each_key_to_its_key_group_owner() -> None:
    async def scenario() -> list[list[Any]]:
        boxes = [Mailbox([(0, 0)], 100, 10**6) for _ in range(3)]
        channels = [
            OutputChannel(
                (0, 0),
                f"rx{q}",
                sender_into(box, (0, 0)),
                credit_batches=100,
                credit_bytes=10**6,
                batch_size=1000,
            )
            for q, box in enumerate(boxes)
        ]
        route = hash_router(channels, 128)
        route([(f"k{i % 50}", i) for i in range(500)])
        return [ch.buffer for ch in channels]

    buffers = asyncio.run(scenario())
    owners: dict[str, set[int]] = {}
    for q, buf in enumerate(buffers):
        for key, _ in buf:
            owners.setdefault(key, set()).add(q)
    assert all(len(qs) == 1 for qs in owners.values())
    assert sum(map(len, buffers)) == 500
    assert all(buffers)  # 50 keys land on all three partitions


def test_a_dead_receiver_breaks_the_channel_with_its_name() -> None:
    async def scenario() -> None:
        def send(seq: int, kind: int, payload: Any, records: int = 0) -> asyncio.Future[Any]:
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            fut.set_exception(RuntimeError("actor died"))
            return fut

        ch = OutputChannel(
            (0, 0), "rayflow/j/count/0", send, credit_batches=2, credit_bytes=100, batch_size=10
        )
        ch.send_now(DATA, b"x", 1)
        await asyncio.sleep(0.01)
        with pytest.raises(ChannelBroken, match=r"rayflow/j/count/0: RuntimeError: actor died"):
            await ch.drain()

    asyncio.run(scenario())


def test_serde_round_trips_and_falls_back_for_lambdas_and_cycles() -> None:
    items: list[Any] = [("a", 1), {"x": [1, 2]}, 3.5, None]
    assert serde.loads(serde.dumps(items)) == items
    cyclic: list[Any] = [1]
    cyclic.append(cyclic)
    back = serde.loads(serde.dumps([cyclic]))
    assert back[0][1] is back[0]
    fn_back = serde.loads(serde.dumps([lambda x: x + 1]))
    assert fn_back[0](1) == 2
