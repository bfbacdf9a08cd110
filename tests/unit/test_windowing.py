"""Event-time windows (rf.windows + WindowOp) against a plain-Python reference, without Ray.

The reference keeps every record of every window and aggregates them when
the window fires; the operator aggregates incrementally with heaps and
per-key dicts. Input is out of order (jittered timestamps, each batch
shuffled), with several keys, fed in batches with the watermark advancing
in between (max seen timestamp - max_delay, as a source would), then +inf.
Timestamps and sizes are multiples of 1/4 so the arithmetic is exact on
both sides.
"""

from __future__ import annotations

import heapq
import math
import operator
import pickle
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import cloudpickle
import pytest

from rayflow import windows as W
from rayflow._internal.eventtime.timestamps import to_seconds
from rayflow._internal.runtime.operators import UserCodeError
from rayflow._internal.runtime.window_ops import WindowOp
from rayflow.errors import BuildError
from rayflow.windows import Result

INF = math.inf
Rec = dict[str, Any]
Item = tuple[str, Rec]


# -- input -------------------------------------------------------------------------


def make_input(
    seed: int, n: int = 600, keys: int = 5, jitter: float = 8.0, spacing: float = 0.5
) -> list[Item]:
    """Records in arrival order: timestamps grow by ``spacing`` on average, each
    moved back by up to ``jitter`` seconds; keys random, with idle stretches."""
    rng = random.Random(seed)
    out: list[Item] = []
    t = 1000.0
    for i in range(n):
        t += spacing if rng.random() < 0.9 else spacing * 40  # sometimes a long pause
        ts = t - math.floor(rng.random() * jitter * 4) / 4
        key = f"k{rng.randrange(keys)}"
        out.append((key, {"ts": ts, "i": i, "n": rng.randrange(1, 10)}))
    return out


def batches_of(items: list[Item], seed: int, size: int = 37) -> list[list[Item]]:
    """Consecutive batches, each shuffled (disorder within a batch too)."""
    rng = random.Random(seed)
    out = []
    for i in range(0, len(items), size):
        batch = items[i : i + size]
        rng.shuffle(batch)
        out.append(batch)
    return out


def watermarks(batches: list[list[Item]], max_delay: float) -> list[float]:
    """The watermark after each batch: highest timestamp so far minus max_delay."""
    hi = -INF
    out = []
    for batch in batches:
        hi = max([hi, *(r["ts"] for _, r in batch)])
        out.append(hi - max_delay)
    return out


# -- the reference -----------------------------------------------------------------


@dataclass
class Agg:
    """An aggregator with the plain-Python value it must produce from a window's records.

    ``value(records)`` gets the window's records as (ts, seq, record), seq being
    the arrival order; ``sessions`` is True for Session windows.
    """

    name: str
    make: Callable[[], Any]
    value: Callable[[list[tuple[float, int, Rec]], bool], Any]


def _by_arrival(rs: list[tuple[float, int, Rec]]) -> list[Rec]:
    return [r for _, _, r in sorted(rs, key=lambda x: x[1])]


def _by_time(rs: list[tuple[float, int, Rec]]) -> list[Rec]:
    return [r for _, _, r in sorted(rs, key=lambda x: (x[0], x[1]))]


AGGS = {
    "count": Agg("count", W.Count, lambda rs, s: len(rs)),
    "sum": Agg("sum", lambda: W.Sum(lambda r: r["n"]), lambda rs, s: sum(r["n"] for *_, r in rs)),
    # Non-commutative: checks arrival order (timestamp order in sessions, which buffer).
    "fold": Agg(
        "fold",
        lambda: W.Fold(lambda acc, r: [*acc, r["i"]], initial=[]),
        lambda rs, s: [r["i"] for r in (_by_time(rs) if s else _by_arrival(rs))],
    ),
    "fold_merge": Agg(
        "fold_merge",
        lambda: W.Fold(lambda acc, r: acc + r["n"], 0, merge=operator.add),
        lambda rs, s: sum(r["n"] for *_, r in rs),
    ),
    # A mutable initial must be copied per window (else windows share one list).
    "fold_mutable": Agg(
        "fold_mutable",
        lambda: W.Fold(lambda acc, r: (acc.append(r["i"]), acc)[1], initial=[]),
        lambda rs, s: [r["i"] for r in (_by_time(rs) if s else _by_arrival(rs))],
    ),
    "reduce_max": Agg(
        "reduce_max",
        lambda: W.Reduce(lambda a, b: a if (a["n"], a["i"]) >= (b["n"], b["i"]) else b),
        lambda rs, s: max((r for *_, r in rs), key=lambda r: (r["n"], r["i"])),
    ),
    "collect": Agg("collect", W.Collect, lambda rs, s: _by_time(rs)),
}


