"""Pacing, the automatic interval, alerts and in-flight capture, in one process (no Ray)."""

from __future__ import annotations

from typing import Any

import pytest

import rayflow as rf
from rayflow._internal.checkpoint.interval import IntervalChooser
from rayflow._internal.job.alerts import AlertMonitor
from rayflow._internal.runtime.inflight import InflightCapture
from rayflow._internal.runtime.mailbox import BARRIER, DATA, Envelope
from rayflow._internal.runtime.pacing import CostMeter, Debloater


def test_credits_are_sized_by_time_not_by_count() -> None:
    d = Debloater(target_s=1.0, channels=2, credit_batches=8, batch_size=8192)
    assert d.batch_hint() == (0, 0)  # nothing measured: no opinion
    assert d.batch_hint(first_guess=1e-6) == (8192, 8)  # 1 us a record: full batches
    d.sample(0.0, 0)
    d.sample(2.0, 1000)  # 2 ms a record: 500 records are 1 s, 250 per channel
    assert d.batch_hint() == (31, 8)
    assert d.inflight_s(500) == pytest.approx(1.0)
    slow = Debloater(target_s=1.0, channels=1, credit_batches=8, batch_size=8192)
    slow.sample(0.0, 0)
    slow.sample(1.0, 5)  # 0.2 s a record: 5 records a second, fewer batches of one
    assert slow.batch_hint() == (1, 5)


def test_slices_follow_the_measured_cost() -> None:
    cost = CostMeter()
    assert cost.slice_records(8192) == 4  # unknown: a small first slice
    cost.observe(4, 0.008)  # 2 ms a record
    assert cost.slice_records(8192) == 10  # 20 ms of work
    assert cost.inline(10) and not cost.inline(11)  # longer ones go to the user thread
    for _ in range(20):
        cost.observe(8192, 0.0008)  # then 0.1 us a record
    assert cost.slice_records(8192) == 8192 and cost.inline(8192)


def test_the_interval_follows_checkpoint_cost_and_load() -> None:
    chooser = IntervalChooser(max_replay_s=30.0, max_overhead=0.05)
    assert chooser.interval_s == 1.0 and chooser.bound == "start"
    chooser.checkpoint_took(0.01)
    assert chooser.interval_s == pytest.approx(0.2)  # 10 ms is 5% of 0.2 s
    for _ in range(30):
        chooser.checkpoint_took(1.0)  # 100x the state, 100x the duration
    assert chooser.interval_s == pytest.approx(20.0, rel=0.01)
    assert chooser.bound == "overhead"
    chooser.load(1.0)
    for _ in range(30):
        chooser.checkpoint_took(3.0)  # now 60 s > max_replay_s / busy: cost still wins
    assert chooser.interval_s == pytest.approx(60.0, rel=0.01)
    assert "over max_replay_s" in chooser.bound


def _entry(**fields: Any) -> dict[str, Any]:
    return {"partition": 0, "records_in": 0, "inflight_records": 0, "in_user_code_s": 0.0, **fields}


def test_alerts_fire_and_clear() -> None:
    monitor = AlertMonitor("j", stall_after_s=5.0, backlog_window_s=4.0)
    # stalled: input waiting, no progress for 5 s; then progress clears it.
    assert monitor.observe(0.0, {"s": [_entry(records_in=10, inflight_records=3)]}, None) == []
    changes = monitor.observe(6.0, {"s": [_entry(records_in=10, inflight_records=3)]}, None)
    assert [(c, a.kind, a.step) for c, a in changes] == [("fired", "stalled", "s")]
    assert monitor.active()[0]["since"] == 5.0
    changes = monitor.observe(7.0, {"s": [_entry(records_in=11)]}, None)
    assert [(c, a.kind) for c, a in changes] == [("cleared", "stalled")]
    # checkpoint_failing names the cause.
    stats = {"consecutive_failures": 2, "last_failure": {"reason": "disk full", "time": 8.0}}
    changes = monitor.observe(8.0, {}, stats)
    assert changes[0][1].kind == "checkpoint_failing" and "disk full" in changes[0][1].message
    assert monitor.observe(9.0, {}, {"consecutive_failures": 0})[0][0] == "cleared"
    # backlog_growing over the window, cleared when it shrinks.
    fired = []
    for t, backlog in enumerate([100, 300, 600, 1000, 1500, 2100]):
        fired += monitor.observe(10.0 + t, {"src": [_entry(source_backlog=backlog)]}, None)
    assert [(c, a.kind) for c, a in fired] == [("fired", "backlog_growing")]
    cleared = []
    for t, backlog in enumerate([1500, 900, 400, 100, 0, 0]):
        cleared += monitor.observe(16.0 + t, {"src": [_entry(source_backlog=backlog)]}, None)
    assert [(c, a.kind) for c, a in cleared] == [("cleared", "backlog_growing")]
    # hot_key: one key group takes most of a partition's records.
    hot = [{"group": 17, "share": 0.8, "records": 8000, "keys": ["'hot'"]}]
    entry = _entry(hot_key_groups=hot, sampled_records=10_000, key_groups=64)
    changes = monitor.observe(30.0, {"count": [entry]}, None)
    assert changes[0][1].kind == "hot_key" and "key group 17" in changes[0][1].message
    cool = [{"group": 17, "share": 0.3, "records": 3000, "keys": ["'hot'"]}]
    entry = _entry(hot_key_groups=cool, sampled_records=10_000, key_groups=64)
    assert monitor.observe(31.0, {"count": [entry]}, None)[0][0] == "cleared"


