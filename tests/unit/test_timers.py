"""Event-time timers of ``KeyedStream.process`` (ProcessOp), without Ray."""

from __future__ import annotations

import math
import operator
import pickle
import random
from collections.abc import Callable
from typing import Any

import pytest

from rayflow._internal.eventtime.timers import MAX_REARMS, TimerContext, TimerLoopError
from rayflow._internal.runtime.operators import UserCodeError
from rayflow._internal.runtime.window_ops import ProcessOp
from rayflow.errors import BuildError

INF = math.inf
ts_of = operator.itemgetter("ts")


class Run:
    def __init__(self, on_record: Callable[..., Any], on_timer: Callable[..., Any]):
        self.op = ProcessOp("proc", on_record, on_timer, ts_of)
        self.out: list[Any] = []
        self.op.downstream.append(self.out.extend)

    def take(self) -> list[Any]:
        out, self.out[:] = list(self.out), []
        return out


def remind_after(delay: float) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Counts a key's records; a timer ``delay`` after each record reports the count."""

    def on_record(state: int | None, record: dict[str, Any], ctx: TimerContext) -> Any:
        ctx.set_timer(ctx.timestamp + delay)
        return (state or 0) + 1, []

    def on_timer(state: int, ts: float, ctx: TimerContext) -> Any:
        return state, [(ts, state)]

    return on_record, on_timer


def test_timers_fire_once_when_the_watermark_reaches_them_in_time_order() -> None:
    run = Run(*remind_after(10.0))
    run.op.feed([("b", {"ts": 5.0}), ("a", {"ts": 3.0}), ("a", {"ts": 5.0}), ("a", {"ts": 3.0})])
    run.op.advance(12.9)
    assert run.take() == []
    run.op.advance(13.0)  # W >= ts fires
    assert run.take() == [("a", (13.0, 3))]  # the two records at 3 set one timer
    run.op.advance(15.0)
    assert run.take() == [("b", (15.0, 1)), ("a", (15.0, 3))]  # same time: the order set
    run.op.advance(INF)
    assert run.take() == []
    assert run.op.state.values == {"a": (3, None), "b": (1, None)}


def test_ctx_carries_key_timestamp_and_watermark() -> None:
    seen: list[tuple[str, Any, float, float]] = []

    def on_record(state: Any, record: Any, ctx: TimerContext) -> Any:
        seen.append(("record", ctx.key, ctx.timestamp, ctx.watermark))
        ctx.set_timer(record["at"])
        return None, [record["ts"]]

    def on_timer(state: Any, ts: float, ctx: TimerContext) -> Any:
        seen.append(("timer", ctx.key, ctx.timestamp, ctx.watermark))
        return None, []

    run = Run(on_record, on_timer)
    run.op.advance(1.0)
    run.op.feed([("k", {"ts": 2, "at": 7})])
    assert run.take() == [("k", 2)]
    run.op.advance(9.0)
    assert seen == [("record", "k", 2.0, 1.0), ("timer", "k", 7.0, 9.0)]
    assert run.op.state.values == {}  # no state and no timers: the key is gone


def test_deleted_timers_do_not_fire_and_state_expires() -> None:
    def on_record(state: Any, record: Any, ctx: TimerContext) -> Any:
        if record.get("cancel"):
            ctx.delete_timer(record["cancel"])
            return None, []
        ctx.set_timer(record["ts"] + 5)
        return "open", []

    def on_timer(state: Any, ts: float, ctx: TimerContext) -> Any:
        return None, [ts]

    run = Run(on_record, on_timer)
    run.op.feed([("a", {"ts": 1.0}), ("b", {"ts": 1.0}), ("b", {"ts": 2.0, "cancel": 6.0})])
    assert run.op.state.values == {"a": ("open", {6.0})}  # b: no state, no timers
    run.op.advance(INF)
    assert run.take() == [("a", 6.0)]
    assert run.op.state.values == {}


def test_timers_set_by_on_timer_that_are_due_fire_in_the_same_advance() -> None:
    def on_record(state: Any, record: Any, ctx: TimerContext) -> Any:
        ctx.set_timer(record["ts"])
        return 0, []

    def on_timer(state: int, ts: float, ctx: TimerContext) -> Any:
        if state < 3:
            ctx.set_timer(ts + 1)  # at or before the watermark: fires in this advance
        ctx.set_timer(ts + 100)  # after it: waits
        return state + 1, [ts]

    run = Run(on_record, on_timer)
    run.op.feed([("k", {"ts": 10.0})])
    run.op.advance(20.0)
    assert run.take() == [("k", 10.0), ("k", 11.0), ("k", 12.0), ("k", 13.0)]
    assert run.op.state.values == {"k": (4, {110.0, 111.0, 112.0, 113.0})}