def reference(
    windower: Any, agg: Agg, batches: list[list[Item]], wms: list[float], lateness: float
) -> tuple[dict[str, list[Result]], list[Item]]:
    """Per key, the results in order of window start; and the late items, in arrival order."""
    results: dict[str, list[Result]] = defaultdict(list)
    late: list[Item] = []
    sessions = isinstance(windower, W.Session)
    held: dict[tuple[str, float, float], list[tuple[float, int, Rec]]] = defaultdict(list)
    wm = -INF
    seq = 0

    def fire(upto: float) -> None:
        for (key, start, end), rs in sorted(held.items(), key=lambda kv: kv[0][2]):
            if end + lateness <= upto:
                results[key].append(Result(start, end, agg.value(rs, sessions)))
                del held[(key, start, end)]

    for batch, next_wm in zip(batches, wms, strict=True):
        for key, rec in batch:
            ts = rec["ts"]
            seq += 1
            entry = (ts, seq, rec)
            if sessions:
                gap = windower.gap_s
                mine = [w for w in held if w[0] == key and w[1] <= ts + gap and ts <= w[2]]
                if not mine and ts + gap + lateness <= wm:
                    late.append((key, rec))
                    continue
                merged = [entry]
                for w in mine:
                    merged += held.pop(w)
                start = min([ts, *(w[1] for w in mine)])
                end = max([ts + gap, *(w[2] for w in mine)])
                held[(key, start, end)] = merged
            else:
                wins = [w for w in windows_of(windower, ts) if w[1] + lateness > wm]
                if not wins:
                    late.append((key, rec))
                for start, end in wins:
                    held[(key, start, end)].append(entry)
        wm = max(wm, next_wm)
        fire(wm)
    fire(INF)
    for key in results:
        results[key].sort(key=lambda r: r.start)
    return dict(results), late


def windows_of(windower: Any, ts: float) -> list[tuple[float, float]]:
    """Every aligned window holding ts, from the definition (integer window numbers)."""
    if isinstance(windower, W.Tumbling):
        size, every = windower.size_s, windower.size_s
    else:
        size, every = windower.size_s, windower.every_s
    off = windower.offset_s
    out = []
    j = math.floor((ts - off) / every)
    while j * every + off + size > ts:
        assert j * every + off <= ts
        out.append((j * every + off, j * every + off + size))
        j -= 1
    return out


# -- running the operator ----------------------------------------------------------


class Run:
    """A WindowOp with its outputs collected, per advance and late."""

    def __init__(
        self,
        windower: Any,
        agg: Any,
        lateness: float = 0.0,
        ts_fn: Callable[[Any], Any] = operator.itemgetter("ts"),
    ):
        self.op = WindowOp("win", windower, agg, lateness, ts_fn)
        self.emitted: list[list[Any]] = []
        self.late: list[Item] = []
        self.op.downstream.append(self.emitted.append)
        self.op.late_downstream.append(self.late.extend)

    def run(self, batches: list[list[Item]], wms: list[float], end: bool = True) -> Run:
        for batch, wm in zip(batches, wms, strict=True):
            self.op.feed(batch)
            self.op.advance(wm)
        if end:
            self.op.advance(INF)
        return self

    def per_key(self) -> dict[str, list[Result]]:
        out: dict[str, list[Result]] = defaultdict(list)
        for batch in self.emitted:
            ends = [r.end for _, r in batch]
            assert ends == sorted(ends), "one advance fires by window end"
            for key, result in batch:
                assert type(result) is Result
                out[key].append(result)
        return dict(out)


