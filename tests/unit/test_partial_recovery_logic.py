"""The parts of partial recovery that run in one process: the causal log, a sender that
survives its receiver and replays to the new one, a receiver that drops what it had."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import rayflow as rf
from rayflow._internal.runtime import serde
from rayflow._internal.runtime.causal import CausalCursor, CausalLog, CausalStore, order_since
from rayflow._internal.runtime.channels import (
    REBALANCE_RECORDS,
    OutputChannel,
    Outputs,
    rebalance_router,
)
from rayflow._internal.runtime.mailbox import BARRIER, DATA, Mailbox
from rayflow._internal.runtime.replay_log import ReplayLog
from rayflow._internal.runtime.task import StageTask
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


def test_the_order_since_the_last_completed_checkpoint_survives_a_given_up_one() -> None:
    """Rule P10: a sender that took its snapshot of checkpoint 3 and died before 3
    completed is restored to 2; its receiver must still hold the order since 2
    (the node-loss duplicate: the log had been restarted at 3, the replay was
    unordered and its receiver, dropping by index, kept 44 records twice)."""
    log = CausalLog(base=2)
    cursor, store = CausalCursor(log), CausalStore()

    def took(*channels: int) -> None:
        log.entries.extend(channels)
        if (d := cursor.take()) is not None:
            store.add("x", d)

    took(0, 1, 1, 0)
    log.mark(3)  # the snapshot of 3, then more input after its barrier
    took(1, 0)
    assert order_since(store.get("x"), 2) == [0, 1, 1, 0, 1, 0]  # 3 given up: back to 2
    assert order_since(store.get("x"), 3) == [1, 0]
    log.trim(3)  # 3 completed: the order before its barrier is dropped, and resent
    took(1)
    assert log.base == 3 and log.entries == [1, 0, 1]
    assert store.get("x") == (3, [1, 0, 1])
    assert order_since(store.get("x"), 3) == [1, 0, 1]
    assert order_since(store.get("x"), 2) is None  # never asked: 2 is not the latest
    # A receiver that consumed nothing after the barrier of 3 contributes an empty prefix.
    assert order_since((2, [0, 1]), 3) == []


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


def test_a_sender_parks_what_goes_to_a_dead_receiver_and_serves_the_others_meanwhile() -> None:
    """Records and control messages for a dead receiver go into the log unsent, so that
    a barrier never waits for the replacement (the others go on); the replay sends them."""

    async def scenario() -> None:
        dead_ch, live_ch = (0, 0), (0, 1)
        boxes = {c: Mailbox([(0, c)], capacity_batches=8, capacity_bytes=10**6) for c in (0, 1)}
        alive = [True]
        log = ReplayLog()
        log.start(0)
        outputs = Outputs(batch_size=100, batch_bytes=10**6, linger_s=0.0, clock=TimeAccount())
        chans = []
        for c, up in ((dead_ch, alive), (live_ch, [True])):
            ch = OutputChannel(
                c,
                f"rx{c[1]}",
                sender_into(boxes[c[1]], c, up),
                credit_batches=8,
                credit_bytes=10**6,
                batch_size=100,
            )
            ch.enable_log(log, gen=0, causal=None)
            chans.append(outputs.add(ch))
        seen: dict[int, list[Any]] = {0: [], 1: []}

        async def receive() -> None:  # the receivers take their input as it comes
            while True:
                for c, box in boxes.items():
                    while (env := box.pop()) is not None:
                        payload = serde.loads(env.payload) if env.kind == DATA else env.payload
                        seen[c].append((env.kind, payload))
                await asyncio.sleep(0.002)

        async def emit(records: list[int]) -> None:
            for ch in chans:
                ch.buffer.extend(records)
            await outputs.flush(force=True)

        receiving = asyncio.ensure_future(receive())
        await emit([1])
        await outputs.send_control(BARRIER, "barrier 1")
        log.mark(1)
        await asyncio.sleep(0.02)
        alive[0] = False  # receiver 0 dies
        await emit([2])
        await asyncio.sleep(0.02)
        assert chans[0].parking
        # While it is dead: records, and a barrier that must follow them. None of it waits
        # for the replacement (before parking, the barrier waited here for a reconnect).
        await asyncio.wait_for(emit([3, 4]), 1.0)
        await asyncio.wait_for(outputs.send_control(BARRIER, "barrier 2"), 1.0)
        await asyncio.wait_for(emit([5]), 1.0)
        await asyncio.sleep(0.02)
        assert seen[1] == [
            (DATA, [1]),
            (BARRIER, "barrier 1"),
            (DATA, [2]),
            (DATA, [3, 4]),
            (BARRIER, "barrier 2"),
            (DATA, [5]),
        ]
        # The replacement, restored from checkpoint 1 (its barrier was message 1).
        boxes[0] = Mailbox([dead_ch], capacity_batches=8, capacity_bytes=10**6)
        boxes[0].reset_channel(dead_ch, 2)
        seen[0] = []
        ch = chans[0]
        await ch.replay(ch.reconnect(sender_into(boxes[0], dead_ch), after=1))
        await emit([6])
        await asyncio.sleep(0.02)
        receiving.cancel()
        # Everything after checkpoint 1, once, in the order it was produced ([5] was
        # still buffered, not parked: it goes out after the replay, with [6]).
        assert seen[0] == [
            (DATA, [2]),
            (DATA, [3, 4]),
            (BARRIER, "barrier 2"),
            (DATA, [5, 6]),
        ]
        assert not ch.paused and not ch.parking and ch.parked_bytes == 0

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


def test_a_rebalance_router_restored_mid_turn_goes_on_where_the_first_one_was() -> None:
    """A sender restarted alone re-emits what followed its checkpoint: each record must go
    to the receiver it went to the first time, although the checkpoint fell mid-turn."""

    def channels() -> list[OutputChannel]:
        return [
            OutputChannel(
                (0, q), f"r{q}", lambda *a: None, credit_batches=1, credit_bytes=1, batch_size=10**6
            )
            for q in range(3)
        ]

    async def scenario(cut: int) -> None:
        first = channels()
        route = rebalance_router(first)
        route(records[:cut])
        at_cut = [len(ch.buffer) for ch in first]
        route(records[cut:])
        again = channels()
        rerouted = rebalance_router(again, sent=cut)
        for i in range(cut, len(records), 333):
            rerouted(records[i : i + 333])
        assert [ch.buffer for ch in again] == [
            ch.buffer[n:] for ch, n in zip(first, at_cut, strict=True)
        ], cut

    records = list(range(7 * REBALANCE_RECORDS + 5))
    for cut in (0, 1, 700, REBALANCE_RECORDS, 2 * REBALANCE_RECORDS + 300, 4 * REBALANCE_RECORDS):
        asyncio.run(scenario(cut))


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


class _Jittery(rf.sources.Source):
    """Two splits of numbers whose reads come back at random sizes: the order in which a
    source partition with both takes their records is not repeatable."""

    def __init__(self, seed: int, per_split: int = 3000):
        self.seed, self.per_split = seed, per_split

    def partitions(self) -> int:
        return 2

    def bounded(self) -> bool:
        return True

    def open(self, partition: int, offset: Any | None) -> rf.sources.SourceReader:
        rng = random.Random(self.seed * 10 + partition)
        per_split = self.per_split

        class Reader(rf.sources.SourceReader):
            def __init__(self) -> None:
                self.at = int(offset or 0)

            def read(self, max_items: int) -> list[Any] | None:
                if self.at >= per_split:
                    return None
                n = min(max_items, rng.randrange(0, 300), per_split - self.at)
                items = [partition * 1_000_000 + i for i in range(self.at, self.at + n)]
                self.at += n
                return items

            def offset(self) -> Any:
                return self.at

        return Reader()


def test_a_source_restarted_alone_reads_its_splits_in_the_logged_order() -> None:
    """A source partition with several splits logs (split, records) per read; restarted
    alone it reads them again in that order, so each receiver gets the same records under
    the same indexes (it drops what it had by index: another order would lose records)."""
    from rayflow._internal.plan import build_plan

    def plan_of(seed: int) -> Any:
        flow = rf.Dataflow("j")
        src = flow.source("src", _Jittery(seed), parallelism=1)
        src.key_by("k", lambda x: x % 7, parallelism=2).reduce(
            "sum", lambda a, b: a + b, initial=0
        ).sink("out", rf.testing.Discard())
        return build_plan(flow.spec())

    async def run(seed: int, forced: list[Any] | None) -> tuple[dict[str, list[Any]], list[Any]]:
        plan = plan_of(seed)
        task = StageTask(
            plan, "src", 0, job="j", config=rf.RuntimeConfig(), local_recovery=True, instance="i"
        )
        if forced is not None:
            await task.restore(None, {"forced": forced})
        streams: dict[str, list[Any]] = {"sum/0": [], "sum/1": []}

        def sender(receiver: str) -> Any:
            def send(seq: int, kind: int, payload: Any, records: int = 0, meta: Any = None) -> Any:
                if kind == DATA:
                    streams[receiver].extend(serde.loads(payload))
                fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                fut.set_result(0)
                return fut

            return send

        edge = plan.stage("src").outputs[0]
        task.connect({(edge, q): (f"sum/{q}", sender(f"sum/{q}")) for q in range(2)})
        outcome = await asyncio.wait_for(task.run(), 30)
        assert outcome.ok, outcome.failure
        assert task._causal is not None
        return streams, list(task._causal.entries)

    first, entries = asyncio.run(run(1, None))
    assert entries and all(isinstance(e, tuple) for e in entries)
    assert sorted(r for s in first.values() for r in s) == sorted(
        p * 1_000_000 + i for p in range(2) for i in range(3000)
    )
    # Restarted with the log of the first run (its reads come back at other sizes now).
    again, _ = asyncio.run(run(2, entries))
    assert again == first
    # Without the log, the same source sends other records under the same indexes.
    unlogged, _ = asyncio.run(run(2, None))
    assert unlogged != first


class _Deployed:
    """What source_done reads of a deployment: its epoch and its source partitions."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def source_keys(self) -> list[tuple[str, int]]:
        return [("src", 0), ("src", 1)]


