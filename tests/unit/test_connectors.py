"""Sources replay exactly from an offset; sinks commit exactly once."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

import rayflow as rf
from rayflow.sinks import SinkContext


def _read_all(reader: rf.sources.SourceReader, n: int) -> list[object]:
    out: list[object] = []
    while (batch := reader.read(n)) is not None:
        out.extend(batch)
    return out


def test_text_files_resume_at_a_byte_offset_without_repeating_or_skipping(
    tmp_path: Path,
) -> None:
    lines = [f"line {i} " + "x" * (i % 7) for i in range(1000)]
    (tmp_path / "a.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "b.txt").write_text("only\r\nwindows\r\nlast-without-newline")
    source = rf.sources.TextFiles(str(tmp_path / "*.txt"))
    assert source.partitions() == 2
    reader = source.open(0, None)
    head = reader.read(10)
    assert head is not None
    offset = reader.offset()
    rest = _read_all(source.open(0, offset), 7)
    assert head + rest == lines
    assert _read_all(source.open(1, None), 100) == ["only", "windows", "last-without-newline"]


def test_text_files_return_full_batches_of_long_lines_until_the_end(tmp_path: Path) -> None:
    # Lines far longer than the reader's size hint: a read must still return all
    # it was asked for (a short read means "caught up"), and offsets stay exact.
    lines = [f"{i} " + "word " * 40 for i in range(250)]
    (tmp_path / "long.txt").write_text("\n".join(lines) + "\n")
    source = rf.sources.TextFiles(str(tmp_path / "*.txt"))
    reader = source.open(0, None)
    sizes, seen = [], []
    for _ in range(2):
        batch = reader.read(100)
        assert batch is not None
        sizes.append(len(batch))
        seen.extend(batch)
    assert sizes == [100, 100]
    rest = _read_all(source.open(0, reader.offset()), 100)
    assert seen + rest == lines
    assert reader.read(100) == lines[200:]
    assert reader.read(100) is None


def test_generator_is_replayable_and_limited() -> None:
    gen = rf.sources.Generator(lambda p, i: (p, i), partitions=2, limit=50)
    reader = gen.open(1, None)
    first = reader.read(20)
    again = gen.open(1, reader.offset())
    assert first == [(1, i) for i in range(20)]
    assert _read_all(again, 15) == [(1, i) for i in range(20, 50)]


def test_generator_rate_limits_the_whole_source() -> None:
    gen = rf.sources.Generator(lambda p, i: i, partitions=2, rate=200)  # 100/s per partition
    reader = gen.open(0, None)
    got = 0
    start = time.monotonic()
    while time.monotonic() - start < 0.5:
        got += len(reader.read(1000) or [])
        time.sleep(0.01)
    assert 30 <= got <= 70


def test_from_items_splits_into_contiguous_partitions() -> None:
    source = rf.testing.from_items(range(10), partitions=3)
    parts = [_read_all(source.open(p, None), 100) for p in range(3)]
    assert parts == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def _ctx(partition: int = 0) -> SinkContext:
    return SinkContext(job="j", step="out", partition=partition, parallelism=1)


def test_json_lines_publishes_only_on_commit_and_commit_is_idempotent(tmp_path: Path) -> None:
    sink = rf.sinks.JsonLines(tmp_path)
    sink.setup("j", restored_checkpoint=None)
    writer = sink.open(_ctx())
    writer.write([{"a": 1}, [1, 2]])
    part = tmp_path / "part-00000.jsonl"
    assert not part.exists() or part.read_text() == ""
    c1 = writer.prepare_commit(1)
    writer.write(["second"])
    c2 = writer.prepare_commit(2)
    writer.commit(c1)
    writer.commit(c1)  # re-issued after a restore: no duplicate
    assert [json.loads(x) for x in part.read_text().splitlines()] == [{"a": 1}, [1, 2]]
    writer.commit(c2)
    assert part.read_text().splitlines()[-1] == '"second"'
    assert os.listdir(tmp_path / ".staging") == []


def test_json_lines_cuts_a_half_finished_append_on_reopen(tmp_path: Path) -> None:
    sink = rf.sinks.JsonLines(tmp_path)
    sink.setup("j", restored_checkpoint=None)
    writer = sink.open(_ctx())
    writer.write([1, 2])
    writer.commit(writer.prepare_commit(1))
    part = tmp_path / "part-00000.jsonl"
    with open(part, "a") as f:  # a crash in the middle of the next commit
        f.write("3\n4")
    sink.open(_ctx())
    assert part.read_text() == "1\n2\n"


def test_a_fresh_run_clears_only_its_own_output_and_refuses_anothers(tmp_path: Path) -> None:
    sink = rf.sinks.JsonLines(tmp_path)
    sink.setup("j", step="out", restored_checkpoint=None)
    (tmp_path / "part-00007.jsonl").write_text("an earlier run's\n")
    (tmp_path / "keep.txt").write_text("not ours\n")
    sink.setup("j", step="out", restored_checkpoint=None)  # the same job and step again
    assert sorted(os.listdir(tmp_path)) == [".rayflow-sink.json", "keep.txt"]
    (tmp_path / "part-00000.jsonl").write_text("j's output\n")
    for job, step in (("other", "out"), ("j", "files")):
        with pytest.raises(rf.ConfigError, match="is the output of step 'out' of job 'j'"):
            sink.setup(job, step=step, restored_checkpoint=None)
    assert (tmp_path / "part-00000.jsonl").read_text() == "j's output\n"


def test_part_files_no_sink_claimed_are_refused_not_deleted(tmp_path: Path) -> None:
    (tmp_path / "part-00000.jsonl").write_text("somebody's\n")
    with pytest.raises(rf.ConfigError, match="no rayflow sink claimed"):
        rf.sinks.JsonLines(tmp_path).setup("j", step="out", restored_checkpoint=None)
    assert (tmp_path / "part-00000.jsonl").read_text() == "somebody's\n"


class _Message:
    def __init__(self, offset: int):
        self._offset = offset

    def error(self) -> None:
        return None

    def offset(self) -> int:
        return self._offset

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_000 * self._offset)

    def key(self) -> bytes:
        return b"k"

    def value(self) -> bytes:
        return str(self._offset).encode()


class _Consumer:
    """Delivers the given offsets, batch by batch (what librdkafka's consume returns)."""

    def __init__(self, batches: list[list[int]]):
        self.batches = batches

    def consume(self, num_messages: int, timeout: float) -> list[_Message]:
        return [_Message(o) for o in self.batches.pop(0)] if self.batches else []

    def get_watermark_offsets(self, tp: object, cached: bool) -> tuple[int, int]:
        return (-1001, -1001)


def test_a_kafka_reader_drops_what_the_consumer_delivers_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from rayflow._internal.connectors.kafka_source import _KafkaReader

    reader = _KafkaReader.__new__(_KafkaReader)  # no broker: the consumer is a stand-in
    reader.__dict__.update(
        _topic="in", _partition=0, _tp=None, _next=5, _high=None, _low=None, _redelivered=0
    )
    reader._consumer = _Consumer([[5, 6, 7], [6, 7, 8, 9], [3, 9, 10, 10, 11]])  # type: ignore[assignment]
    read = [m.offset for _ in range(4) for m in reader.read(100)]
    assert read == [5, 6, 7, 8, 9, 10, 11]  # each offset once, in order
    assert reader.offset()["offset"] == 12 and reader._redelivered == 5
    assert "delivered 2 records it had from offset 8 again" in caplog.text