def merge_per_key(*parts: dict[str, list[Result]]) -> dict[str, list[Result]]:
    out: dict[str, list[Result]] = defaultdict(list)
    for part in parts:
        for key, results in part.items():
            out[key] += results
    return dict(out)


WINDOWERS = {
    "tumbling": W.Tumbling(10.0),
    "tumbling_offset": W.Tumbling(7.5, offset_s=1.25),
    "sliding": W.Sliding(10.0, every_s=2.5),
    "sliding_uneven": W.Sliding(10.0, 4.0, offset_s=0.5),  # 4 does not divide 10
    "session": W.Session(gap_s=3.0),
}


# -- against the reference ---------------------------------------------------------


@pytest.mark.parametrize("agg", sorted(AGGS))
@pytest.mark.parametrize("win", sorted(WINDOWERS))
def test_in_order_enough_nothing_is_late_and_results_match(win: str, agg: str) -> None:
    windower, a = WINDOWERS[win], AGGS[agg]
    items = make_input(seed=sorted(WINDOWERS).index(win) * 10 + sorted(AGGS).index(agg))
    batches = batches_of(items, seed=1)
    wms = watermarks(batches, max_delay=10.0)  # more than the disorder
    run = Run(windower, a.make()).run(batches, wms)
    expected, late = reference(windower, a, batches, wms, 0.0)
    assert late == [] and run.late == [] and run.op.records_late == 0
    assert run.per_key() == expected
    assert sum(map(len, expected.values())) > 20  # the input does make many windows
    assert run.op.state.values == {}  # every window fired: state expired


@pytest.mark.parametrize("lateness", [0.0, 4.0])
@pytest.mark.parametrize("agg", ["count", "fold", "collect", "reduce_max"])
@pytest.mark.parametrize("win", sorted(WINDOWERS))
def test_late_records_go_to_the_late_output(win: str, agg: str, lateness: float) -> None:
    windower, a = WINDOWERS[win], AGGS[agg]
    items = make_input(seed=7, jitter=30.0)
    batches = batches_of(items, seed=2, size=23)
    wms = watermarks(batches, max_delay=2.0)  # less than the disorder
    run = Run(windower, a.make(), lateness).run(batches, wms)
    expected, late = reference(windower, a, batches, wms, lateness)
    assert len(late) > 20  # the case is exercised
    assert run.late == late
    assert run.op.records_late == len(late)
    assert run.per_key() == expected
    assert run.op.state.values == {}


def test_allowed_lateness_keeps_records_that_would_be_late() -> None:
    items = make_input(seed=3, jitter=30.0)
    batches = batches_of(items, seed=3)
    wms = watermarks(batches, max_delay=2.0)
    strict = Run(W.Tumbling(10.0), W.Count()).run(batches, wms)
    lenient = Run(W.Tumbling(10.0), W.Count(), lateness=6.0).run(batches, wms)
    assert 0 < lenient.op.records_late < strict.op.records_late
    counted = sum(r.value for rs in lenient.per_key().values() for r in rs)
    assert counted + lenient.op.records_late == len(items)


def test_a_window_fires_when_the_watermark_reaches_its_end_plus_lateness() -> None:
    run = Run(W.Tumbling(10.0), W.Count(), lateness=2.0)
    run.op.feed([("a", {"ts": 3.0}), ("a", {"ts": 9.75})])
    run.op.advance(11.75)
    assert run.emitted == []
    run.op.advance(12.0)
    assert run.emitted == [[("a", Result(0.0, 10.0, 2))]]
    run.op.feed([("a", {"ts": 5.0})])  # its window has fired: late
    run.op.feed([("a", {"ts": 10.0})])  # [10, 20): open
    assert run.late == [("a", {"ts": 5.0})]
    run.op.advance(11.0)  # never backwards
    assert run.op.watermark == 12.0
    run.op.advance(INF)
    assert run.emitted[-1] == [("a", Result(10.0, 20.0, 1))]


def test_sliding_record_partly_late_goes_into_its_open_windows_only() -> None:
    run = Run(W.Sliding(10.0, every_s=5.0), W.Collect())
    run.op.advance(10.0)  # [0, 10) is closed, [5, 15) open
    run.op.feed([("a", {"ts": 7.0})])
    run.op.advance(INF)
    assert run.late == []
    assert run.per_key() == {"a": [Result(5.0, 15.0, [{"ts": 7.0}])]}