def test_in_flight_capture_keeps_what_is_before_each_barrier() -> None:
    a, b = (0, 0), (0, 1)
    capture = InflightCapture(5, [a, b])
    waiting = [Envelope(a, 3, DATA, b"a3", 2), Envelope(a, 4, BARRIER, None, 0)]
    capture.begin(a, 3, waiting, bound=4)  # a: one batch, then its barrier
    capture.begin(b, 7, [Envelope(b, 8, DATA, b"b8", 2)], bound=None)  # b: 7 still on the way
    capture.partial[a] = ["rest", "of", "batch"]
    assert not capture.complete and capture.missing() == [b]
    capture.offer(b, 7, DATA, b"b7")
    capture.offer(b, 9, DATA, b"b9")
    capture.close(b, 10)  # b's barrier at 10: 7, 8 and 9 are in flight
    assert capture.complete
    assert capture.data() == {
        a: {"partial": ["rest", "of", "batch"], "batches": [b"a3"]},
        b: {"partial": [], "batches": [b"b7", b"b8", b"b9"]},
    }


def test_config_checks_the_new_options() -> None:
    with pytest.raises(rf.ConfigError, match="auto"):
        rf.Checkpointing(interval_s="fast")
    with pytest.raises(rf.ConfigError, match="max_overhead"):
        rf.Checkpointing(interval_s="auto", max_overhead=2)
    with pytest.raises(rf.ConfigError, match="aligned_timeout_s"):
        rf.Checkpointing(aligned_timeout_s=-1)
    with pytest.raises(rf.ConfigError, match="target_inflight_s"):
        rf.RuntimeConfig(target_inflight_s=-1)
    assert rf.Checkpointing(interval_s="auto").interval_s == "auto"


class _FlakyCommits(rf.sinks.Sink):
    """Commits fail twice as if the destination were away, then go through."""

    def __init__(self) -> None:
        self.commits: list[Any] = []
        self.attempts = 0

    def open(self, ctx: rf.sinks.SinkContext) -> rf.sinks.SinkWriter:
        sink = self

        class Writer(rf.sinks.SinkWriter):
            def __init__(self) -> None:
                self.rows: list[Any] = []

            def write(self, items: list[Any]) -> None:
                self.rows.extend(items)

            def prepare_commit(self, checkpoint_id: int) -> Any:
                staged, self.rows = self.rows, []
                return staged

            def commit(self, committable: Any) -> None:
                sink.attempts += 1
                if sink.attempts <= 2:
                    raise rf.sinks.TransientSinkError("destination unreachable")
                sink.commits.append(committable)

        return Writer()


def test_commits_that_cannot_reach_their_destination_are_retried_beside_processing(
    tmp_path: Any,
) -> None:
    import asyncio

    from rayflow._internal.checkpoint.snapshot import BarrierInfo
    from rayflow._internal.plan import build_plan
    from rayflow._internal.runtime import task as task_module
    from rayflow._internal.runtime.task import StageTask

    sink = _FlakyCommits()
    flow = rf.Dataflow("j")
    flow.source("src", rf.testing.from_items(range(10))).sink("out", sink)
    plan = build_plan(flow.spec())

    class Acks:
        def __init__(self) -> None:
            self.acks: list[int] = []

        def acknowledge(self, checkpoint_id: int, snapshot: Any) -> None:
            self.acks.append(checkpoint_id)

        def decline(self, checkpoint_id: int, reason: str) -> None:
            raise AssertionError(reason)

        def source_done(self, epoch: int) -> None:
            pass

    async def scenario() -> None:
        task_module.COMMIT_RETRY_S = 0.01  # a unit test need not wait 0.2 s a try
        acks = Acks()
        task = StageTask(plan, "src", 0, job="j", config=rf.RuntimeConfig(), full_every=10)
        task.connect({}, acks)
        run = asyncio.create_task(task.run())
        await asyncio.sleep(0.2)  # everything read, written to the sink
        task.trigger_checkpoint(BarrierInfo(1, "checkpoint", str(tmp_path), 0, "j/cp/1/", "r1"))
        for _ in range(100):
            if acks.acks:
                break
            await asyncio.sleep(0.02)
        await asyncio.wait_for(task.notify_complete(1, 0), 5)  # returns once committed
        task.finish()
        outcome = await asyncio.wait_for(run, 5)
        assert outcome.ok, outcome.failure

    pause = task_module.COMMIT_RETRY_S
    try:
        asyncio.run(scenario())
    finally:
        task_module.COMMIT_RETRY_S = pause
    assert sink.attempts == 3 and sink.commits == [list(range(10))]