def test_a_timer_set_at_or_before_the_watermark_in_on_record_fires_at_the_next_advance() -> None:
    run = Run(*remind_after(0.0))
    run.op.advance(50.0)
    run.op.feed([("k", {"ts": 40.0})])
    assert run.take() == []
    run.op.advance(50.0)  # the same watermark
    assert run.take() == [("k", (40.0, 1))]


def test_a_timer_that_keeps_rearming_itself_is_stopped_with_a_clear_error() -> None:
    def on_record(state: Any, record: Any, ctx: TimerContext) -> Any:
        ctx.set_timer(record["ts"])
        return 1, []

    def on_timer(state: Any, ts: float, ctx: TimerContext) -> Any:
        ctx.set_timer(ts)  # forever due
        return state, []

    run = Run(on_record, on_timer)
    run.op.feed([("k", {"ts": 1.0})])
    with pytest.raises(UserCodeError) as info:
        run.op.advance(5.0)
    assert info.value.step == "proc"
    assert isinstance(info.value.cause, TimerLoopError)
    assert f"more than {MAX_REARMS} timers" in str(info.value.cause)
    assert "set the next one after ctx.watermark" in str(info.value.cause)


def test_rearming_exactly_at_the_watermark_is_caught_too() -> None:
    def on_timer(state: Any, ts: float, ctx: TimerContext) -> Any:
        ctx.set_timer(ctx.watermark)  # due now, again and again
        return state, []

    run = Run(remind_after(0.0)[0], on_timer)
    run.op.feed([("k", {"ts": 1.0})])
    with pytest.raises(UserCodeError) as info:
        run.op.advance(3.0)
    assert isinstance(info.value.cause, TimerLoopError)


def test_timers_accept_datetimes_and_infinity_and_refuse_junk() -> None:
    from datetime import datetime

    def on_record(state: Any, record: Any, ctx: TimerContext) -> Any:
        ctx.set_timer(record["at"])
        return None, []

    run = Run(on_record, lambda s, ts, ctx: (None, [ts]))
    run.op.feed([("a", {"ts": 0.0, "at": datetime(1970, 1, 1, 0, 1)}), ("b", {"ts": 0, "at": INF})])
    run.op.advance(1e12)
    assert run.take() == [("a", 60.0)]
    run.op.advance(INF)  # the end of the input
    assert run.take() == [("b", INF)]
    with pytest.raises(UserCodeError) as info:
        run.op.feed([("c", {"ts": 0.0, "at": "soon"})])
    assert str(info.value.cause).startswith("step 'proc': set_timer got str 'soon'; a timestamp")


def test_user_errors_are_wrapped_with_the_step_and_the_record() -> None:
    run = Run(lambda s, r, ctx: (None, [1 / r["n"]]), lambda s, ts, ctx: (None, []))
    with pytest.raises(UserCodeError) as info:
        run.op.feed([("k", {"ts": 0.0, "n": 1}), ("k", {"ts": 1.0, "n": 0})])
    assert (info.value.step, info.value.record) == ("proc", ("k", {"ts": 1.0, "n": 0}))
    bad = Run(lambda s, r, ctx: "no pair", lambda s, ts, ctx: (None, []))
    with pytest.raises(UserCodeError, match="must return a pair"):
        bad.op.feed([("k", {"ts": 0.0})])
    with pytest.raises(BuildError, match="on_timer must be a function"):
        ProcessOp("p", lambda s, r, c: (s, []), None, ts_of)  # type: ignore[arg-type]


# -- state: snapshots, restore, rescale ----------------------------------------------


def session_counter() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Hand-written sessions with a 5 s gap: each record pushes the key's timer."""

    def on_record(state: Any, record: Any, ctx: TimerContext) -> Any:
        if state is not None:
            ctx.delete_timer(state[1] + 5)
        first = record["ts"] if state is None else min(state[0], record["ts"])
        last = record["ts"] if state is None else max(state[1], record["ts"])
        n = 1 if state is None else state[2] + 1
        ctx.set_timer(last + 5)
        return (first, last, n), []

    def on_timer(state: Any, ts: float, ctx: TimerContext) -> Any:
        return None, [state]

    return on_record, on_timer


def make_batches(seed: int) -> tuple[list[list[tuple[str, dict[str, float]]]], list[float]]:
    rng = random.Random(seed)
    t, items = 0.0, []
    for _ in range(500):
        t += rng.choice([0.5, 0.5, 0.5, 9.0])
        items.append((f"k{rng.randrange(4)}", {"ts": t - rng.randrange(4)}))
    batches = [items[i : i + 20] for i in range(0, len(items), 20)]
    wms = [max(r["ts"] for b in batches[: i + 1] for _, r in b) - 4.0 for i in range(len(batches))]
    return batches, wms


def run_all(run: Run, batches: list[Any], wms: list[float], end: bool = True) -> None:
    for batch, wm in zip(batches, wms, strict=True):
        run.op.feed(batch)
        run.op.advance(wm)
    if end:
        run.op.advance(INF)


