"""Combining before the shuffle (``window(..., combine=True)``), without Ray.

A sender combines each batch with the watermark it last sent; the window
step gets the partials, then that watermark, as a channel delivers them.
Results and late records must equal those of the same window fed the
records themselves, per key in order.
"""

from __future__ import annotations

import math
import operator
import random
import re
from typing import Any

import pytest

import rayflow as rf
from rayflow import windows as W
from rayflow._internal.eventtime.combine import CombineBroken, make_combiner
from rayflow._internal.runtime.event_time import merge_restored
from rayflow._internal.runtime.operators import UserCodeError
from rayflow.errors import BuildError
from tests.unit.test_windowing import Run, batches_of, make_input, watermarks

INF = math.inf
ts_of = operator.itemgetter("ts")


def _combined_run(agg: Any, lateness: float, seed: int) -> tuple[Run, Run, int]:
    """The plain window and the combined one over the same batches and watermarks;
    also how many items crossed to the combined one."""
    items = make_input(seed, n=2_000, keys=4, jitter=12.0)
    batches = batches_of(items, seed, size=120)
    wms = watermarks(batches, max_delay=4.0)
    plain = Run(W.Tumbling(10.0), agg, lateness).run(batches, wms)
    combined = Run(W.Tumbling(10.0), agg, lateness)
    combined.op = type(combined.op)("win", W.Tumbling(10.0), agg, lateness, ts_of, True)
    combined.op.downstream.append(combined.emitted.append)
    combined.op.late_downstream.append(combined.late.extend)
    sent = [-INF]
    combine = make_combiner("win", W.Tumbling(10.0), agg, lateness, ts_of, lambda: sent[0])
    crossed = 0
    for batch, wm in zip(batches, wms, strict=True):
        out = combine(list(batch))
        crossed += len(out)
        combined.op.feed(out)
        combined.op.advance(wm)
        sent[0] = wm  # sent after the batch's items, as send_control does
    combined.op.advance(INF)
    return plain, combined, crossed


@pytest.mark.parametrize("lateness", [0.0, 1.0])
@pytest.mark.parametrize("agg", [W.Count(), W.Sum(lambda r: r["n"])], ids=["count", "sum"])
def test_combined_windows_equal_the_plain_ones_with_the_same_late_records(
    agg: Any, lateness: float
) -> None:
    plain, combined, crossed = _combined_run(agg, lateness, seed=5)
    assert plain.late, "no record was late: the test would not see the lateness rule"
    assert combined.per_key() == plain.per_key()
    assert combined.late == plain.late  # one by one, in their order
    assert combined.op.records_in == plain.op.records_in == 2_000
    assert combined.op.partials_in is not None and 0 < combined.op.partials_in < 2_000
    assert crossed < 2_000 * 0.6  # fewer items cross (many here may be late: raw)


@pytest.mark.parametrize("seed", [3, 17, 29])
def test_two_senders_in_any_interleaving_give_the_plain_results(seed: int) -> None:
    """Two senders, each combining against the watermark it last sent; the window step
    takes their batches and watermarks in a random interleaving (its watermark the
    lower of the two), as a plain window takes the same records the same way."""
    rng = random.Random(seed)
    items = make_input(seed, n=3_000, keys=6, jitter=15.0)
    own = [items[0::2], items[1::2]]  # each sender's records, in its order
    batches = [
        batches_of(part, seed + s, size=rng.choice([40, 90, 200])) for s, part in enumerate(own)
    ]
    wms = [watermarks(b, max_delay=3.0) for b in batches]
    agg = W.Sum(lambda r: r["n"])
    plain = Run(W.Tumbling(10.0), agg, 1.0)
    combined = Run(W.Tumbling(10.0), agg, 1.0)
    combined.op = type(combined.op)("win", W.Tumbling(10.0), agg, 1.0, ts_of, True)
    combined.op.downstream.append(combined.emitted.append)
    combined.op.late_downstream.append(combined.late.extend)
    sent = [-INF, -INF]
    combines = [
        make_combiner("win", W.Tumbling(10.0), agg, 1.0, ts_of, lambda s=s: sent[s])
        for s in range(2)
    ]
    at = [0, 0]
    received = [-INF, -INF]
    while at[0] < len(batches[0]) or at[1] < len(batches[1]):
        s = rng.choice([x for x in range(2) if at[x] < len(batches[x])])
        batch, wm = batches[s][at[s]], wms[s][at[s]]
        at[s] += 1
        plain.op.feed(list(batch))
        combined.op.feed(combines[s](list(batch)))
        sent[s] = received[s] = wm  # the watermark follows the batch on its channel
        low = min(received)
        plain.op.advance(low)
        combined.op.advance(low)
    plain.op.advance(INF)
    combined.op.advance(INF)
    assert plain.late, "no record was late: the test would not see the lateness rule"
    assert combined.per_key() == plain.per_key()
    assert sorted(map(repr, combined.late)) == sorted(map(repr, plain.late))
    assert combined.op.records_in == plain.op.records_in == 3_000


