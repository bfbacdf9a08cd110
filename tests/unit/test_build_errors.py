"""Mistakes in building a flow fail at once, naming the step and the fix."""

from __future__ import annotations

import threading

import pytest

import rayflow as rf
from rayflow._internal.job.launcher import check_picklable
from rayflow._internal.plan import build_plan


@pytest.fixture
def src() -> rf.Stream:
    return rf.Dataflow("f").source("src", rf.testing.from_items([1, 2]))


def test_duplicate_step_names(src: rf.Stream) -> None:
    src.map("double", lambda x: x * 2)
    with pytest.raises(rf.BuildError, match=r"step name 'double' is used twice.*own name"):
        src.map("double", lambda x: x * 3)


def test_invalid_step_name(src: rf.Stream) -> None:
    with pytest.raises(rf.BuildError, match=r"step name 'a/b' is not valid"):
        src.map("a/b", str)


def test_non_callable_function(src: rf.Stream) -> None:
    with pytest.raises(rf.BuildError, match=r"step 'bad': map needs a function; got int 42"):
        src.map("bad", 42)  # type: ignore[arg-type]


def test_function_with_the_wrong_number_of_arguments(src: rf.Stream) -> None:
    keyed = src.key_by("k", lambda x: x)
    with pytest.raises(
        rf.BuildError, match=r"step 'sum': the reduce function must accept two arguments"
    ):
        keyed.reduce("sum", lambda acc: acc)


def test_reduce_without_key_by(src: rf.Stream) -> None:
    with pytest.raises(rf.BuildError, match=r"step 'sum': reduce needs a keyed stream.*key_by"):
        src.reduce("sum", lambda a, b: a + b)
    with pytest.raises(rf.BuildError, match=r"stateful_map needs a keyed stream"):
        src.stateful_map("sm", lambda s, v: (s, [v]))


def test_sink_that_is_not_a_sink(src: rf.Stream) -> None:
    with pytest.raises(rf.BuildError, match=r"step 'out': sink must be a rayflow Sink.*map\(\)"):
        src.sink("out", print)  # type: ignore[arg-type]
    with pytest.raises(rf.BuildError, match=r"did you mean Print\(\)"):
        src.sink("out", rf.sinks.Print)  # type: ignore[arg-type]


def test_source_that_is_not_a_source() -> None:
    flow = rf.Dataflow("f")
    with pytest.raises(rf.BuildError, match=r"step 'src': source must be.*from_items"):
        flow.source("src", [1, 2, 3])  # type: ignore[arg-type]


def test_bad_options(src: rf.Stream) -> None:
    with pytest.raises(rf.BuildError, match=r"step 'm': parallelism must be an int >= 1; got 0"):
        src.map("m", str, parallelism=0)
    with pytest.raises(rf.BuildError, match=r"step 'm': unknown option\(s\) paralelism"):
        src.map("m", str, paralelism=2)
    with pytest.raises(rf.BuildError, match=r"step 'm': num_cpus must be a number >= 0"):
        src.map("m", str, num_cpus=-1)
    with pytest.raises(rf.BuildError, match=r"exceeds the flow's max_parallelism 128"):
        src.map("m", str, parallelism=129)


def test_union_with_a_list_hints_at_unpacking(src: rf.Stream) -> None:
    other = src.map("other", str)
    with pytest.raises(rf.BuildError, match=r"did you forget to unpack"):
        src.union("u", [other])  # type: ignore[arg-type]


def test_union_across_flows(src: rf.Stream) -> None:
    foreign = rf.Dataflow("g").source("s", rf.testing.from_items([1]))
    with pytest.raises(rf.BuildError, match=r"cannot union streams of different flows"):
        src.union("u", foreign)


def test_unpicklable_function_is_named_before_anything_runs(src: rf.Stream) -> None:
    lock = threading.Lock()

    def uses_lock(x: int) -> int:
        with lock:
            return x

    src.map("locked", uses_lock).sink("out", rf.testing.Collect())
    plan = build_plan(src.flow.spec())
    with pytest.raises(rf.BuildError, match=r"step 'locked': its function cannot be sent"):
        check_picklable(plan)


def test_missing_files_are_reported_with_the_pattern(tmp_path: object) -> None:
    with pytest.raises(rf.ConfigError, match=r"TextFiles\('/nonexistent/\*.txt'\) matched no"):
        rf.sources.TextFiles("/nonexistent/*.txt")


def test_event_time_mistakes_name_the_step_and_the_fix(src: rf.Stream) -> None:
    W = rf.windows
    with pytest.raises(rf.BuildError, match=r"'w': window needs a keyed stream.*key_by"):
        src.window("w", W.Tumbling(60.0), W.Count())
    keyed = src.key_by("k", lambda x: x)
    with pytest.raises(rf.BuildError, match=r"'w' needs event time.*source 'src'.*with_event_time"):
        keyed.window("w", W.Tumbling(60.0), W.Count())
    timed = src.with_event_time("ts", lambda x: x, max_delay_s=1.0).key_by("k2", lambda x: x)
    with pytest.raises(rf.BuildError, match=r"windower must be rf.windows.Tumbling"):
        timed.window("w", 60.0, W.Count())  # type: ignore[arg-type]
    with pytest.raises(rf.BuildError, match=r"aggregator must be rf.windows.Count"):
        timed.window("w", W.Tumbling(60.0), len)  # type: ignore[arg-type]
    with pytest.raises(rf.BuildError, match=r"max_delay_s must be a number of seconds >= 0"):
        src.with_event_time("ts2", lambda x: x, max_delay_s=-1)
    with pytest.raises(rf.BuildError, match=r"'p'.*on_record.*three arguments"):
        timed.process("p", lambda state, record: (state, []))
    with pytest.raises(rf.BuildError, match=r"'w.late' is reserved"):
        src.map("w.late", str)


def test_on_error_mistakes(src: rf.Stream) -> None:
    with pytest.raises(rf.BuildError, match=r"on_error must be one of 'fail', 'skip', 'dead_le"):
        src.map("m", str, on_error="ignore")
    with pytest.raises(rf.BuildError, match=r"unknown option\(s\) on_error.*function per record"):
        src.sink("out", rf.testing.Discard(), on_error="skip")
    flow = src.flow
    src.map("parse", int, on_error="dead_letter").sink("out2", rf.testing.Discard())
    with pytest.raises(rf.BuildError, match=r"'parse' has on_error='dead_letter'.*dead_letters"):
        flow.spec()
    flow.dead_letters().sink("dead", rf.testing.Discard())
    plan = build_plan(flow.spec())
    assert plan.step("dead_letters").inputs == ("parse.dead_letters",)
    other = rf.Dataflow("g")
    other.source("s", rf.testing.from_items([1])).sink("o", rf.testing.Discard())
    other.dead_letters().sink("d", rf.testing.Discard())
    with pytest.raises(rf.BuildError, match=r"no step has on_error='dead_letter'"):
        other.spec()