def test_a_record_bridging_two_sessions_merges_them() -> None:
    run = Run(W.Session(gap_s=10.0), W.Collect())
    run.op.feed([("u", {"ts": 20.0, "v": "c"}), ("u", {"ts": 0.0, "v": "a"})])
    run.op.feed([("v", {"ts": 10.0, "v": "other key"})])
    assert sorted(s[:2] for s in run.op.state.values["u"]) == [[0.0, 10.0], [20.0, 30.0]]
    run.op.feed([("u", {"ts": 10.0, "v": "x"})])  # [10, 20) touches both
    assert [s[:2] for s in run.op.state.values["u"]] == [[0.0, 30.0]]
    run.op.feed([("u", {"ts": 2.0, "v": "y"})])
    run.op.advance(INF)
    (result,) = run.per_key()["u"]
    assert result[:2] == (0.0, 30.0)
    assert [r["v"] for r in result.value] == ["a", "y", "x", "c"]  # timestamp order
    assert run.per_key()["v"] == [Result(10.0, 20.0, [{"ts": 10.0, "v": "other key"}])]


def test_merging_sessions_combine_accumulators_in_start_order() -> None:
    run = Run(W.Session(gap_s=10.0), W.Reduce(operator.add), ts_fn=lambda r: int(r[2:]))
    run.op.feed([("u", "a@0"), ("u", "c@20"), ("u", "b@10")])
    run.op.advance(INF)
    # [0,10) and [20,30) merge (reduce(earlier, later)), then the bridging record is added.
    assert run.per_key() == {"u": [Result(0.0, 30.0, "a@0c@20b@10")]}


def test_fold_in_sessions_without_merge_folds_in_timestamp_order_ties_in_arrival() -> None:
    fold = W.Fold(lambda acc, r: acc + r[1], "")
    run = Run(W.Session(gap_s=5.0), fold, ts_fn=operator.itemgetter(0))
    run.op.feed([("k", (3.0, "c")), ("k", (1.0, "a")), ("k", (3.0, "d")), ("k", (2.0, "b"))])
    run.op.advance(INF)
    assert run.per_key() == {"k": [Result(1.0, 8.0, "abcd")]}


def test_a_closed_fresh_session_that_reaches_an_open_one_extends_it_backwards() -> None:
    run = Run(W.Session(gap_s=10.0), W.Count())
    run.op.feed([("u", {"ts": 95.0})])
    run.op.advance(100.0)
    run.op.feed([("u", {"ts": 90.0})])  # its own [90, 100) is closed, but it touches [95, 105)
    run.op.feed([("u", {"ts": 79.0})])  # [79, 89) is closed and reaches no open session
    run.op.feed([("u", {"ts": 80.0})])  # [80, 90) is closed but touches [90, 105)
    assert run.late == [("u", {"ts": 79.0})]
    run.op.advance(INF)
    assert run.per_key() == {"u": [Result(80.0, 105.0, 3)]}


def test_results_are_picklable_values() -> None:
    result = Result(0.0, 60.0, [1, 2])
    assert pickle.loads(pickle.dumps(result)) == result
    assert repr(result) == "Result(start=0.0, end=60.0, value=[1, 2])"
    assert result.start == 0.0 and result.end == 60.0 and result.value == [1, 2]


# -- state: expiry, snapshots, restore, rescale --------------------------------------


@pytest.mark.parametrize("agg", ["count", "fold", "collect"])
@pytest.mark.parametrize("win", sorted(WINDOWERS))
def test_incremental_snapshots_see_every_change_and_deletion(win: str, agg: str) -> None:
    """A mirror rebuilt only from take_changes() stays equal to the live values."""
    windower, a = WINDOWERS[win], AGGS[agg]
    batches = batches_of(make_input(seed=5, jitter=12.0), seed=5)
    wms = [*watermarks(batches, max_delay=3.0)[:-1], INF]
    op = Run(windower, a.make()).op
    op.track_changes()
    mirror: dict[str, Any] = {}
    for batch, wm in zip(batches, wms, strict=True):
        op.feed(batch)
        op.advance(wm)
        changed = op.take_changes()
        assert changed is not None
        for key in changed:
            if key in op.state.values:
                mirror[key] = pickle.loads(pickle.dumps(op.state.values[key]))
            else:
                mirror.pop(key, None)
        assert mirror == op.state.values
    assert mirror == {}