def test_records_that_could_be_late_or_fail_go_on_as_they_are() -> None:
    sent = [100.0]
    combine = make_combiner("win", W.Tumbling(10.0), W.Sum(lambda r: r["n"]), 0.0, ts_of, sent.pop)
    items = [
        ("a", {"ts": 95.0, "n": 1}),  # window [90, 100) closes at 100 <= T: may be late
        ("a", {"ts": 101.0, "n": 2}),
        ("a", {"ts": 102.0, "n": 3}),
        ("b", {"ts": 103.0, "n": "x"}),  # its sum fails (str + int) on the second
        ("b", {"ts": 104.0, "n": 4}),
        (["unhashable"], {"ts": 105.0, "n": 5}),
        ("c", {"ts": "soon", "n": 6}),  # a bad timestamp
    ]
    out = combine(items)
    assert ("a", 100.0, 5, 2) in out and ("b", 100.0, "x", 1) in out
    assert [kv for kv in out if len(kv) == 2] == [items[0], items[4], items[5], items[6]]


def test_a_partial_that_comes_after_its_window_closed_fails_the_step() -> None:
    run = Run(W.Tumbling(10.0), W.Count())
    run.op = type(run.op)("win", W.Tumbling(10.0), W.Count(), 0.0, ts_of, True)
    run.op.advance(100.0)
    with pytest.raises(CombineBroken, match=r"a partial of 3 records for window \[80.0, 90.0\)"):
        run.op.feed([("a", 80.0, 3, 3)])


def test_a_failing_record_after_partials_is_named_by_its_place_in_the_batch() -> None:
    run = Run(W.Tumbling(10.0), W.Sum(lambda r: r["n"]))
    run.op = type(run.op)("win", W.Tumbling(10.0), W.Sum(lambda r: r["n"]), 0.0, ts_of, True)
    batch = [("a", 100.0, 5, 2), ("a", {"ts": 101.0, "n": 1}), ("a", {"ts": 102.0})]
    with pytest.raises(UserCodeError) as caught:
        run.op.feed(batch)
    assert caught.value.index == 2 and caught.value.step == "win"
    assert run.op.records_in == 4  # 2 in the partial, and the 2 records fed


def test_the_watermark_sent_is_snapshotted_and_a_rescale_keeps_the_highest() -> None:
    merged = merge_restored([{"sent": 12.0, "ops": {}}, {"sent": 30.0, "ops": {}}, {}])
    assert merged["sent"] == 30.0


def _flow(**window: Any) -> rf.Dataflow:
    flow = rf.Dataflow("c", parallelism=2)
    timed = flow.source(
        "s", rf.sources.Generator(lambda p, i: ("k", float(i)), limit=9)
    ).with_event_time("ts", lambda e: e[1], **window.pop("event_time", {}))
    timed.key_by("k", lambda e: e[0]).window("w", **window).sink("out", rf.testing.Collect())
    return flow


@pytest.mark.parametrize(
    "window,message",
    [
        (
            {"windower": W.Session(5.0), "aggregator": W.Count()},
            "combine=True works with rf.windows.Tumbling windows; got Session",
        ),
        (
            {"windower": W.Sliding(10.0, every_s=5.0), "aggregator": W.Count()},
            "combine=True works with rf.windows.Tumbling windows; got Sliding",
        ),
        (
            {"windower": W.Tumbling(5.0), "aggregator": W.Collect()},
            "combine=True works with rf.windows.Count() and Sum(fn); got Collect",
        ),
        (
            {
                "windower": W.Tumbling(5.0),
                "aggregator": W.Count(),
                "event_time": {"idle_timeout_s": 2.0},
            },
            "with_event_time step 'ts' has idle_timeout_s=2.0",
        ),
    ],
    ids=["session", "sliding", "collect", "idle"],
)
def test_combine_is_refused_where_it_cannot_keep_the_results(
    window: dict[str, Any], message: str
) -> None:
    with pytest.raises(BuildError, match=r"step .w.: .*" + re.escape(message)):
        _flow(combine=True, **window)


def test_combine_must_be_a_bool() -> None:
    with pytest.raises(BuildError, match="combine must be True or False; got 'yes'"):
        _flow(windower=W.Tumbling(5.0), aggregator=W.Count(), combine="yes")


def test_a_combining_sender_is_kept_from_partial_recovery_and_its_receiver_is_not() -> None:
    from rayflow._internal.job.failover import cut_dependent
    from rayflow._internal.plan import build_plan

    plan = build_plan(_flow(windower=W.Tumbling(5.0), aggregator=W.Count(), combine=True).spec())
    found = {step: cut_dependent(plan, stage.name) for stage in plan.stages for step in stage.steps}
    assert "combines its records per slice for window 'w'" in str(found["s"])
    assert found["w"] is None
    plain = build_plan(_flow(windower=W.Tumbling(5.0), aggregator=W.Count()).spec())
    assert all(cut_dependent(plain, stage.name) is None for stage in plain.stages)