def test_a_source_that_ends_while_a_recovery_is_decided_is_not_forgotten() -> None:
    # Found by the union chaos scenario (the job never ended): a source's end that
    # came after the failure was seen but before the recovery was found partial was
    # dropped as "from before a restart"; the source, alive, never says it again.
    from rayflow._internal.checkpoint.start import StartDecision
    from rayflow._internal.job.coordinator import JobCoordinator
    from rayflow.config import RuntimeConfig

    coordinator = JobCoordinator(
        "j",
        b"",
        RuntimeConfig(),
        rf.Checkpointing(storage="/nonexistent", recovery="partial"),
        StartDecision("fresh", None, "run", None, 1),
    )
    coordinator.deployment = _Deployed(epoch=3)  # type: ignore[assignment]
    coordinator._status = rf.JobStatus.RECOVERING  # deciding: partial or global
    asyncio.run(coordinator.source_done(("src", 0), 3))
    assert coordinator._sources_done == {("src", 0)}
    # From an earlier epoch, or while a global restart (every task anew) is under way: void.
    asyncio.run(coordinator.source_done(("src", 1), 2))
    coordinator._global_under_way = True
    asyncio.run(coordinator.source_done(("src", 1), 3))
    assert coordinator._sources_done == {("src", 0)}


def test_only_a_stage_with_a_batch_function_on_records_is_kept_from_partial_recovery() -> None:
    import numpy as np

    from rayflow._internal.job.failover import cut_dependent
    from rayflow._internal.plan import build_plan

    flow = rf.Dataflow("cuts", parallelism=2)
    records = flow.source("records", rf.sources.Generator(lambda p, i: (i % 3, i), limit=10))
    tallied = records.key_by("k", lambda r: r[0]).reduce("r", lambda a, r: r, initial=None)
    tallied.map_batches("tally", lambda b: b[:1]).sink("out", rf.testing.Collect())
    chunks = flow.source(
        "chunks",
        rf.sources.Generator(
            batch_fn=lambda p, o, n: {"v": np.arange(o, o + n)}, limit=10, rows_per_batch=5
        ),
    )
    chunks.map_batches("scale", lambda b: {"v": b["v"] * 2}, batch_format="numpy").sink(
        "out2", rf.testing.Collect()
    )
    plan = build_plan(flow.spec())
    blocked = {
        step: cut_dependent(plan, stage.name) for stage in plan.stages for step in stage.steps
    }
    assert "map_batches step 'tally'" in str(blocked["tally"])  # its slices are its batches
    assert blocked["scale"] is None  # chunks are cut alike on a replay
    assert blocked["records"] is None


def test_a_window_on_its_own_stages_watermark_is_kept_from_partial_recovery() -> None:
    from rayflow._internal.job.failover import cut_dependent
    from rayflow._internal.plan import build_plan

    flow = rf.Dataflow("own", parallelism=1)
    events = flow.source("events", rf.sources.Generator(lambda p, i: ("k", float(i)), limit=9))
    own = events.with_event_time("ts", lambda e: e[1], max_delay_s=1.0)
    fused = own.key_by("k", lambda e: e[0]).window(
        "w", rf.windows.Tumbling(1.0), rf.windows.Count()
    )
    fused.sink("out", rf.testing.Collect())
    apart = own.key_by("k2", lambda e: e[0], parallelism=2).window(
        "w2", rf.windows.Tumbling(1.0), rf.windows.Count()
    )
    apart.sink("out2", rf.testing.Collect())
    plan = build_plan(flow.spec())
    found = {step: cut_dependent(plan, stage.name) for stage in plan.stages for step in stage.steps}
    assert "runs 'w' on a watermark made" in str(found["w"])  # moved between cuts
    assert found["w2"] is None  # another stage's watermarks come in the logged order