@pytest.mark.parametrize("agg", ["count", "fold", "collect", "sum"])
@pytest.mark.parametrize("win", sorted(WINDOWERS))
def test_restore_from_a_snapshot_gives_the_uninterrupted_output(win: str, agg: str) -> None:
    windower, a = WINDOWERS[win], AGGS[agg]
    batches = batches_of(make_input(seed=11, jitter=12.0), seed=11)
    wms = watermarks(batches, max_delay=3.0)
    whole = Run(windower, a.make()).run(batches, wms)

    cut = len(batches) // 2
    first = Run(windower, a.make()).run(batches[:cut], wms[:cut], end=False)
    snapshot = pickle.dumps((first.op.state.values, first.op.watermark))
    assert first.op.state.values  # open windows to carry over
    emitted, late = list(first.emitted), list(first.late)
    first.run(batches[cut:], wms[cut:])  # the old op goes on: the snapshot must not move

    second = Run(windower, a.make())
    second.op.state.values, second.op.watermark = pickle.loads(snapshot)
    second.op.restored()
    second.run(batches[cut:], wms[cut:])
    second.emitted[:0], second.late[:0] = emitted, late

    assert second.per_key() == whole.per_key()
    assert second.late == whole.late
    assert first.per_key() == whole.per_key()


@pytest.mark.parametrize("win", sorted(WINDOWERS))
def test_state_split_by_key_continues_in_two_operators(win: str) -> None:
    """A rescale: each new operator gets some keys' values and the watermark."""
    windower = WINDOWERS[win]
    batches = batches_of(make_input(seed=13, jitter=12.0), seed=13)
    wms = watermarks(batches, max_delay=3.0)
    whole = Run(windower, W.Collect()).run(batches, wms)

    cut = len(batches) // 3
    before = Run(windower, W.Collect()).run(batches[:cut], wms[:cut], end=False)
    values = pickle.loads(pickle.dumps(before.op.state.values))
    odd = {"k1", "k3"}
    parts = []
    for mine in (lambda k: k in odd, lambda k: k not in odd):
        part = Run(windower, W.Collect())
        part.op.state.values = {k: v for k, v in values.items() if mine(k)}
        part.op.watermark = before.op.watermark
        part.op.restored()
        part.run([[kv for kv in b if mine(kv[0])] for b in batches[cut:]], wms[cut:])
        parts.append(part)
    assert parts[0].op.state.values == {} and parts[1].op.state.values == {}
    combined = merge_per_key(before.per_key(), parts[0].per_key(), parts[1].per_key())
    assert combined == whole.per_key()
    late = before.late + parts[0].late + parts[1].late
    assert sorted(late, key=lambda kv: kv[1]["i"]) == sorted(whole.late, key=lambda kv: kv[1]["i"])


@pytest.mark.parametrize("win", ["tumbling", "session"])
def test_duplicate_index_entries_still_fire_each_window_once(win: str) -> None:
    run = Run(WINDOWERS[win], W.Count())
    run.op.feed([("a", {"ts": 1.0}), ("b", {"ts": 15.0}), ("a", {"ts": 2.0})])
    engine: Any = run.op._engine
    heap = engine._starts if win == "tumbling" else engine._heap
    heap += list(heap)
    heapq.heapify(heap)
    run.op.advance(INF)
    end = {"tumbling": (10.0, 20.0), "session": (5.0, 18.0)}[win]
    start = {"tumbling": (0.0, 10.0), "session": (1.0, 15.0)}[win]
    assert run.per_key() == {
        "a": [Result(start[0], end[0], 2)],
        "b": [Result(start[1], end[1], 1)],
    }


# -- timestamps, errors, validation --------------------------------------------------


