"""A task's watermark bookkeeping (runtime/event_time.py), without Ray."""

from __future__ import annotations

import math

import rayflow as rf
from rayflow._internal.plan import build_plan
from rayflow._internal.runtime.event_time import SEND_INTERVAL_S, EventTime, merge_restored
from rayflow._internal.runtime.operators import build_op

INF = math.inf


def _task(stage_of: str, idle_timeout_s: float | None = None) -> EventTime:
    flow = rf.Dataflow("j", parallelism=2)
    clicks = flow.source("src", rf.testing.from_items([], partitions=2)).with_event_time(
        "ts", lambda e: e, max_delay_s=5.0, idle_timeout_s=idle_timeout_s
    )
    clicks.key_by("k", lambda e: 0).window("w", rf.windows.Tumbling(10.0), rf.windows.Count()).sink(
        "out", rf.testing.Discard()
    )
    plan = build_plan(flow.spec())
    stage = plan.stage(plan.stage_of[stage_of])
    ops = {s: build_op(plan.step(s), "j", 0) for s in stage.steps}
    return EventTime(plan, stage, ops, plan.input_channels(stage.name, 0))


def test_the_input_watermark_is_the_minimum_of_active_channels_and_only_grows() -> None:
    et = _task("w")
    a, b = et.channel_wm
    et.on_watermark(a, 100.0, False)
    et.advance({a, b})
    assert et.input == -INF  # b has said nothing: it holds the watermark back
    et.on_watermark(b, 50.0, False)
    et.advance({a, b})
    assert et.input == 50.0 and et.timed[0].watermark == 50.0
    et.on_watermark(b, 10.0, False)  # a channel going back changes nothing
    et.advance({a, b})
    assert et.input == 50.0
    et.on_watermark(b, 0.0, True)  # idle: only a counts
    et.advance({a, b})
    assert et.input == 100.0
    et.on_watermark(b, 120.0, False)  # active again, ahead of a
    et.advance({a, b})
    assert et.input == 100.0
    et.advance({b})  # a ended (EOS): only b
    assert et.input == 120.0


def test_watermarks_go_out_when_grown_at_most_every_interval_and_at_once_at_infinity() -> None:
    et = _task("w")
    a, b = et.channel_wm
    for ch in (a, b):
        et.on_watermark(ch, 10.0, False)
    et.advance({a, b})
    assert et.due({a, b}, now=100.0) == (10.0, False)
    et.mark_sent((10.0, False), 100.0)
    for ch in (a, b):
        et.on_watermark(ch, 20.0, False)
    et.advance({a, b})
    assert et.due({a, b}, now=100.0 + SEND_INTERVAL_S / 2) is None  # too soon
    assert et.next_deadline({a, b}) == 100.0 + SEND_INTERVAL_S
    assert et.due({a, b}, now=100.0 + SEND_INTERVAL_S) == (20.0, False)
    for ch in (a, b):
        et.on_watermark(ch, INF, False)
    et.advance({a, b})
    assert et.due({a, b}, now=100.0) == (INF, False)  # the end: no waiting


def test_a_generator_makes_the_watermark_and_goes_idle_after_its_timeout() -> None:
    et = _task("src", idle_timeout_s=1.0)
    (gen,) = et.generators
    gen.feed([100.0, 130.0, 120.0])
    et.advance(set())
    assert et.output() == 125.0  # highest timestamp minus max_delay_s
    now = gen.last_record_at
    assert et.due(set(), now) == (125.0, False)
    et.mark_sent((125.0, False), now)
    assert et.due(set(), now + 1.5) == (125.0, True)  # nothing for 1.5 s: idle
    et.mark_sent((125.0, True), now + 1.5)
    assert et.due(set(), now + 2.0) is None
    gen.feed([131.0])
    assert et.due(set(), gen.last_record_at) == (126.0, False)  # active again
    et.input_ended = True  # every reader ended
    et.advance(set())
    assert et.output() == INF


def test_a_lagging_source_partition_holds_the_watermark_back_until_it_ends() -> None:
    et = _task("src")
    (gen,) = et.generators
    gen.set_splits([0, 1])
    gen.split = 0
    gen.feed([500.0])
    assert gen.watermark == -INF  # partition 1 has not read anything yet
    gen.split = 1
    gen.feed([100.0])
    assert gen.watermark == 95.0  # its records are not late: the lowest counts
    gen.ended.add(1)
    assert gen.watermark == 495.0


def test_restored_watermarks_take_the_highest_input_and_follow_source_partitions() -> None:
    old = [
        {"input": 50.0, "max_ts": {"ts": {"0": 70.0}}, "ops": {"w": 50.0}, "sent": 64.0},
        {"input": 60.0, "max_ts": {"ts": {"1": 65.0}}, "ops": {"w": 60.0}, "sent": 60.0},
        {"input": None, "max_ts": {"ts": {"2": None}}, "ops": {"w": None}},  # before "sent"
    ]
    assert merge_restored(old) == {
        "input": 60.0,
        "max_ts": {"ts": {"0": 70.0, "1": 65.0, "2": None}},
        "ops": {"w": 60.0},
        "sent": 64.0,  # the highest sent: every receiver's restored watermark is below it
    }
    et = _task("w")
    et.restore({"input": "inf", "max_ts": {}, "ops": {"w": 60.0}})
    assert et.input == INF and et.timed[0].watermark == 60.0
    assert et.snapshot() == {"input": "inf", "max_ts": {}, "ops": {"w": 60.0}, "sent": None}
    src = _task("src")
    src.restore(merge_restored(old))
    assert src.highest_sent() == 64.0  # before it sends anything again
    (gen,) = src.generators
    gen.set_splits([1, 2])  # this partition reads source partitions 1 and 2 now
    assert gen.max_ts == {1: 65.0, 2: -INF}
