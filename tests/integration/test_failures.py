"""A failing user function fails the job with a useful error, and nothing hangs."""

from __future__ import annotations

import pytest

import rayflow as rf


def _explode(x: int) -> float:
    return 100 / (x - 1234)


def test_user_exception_names_step_partition_record_and_traceback() -> None:
    flow = rf.Dataflow("fails", parallelism=2)
    src = flow.source("nums", rf.testing.from_items(range(5000), partitions=2))
    src.map("explode", _explode).sink("out", rf.testing.Collect())
    with pytest.raises(rf.JobFailedError) as info:
        rf.run(flow)
    err = info.value
    assert err.step == "explode"
    assert err.partition == 0  # 1234 is in the first half of the items
    text = str(err)
    assert "step 'explode' (partition 0): ZeroDivisionError: division by zero" in text
    assert "record: 1234" in text
    assert "return 100 / (x - 1234)" in text  # the original traceback
    # The job's actors are gone: its name can be used again right away.
    with pytest.raises(rf.JobFailedError):
        rf.run(flow)


@pytest.mark.parametrize("keyed_parallelism", [2, 1])
def test_a_bad_key_is_blamed_on_the_key_by_step(keyed_parallelism: int) -> None:
    """A shuffle's router checks keys; at parallelism 1 the keyed step shares the source's
    actor (no router), and the key is checked all the same: it must work at any other."""
    flow = rf.Dataflow("badkey", parallelism=1)
    src = flow.source("src", rf.testing.from_items([1, 2, 3]))
    keyed = src.key_by("listkey", lambda x: [x])  # lists are not hashable
    keyed.reduce("sum", lambda a, b: a + b, parallelism=keyed_parallelism).sink(
        "out", rf.testing.Collect(), parallelism=keyed_parallelism
    )
    with pytest.raises(rf.JobFailedError) as info:
        rf.run(flow)
    assert info.value.step == "listkey"
    text = str(info.value)
    assert "step 'listkey' (partition 0): TypeError:" in text
    assert "[1]" in text and "list" in text and "keys must be" in text
    assert "record: 1\n" in text


def test_failing_source_reports_the_offset() -> None:
    def gen(partition: int, offset: int) -> int:
        if offset == 77:
            raise RuntimeError("bad record at 77")
        return offset

    flow = rf.Dataflow("badsource")
    flow.source("gen", rf.sources.Generator(gen, limit=100)).sink("out", rf.testing.Collect())
    with pytest.raises(rf.JobFailedError) as info:
        rf.run(flow)
    assert "step 'gen' (partition 0): RuntimeError: bad record at 77" in str(info.value)
    assert "reading source partition 0 at offset 77" in str(info.value)


class _BrokenSink(rf.sinks.Sink):
    def open(self, ctx: rf.sinks.SinkContext) -> rf.sinks.SinkWriter:
        return _BrokenWriter()


class _BrokenWriter(rf.sinks.SinkWriter):
    def write(self, items: list[object]) -> None:
        raise OSError("disk full")


def test_failing_sink_fails_the_job_downstream_of_a_shuffle() -> None:
    flow = rf.Dataflow("badsink", parallelism=2)
    src = flow.source("src", rf.testing.from_items(range(1000), partitions=2))
    src.key_by("k", lambda x: x % 10).reduce("sum", lambda a, b: a + b).sink("out", _BrokenSink())
    with pytest.raises(rf.JobFailedError) as info:
        rf.run(flow)
    assert info.value.step == "out"
    assert "OSError: disk full" in str(info.value)


def test_a_job_name_in_use_is_refused() -> None:
    flow = rf.Dataflow("twice")
    flow.source("gen", rf.sources.Generator(lambda p, i: i, rate=100)).sink(
        "out", rf.testing.Collect()
    )
    handle = rf.start(flow)
    try:
        with pytest.raises(rf.errors.JobAlreadyRunningError, match="job_name="):
            rf.start(flow)
        other = rf.start(flow, job_name="twice-2")
        other.stop()
    finally:
        handle.stop()