def per_key(out: list[Any]) -> dict[str, list[Any]]:
    keyed: dict[str, list[Any]] = {}
    for key, value in out:
        keyed.setdefault(key, []).append(value)
    return keyed


def test_hand_written_sessions_match_a_reference() -> None:
    batches, wms = make_batches(1)
    run = Run(*session_counter())
    run_all(run, batches, wms)
    # The reference: a key's session closes at the first watermark >= last + 5
    # (the watermark moves between batches only).
    expected: dict[str, list[Any]] = {}
    open_: dict[str, list[float]] = {}
    for batch, wm in zip([*batches, []], [*wms, INF], strict=True):
        for key, record in batch:
            ts = record["ts"]
            s = open_.setdefault(key, [ts, ts, 0])
            s[0], s[1], s[2] = min(s[0], ts), max(s[1], ts), s[2] + 1
        for key, s in list(open_.items()):
            if s[1] + 5 <= wm:
                expected.setdefault(key, []).append(tuple(open_.pop(key)))
    assert per_key(run.out) == expected
    assert sum(map(len, expected.values())) > 20
    assert run.op.state.values == {}


def test_incremental_snapshots_see_every_change_and_deletion() -> None:
    batches, wms = make_batches(2)
    run = Run(*session_counter())
    run.op.track_changes()
    mirror: dict[str, Any] = {}
    for batch, wm in zip(batches, [*wms[:-1], INF], strict=True):
        run.op.feed(batch)
        run.op.advance(wm)
        for key in run.op.take_changes() or ():
            if key in run.op.state.values:
                mirror[key] = pickle.loads(pickle.dumps(run.op.state.values[key]))
            else:
                mirror.pop(key, None)
        assert mirror == run.op.state.values
    assert mirror == {}


def test_restore_and_rescale_give_the_uninterrupted_output() -> None:
    batches, wms = make_batches(3)
    whole = Run(*session_counter())
    run_all(whole, batches, wms)

    cut = len(batches) // 2
    first = Run(*session_counter())
    run_all(first, batches[:cut], wms[:cut], end=False)
    snapshot = pickle.dumps((first.op.state.values, first.op.watermark))
    before = first.take()

    restored = Run(*session_counter())
    restored.op.state.values, restored.op.watermark = pickle.loads(snapshot)
    restored.op.restored()
    run_all(restored, batches[cut:], wms[cut:])
    assert per_key(before + restored.out) == per_key(whole.out)

    values, watermark = pickle.loads(snapshot)
    assert any(timers for _, timers in values.values())
    parts = []
    for mine in ({"k0", "k2"}, {"k1", "k3"}):
        part = Run(*session_counter())
        part.op.state.values = {k: v for k, v in values.items() if k in mine}
        part.op.watermark = watermark
        part.op.restored()
        run_all(part, [[kv for kv in b if kv[0] in mine] for b in batches[cut:]], wms[cut:])
        parts.append(part)
    assert per_key(before + parts[0].out + parts[1].out) == per_key(whole.out)


def test_restored_timers_fire_in_time_order_once() -> None:
    run = Run(lambda s, r, ctx: (s, []), lambda s, ts, ctx: (s, [ts]))
    run.op.state.values = {"a": ("x", {3.0, 1.0}), "b": (None, {2.0})}
    run.op.restored()
    run.op.restored()  # rebuilding twice leaves no duplicates behind
    run.op.advance(INF)
    assert run.take() == [("a", 1.0), ("b", 2.0), ("a", 3.0)]
    assert run.op.state.values == {"a": ("x", None)}


def test_failures_report_their_place_and_what_came_before() -> None:
    def on_record(state: Any, record: Any, ctx: TimerContext) -> Any:
        ctx.set_timer(record["ts"] + 1)
        return 1 / record["n"], [record["n"]]

    def on_timer(state: Any, ts: float, ctx: TimerContext) -> Any:
        if ctx.key == "bad":
            raise RuntimeError("no")
        return None, [ts]

    run = Run(on_record, on_timer)
    batch = [("a", {"ts": 0.0, "n": 1}), ("z", {"ts": 0.0, "n": 0}), ("bad", {"ts": 1.0, "n": 2})]
    with pytest.raises(UserCodeError) as info:
        run.op.feed(batch)
    assert (info.value.index, info.value.partial) == (1, [("a", 1)])
    run.op.feed(batch[2:])
    run.op.feed([("c", {"ts": 2.0, "n": 3})])
    with pytest.raises(UserCodeError) as info:
        run.op.advance(INF)
    assert info.value.record == "bad" and "on_timer at 2.0 for key 'bad'" in info.value.what
    assert run.take() == [("bad", 2), ("c", 3), ("a", 1.0)]  # records, then what fired
    run.op.advance(INF)
    assert run.take() == [("c", 3.0)]