def test_timestamps_may_be_ints_floats_or_datetimes() -> None:
    assert to_seconds(5, "s") == 5.0 and type(to_seconds(5, "s")) is float
    assert to_seconds(2.5, "s") == 2.5
    naive = datetime(2024, 1, 1, 0, 0, 30)
    assert to_seconds(naive, "s") == 1704067230.0  # 2024-01-01T00:00:30Z
    aware = datetime(2024, 1, 1, 2, 0, 30, tzinfo=timezone(timedelta(hours=2)))
    assert to_seconds(aware, "s") == to_seconds(naive, "s")
    run = Run(W.Tumbling(60.0), W.Count())
    run.op.feed([("a", {"ts": naive}), ("a", {"ts": 1704067259}), ("a", {"ts": 1704067199.5})])
    run.op.advance(INF)
    start = 1704067200.0  # 2024-01-01T00:00:00Z
    assert run.per_key() == {"a": [Result(start - 60, start, 1), Result(start, start + 60, 2)]}


def test_a_bad_timestamp_names_the_step_the_value_and_what_is_expected() -> None:
    expected = r"step 'clicks': the timestamp function returned str '2024-01-01'; .*int or float"
    with pytest.raises(TypeError, match=expected):
        to_seconds("2024-01-01", "clicks")
    with pytest.raises(ValueError, match="finite"):
        to_seconds(float("nan"), "clicks")
    run = Run(W.Tumbling(60.0), W.Count())
    with pytest.raises(UserCodeError) as info:
        run.op.feed([("a", {"ts": 1.0}), ("a", {"ts": None})])
    assert info.value.step == "win" and info.value.record == ("a", {"ts": None})
    assert isinstance(info.value.cause, TypeError)
    with pytest.raises(UserCodeError) as info:
        run.op.feed([("a", {"ts": float("inf")})])
    assert isinstance(info.value.cause, ValueError)


def test_user_function_errors_name_the_step_and_the_record() -> None:
    op = WindowOp("sums", W.Tumbling(10.0), W.Sum(lambda r: r["n"]), 0.0, lambda r: r["ts"])
    with pytest.raises(UserCodeError) as info:
        op.feed([("a", {"ts": 1.0, "n": 1}), ("a", {"ts": 2.0})])
    assert info.value.step == "sums" and info.value.record == ("a", {"ts": 2.0})
    assert isinstance(info.value.cause, KeyError)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: W.Tumbling(0), r"Tumbling\(size_s=0.*size_s must be > 0"),
        (lambda: W.Tumbling("60"), r"size_s must be a number of seconds; got str '60'"),
        (lambda: W.Tumbling(60.0, offset_s=math.nan), "offset_s must be a finite"),
        (lambda: W.Sliding(60.0, every_s=120.0), r"every_s must be <= size_s.*Tumbling\(60.0\)"),
        (lambda: W.Sliding(60.0, every_s=-1), "every_s must be > 0"),
        (lambda: W.Session(gap_s=0.0), r"Session\(gap_s=0.0\): gap_s must be > 0"),
        (lambda: W.Session(gap_s=math.inf), "gap_s must be a finite"),
        (lambda: W.Sum(3), r"Sum: fn must be a function record -> number; got int 3"),
        (lambda: W.Fold(lambda acc: acc, 0), r"Fold: fn must be .* taking 2 arguments"),
        (lambda: W.Fold(operator.add, 0, merge="x"), "Fold: merge must be a function"),
        (lambda: W.Reduce(None), "Reduce: fn must be a function"),
    ],
)
def test_bad_arguments_are_refused_with_the_value_and_the_fix(build: Any, message: str) -> None:
    with pytest.raises(BuildError, match=message):
        build()


def test_bad_lateness_windower_or_aggregator_are_refused() -> None:
    ts = operator.itemgetter("ts")
    with pytest.raises(BuildError, match=r"allowed_lateness_s must be .* >= 0; got -1"):
        WindowOp("w", W.Tumbling(1.0), W.Count(), -1, ts)
    with pytest.raises(BuildError, match="windower must be"):
        WindowOp("w", W.Count(), W.Count(), 0.0, ts)
    with pytest.raises(BuildError, match="aggregator must be"):
        WindowOp("w", W.Tumbling(1.0), W.Tumbling(1.0), 0.0, ts)


def test_windowers_and_aggregators_pickle() -> None:
    plain = [W.Tumbling(60.0, offset_s=5), W.Sliding(60, 10), W.Session(30), W.Count(), W.Collect()]
    for obj in plain:
        assert pickle.loads(pickle.dumps(obj)) == obj
    fold = cloudpickle.loads(cloudpickle.dumps(W.Fold(lambda a, r: a + r, 0, merge=operator.add)))
    assert fold.fn(1, 2) == 3 and fold.initial == 0 and fold.merge is operator.add
    assert W.Tumbling(60) == W.Tumbling(60.0) and W.Tumbling(60).size_s.__class__ is float
    assert repr(W.Sliding(300.0, every_s=60.0)) == (
        "Sliding(size_s=300.0, every_s=60.0, offset_s=0.0)"
    )


def test_a_failing_record_reports_its_place_and_what_came_before() -> None:
    """What on_error="skip"/"dead_letter" needs to set one record aside and go on."""
    run = Run(W.Tumbling(10.0), W.Count())
    run.op.advance(20.0)
    batch = [("a", {"ts": 1.0}), ("a", {"ts": 25.0}), ("b", {"ts": "x"}), ("a", {"ts": 26.0})]
    with pytest.raises(UserCodeError) as info:
        run.op.feed(batch)
    assert (info.value.index, info.value.partial) == (2, [])
    assert run.late == [("a", {"ts": 1.0})]  # sent before the failure, not lost
    run.op.feed(batch[3:])
    run.op.advance(INF)
    assert run.per_key() == {"a": [Result(20.0, 30.0, 2)]}


def test_a_failure_while_firing_emits_what_fired_before_and_can_go_on() -> None:
    def fold(acc: int, record: dict[str, Any]) -> int:
        if record.get("boom"):
            raise ValueError("boom")
        return acc + 1

    run = Run(W.Session(gap_s=5.0), W.Fold(fold, 0))  # no merge: folds at firing
    run.op.feed([("a", {"ts": 0.0}), ("b", {"ts": 1.0, "boom": True}), ("c", {"ts": 2.0})])
    with pytest.raises(UserCodeError) as info:
        run.op.advance(INF)
    assert info.value.step == "win" and info.value.record == "b"
    assert "firing the window [1.0, 6.0) of key 'b'" in info.value.what
    assert run.per_key() == {"a": [Result(0.0, 5.0, 1)]}
    run.op.advance(INF)
    assert run.per_key() == {"a": [Result(0.0, 5.0, 1)], "c": [Result(2.0, 7.0, 1)]}
    assert run.op.state.values == {}


def test_collect_never_compares_records_with_equal_timestamps() -> None:
    class Unordered:
        def __lt__(self, other: Any) -> bool:
            raise TypeError("no order")

    run = Run(W.Tumbling(10.0), W.Collect(), ts_fn=lambda r: 1.0)
    a, b = Unordered(), Unordered()
    run.op.feed([("k", a), ("k", b), ("j", a)])
    run.op.advance(INF)
    assert run.per_key() == {"k": [Result(0.0, 10.0, [a, b])], "j": [Result(0.0, 10.0, [a])]}


def test_a_failure_while_firing_aligned_windows_keeps_the_other_keys() -> None:
    from rayflow._internal.eventtime.windowing import CollectKernel

    class Failing(CollectKernel):  # no built-in aggregator runs user code when firing
        def result(self, acc: Any) -> Any:
            if any(r == "bad" for _, r in acc):
                raise ValueError("bad window")
            return super().result(acc)

    run = Run(W.Tumbling(10.0), W.Collect(), ts_fn=lambda r: 1.0)
    engine: Any = run.op._engine
    engine.kernel = Failing()
    run.op.feed([("x", "ok"), ("b", "bad"), ("y", "ok")])
    with pytest.raises(UserCodeError, match="bad window"):
        run.op.advance(INF)
    assert run.per_key() == {"x": [Result(0.0, 10.0, ["ok"])]}
    run.op.advance(INF)
    assert run.per_key() == {"x": [Result(0.0, 10.0, ["ok"])], "y": [Result(0.0, 10.0, ["ok"])]}
    assert run.op.state.values == {}
