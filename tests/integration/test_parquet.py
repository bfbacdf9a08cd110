"""rf.sinks.Parquet: files read back with pyarrow are the input, exactly once, local and on S3.

The jobs run on the session's local Ray and write both to a local folder and
to the loopback S3 server; their files are read back with pyarrow in commit
order (per partition, by name) and compared with what went in.
"""

from __future__ import annotations

import re
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import rayflow as rf
from rayflow.sinks import SinkContext, TransientSinkError
from tests.chaos.flows import check_exactly_once, counting_flow, event, expected_counts

BUCKET = "rayflow-test"
CHECKPOINT_POINTS = ("triggered", "before_manifest", "after_manifest", "after_notify")

# Part files by name (``part-PPPPP-<checkpoint>-<run>-<i>.parquet``: the names of a
# partition sort in commit order), and their rows.
Files = list[tuple[str, list[dict[str, Any]]]]


def _place(name: str) -> tuple[int, int]:
    """A part file's (partition, checkpoint)."""
    fields = name[: -len(".parquet")].split("-")
    assert len(fields) == 5 and fields[0] == "part", name
    return int(fields[1]), int(fields[2])


def local_files(folder: Path) -> Files:
    assert not list((folder / ".staging").iterdir()), "staged files left behind"
    return committed_files(folder)


def committed_files(folder: Path) -> Files:
    """The published files only (a failed job may leave staged ones behind)."""
    return [(f.name, pq.read_table(f).to_pylist()) for f in sorted(folder.glob("part-*.parquet"))]


def s3_files(server: Any, prefix: str) -> Files:
    client = server.client()
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            name = obj["Key"].rsplit("/", 1)[-1]
            if name.startswith("part-"):
                body = client.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read()
                out.append((name, pq.read_table(pa.BufferReader(body)).to_pylist()))
    pending = client.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads", [])
    assert not pending, f"uploads left open: {pending}"
    return sorted(out)


def streams(files: Files) -> dict[str, list[tuple[str, int]]]:
    """Per partition, the (key, count) updates in commit order (files sort by checkpoint)."""
    out: dict[str, list[tuple[str, int]]] = {}
    for name, rows in files:
        partition = _place(name)[0]
        out.setdefault(f"partition {partition}", []).extend((r["f0"], r["f1"]) for r in rows)
    return out


def _item(partition: int, offset: int) -> dict[str, Any]:
    i = partition * 100_000 + offset
    return {
        "id": i,
        "name": f"n{i}",
        "score": i / 4,
        "tags": [str(i % 3)] * (i % 3),
        "meta": {"even": i % 2 == 0, "at": offset},
        "maybe": i if i % 5 == 0 else None,
    }


def test_output_read_back_with_pyarrow_is_the_input_local_and_s3(
    tmp_path: Path, s3_server: Any
) -> None:
    per_partition, rows_per_file = 1500, 256
    prefix = f"parquet-{uuid.uuid4().hex[:8]}"
    flow = rf.Dataflow("parquet-roundtrip", parallelism=2)
    src = flow.source(
        "items", rf.sources.Generator(_item, partitions=2, limit=per_partition, rate=3000)
    )
    src.sink("local", rf.sinks.Parquet(tmp_path / "out", rows_per_file=rows_per_file))
    src.sink("objects", rf.sinks.Parquet(f"s3://{BUCKET}/{prefix}", rows_per_file=rows_per_file))
    src.map("pairs", lambda d: (d["name"], d["id"])).sink(
        "tuples", rf.sinks.Parquet(tmp_path / "pairs")
    )
    storage = str(tmp_path / "checkpoints")
    result = rf.run(flow, checkpoint=rf.Checkpointing(storage=storage, interval_s=0.2))
    assert result.status is rf.JobStatus.FINISHED
    assert (result.checkpoints or {}).get("completed", 0) >= 3  # several commits, not one

    expected = {p: [_item(p, o) for o in range(per_partition)] for p in range(2)}
    for what, files in (
        ("local", local_files(tmp_path / "out")),
        ("S3", s3_files(s3_server, prefix)),
    ):
        assert all(len(rows) <= rows_per_file for _, rows in files), what
        assert len({_place(name)[1] for name, _ in files}) >= 3, what
        # A source partition feeds the same sink partition: its records, in order.
        for p in range(2):
            got = [row for name, rows in files if _place(name)[0] == p for row in rows]
            assert got == expected[p], f"{what}: partition {p} differs"
    pairs = [r for _, rows in local_files(tmp_path / "pairs") for r in rows]
    assert sorted((r["f0"], r["f1"]) for r in pairs) == sorted(
        (d["name"], d["id"]) for p in range(2) for d in expected[p]
    )

    # Without checkpointing the files are published once, when the input ends.
    again = rf.Dataflow("parquet-no-checkpoints")
    again.source("items", rf.testing.from_items(expected[0])).sink(
        "local", rf.sinks.Parquet(tmp_path / "plain", rows_per_file=1000)
    )
    rf.run(again)
    files = local_files(tmp_path / "plain")
    assert [len(rows) for _, rows in files] == [1000, 500]
    assert [r for _, rows in files for r in rows] == expected[0]


def test_exactly_once_under_kills_at_every_protocol_point(tmp_path: Path, s3_server: Any) -> None:
    per_partition, job = 6000, "parquet-chaos"
    prefix = f"{job}-{uuid.uuid4().hex[:6]}"
    sinks: dict[str, rf.sinks.Sink] = {
        "files": rf.sinks.Parquet(tmp_path / "out", rows_per_file=500),
        "objects": rf.sinks.Parquet(f"s3://{BUCKET}/{prefix}", rows_per_file=500),
    }
    flow = counting_flow(job, per_partition=per_partition, rate=6000, sinks=sinks)
    config = rf.Checkpointing(storage=str(tmp_path / "checkpoints"), interval_s=0.25)
    # Besides the random kills, two that always strike: a sink dies between the first
    # manifest and its commit (the restore re-issues the commit of what it staged), and
    # the coordinator dies once every sink staged the next checkpoint, before its
    # manifest (a new run restores the one before and must drop what was staged).
    faults = rf.testing.Faults(
        at=(
            rf.testing.Fault("after_manifest", "kill_operator", f"rayflow/{job}/count/1"),
            rf.testing.Fault("before_manifest", "kill_coordinator", nth=2),
        )
    )
    handle = rf.start(flow, checkpoint=config, faults=faults)
    monkey = rf.testing.chaos(
        handle,
        seed=1,
        kills=2,
        targets=("operators", "sinks"),
        points=CHECKPOINT_POINTS,
        every_s=0.5,
        point_timeout_s=3.0,
    )
    try:
        result = handle.wait(timeout=120)
    finally:
        monkey.stop()
    monkey.check()
    assert monkey.kills, f"no fault struck (missed: {monkey.missed})"
    assert result.status is rf.JobStatus.FINISHED
    # The coordinator's own restart at least; the recoveries of the coordinator that died
    # are in the result as far as the driver's telemetry polls (1 s) saw them.
    assert result.restarts >= 1, (monkey.kills, result.recoveries)
    assert any("coordinator" in str(r["replaced"]) for r in result.recoveries), result.recoveries
    expected = expected_counts(per_partition)
    for what, files in (
        ("Parquet local", local_files(tmp_path / "out")),
        ("Parquet S3", s3_files(s3_server, prefix)),
    ):
        assert all(len(rows) <= 500 for _, rows in files), what
        check_exactly_once(streams(files), expected, what)


def test_stop_with_savepoint_then_resume_and_restore_write_no_duplicates(
    tmp_path: Path, s3_server: Any
) -> None:
    per_partition, job = 6000, "parquet-resume"
    prefix = f"{job}-{uuid.uuid4().hex[:6]}"
    config = rf.Checkpointing(storage=str(tmp_path / "checkpoints"), interval_s=0.25)

    def sinks() -> dict[str, rf.sinks.Sink]:
        return {
            "files": rf.sinks.Parquet(tmp_path / "out", rows_per_file=700),
            "objects": rf.sinks.Parquet(f"s3://{BUCKET}/{prefix}", rows_per_file=700),
        }

    handle = rf.start(
        counting_flow(job, per_partition=per_partition, rate=6000, sinks=sinks()),
        checkpoint=config,
    )
    time.sleep(1.0)
    stopped = handle.stop(savepoint=tmp_path / "sp", timeout=60)
    assert stopped.status is rf.JobStatus.STOPPED
    first = len(local_files(tmp_path / "out"))
    assert first > 0

    resumed = rf.run(
        counting_flow(job, per_partition=per_partition, rate=None, sinks=sinks()),
        checkpoint=config,
        resume=True,
    )
    assert resumed.status is rf.JobStatus.FINISHED
    expected = expected_counts(per_partition)
    check_exactly_once(streams(local_files(tmp_path / "out")), expected, "Parquet local")
    check_exactly_once(streams(s3_files(s3_server, prefix)), expected, "Parquet S3")

    # restore_from the savepoint into a new folder: each key continues from its count there.
    restored = rf.run(
        counting_flow(
            job,
            per_partition=per_partition,
            rate=None,
            sinks={"files": rf.sinks.Parquet(tmp_path / "copy")},
        ),
        job_name=f"{job}-copy",
        checkpoint=rf.Checkpointing(storage=str(tmp_path / "copy-checkpoints")),
        restore_from=tmp_path / "sp",
    )
    assert restored.status is rf.JobStatus.FINISHED
    before: Counter[str] = Counter()
    from rayflow._internal.checkpoint.restore import open_restore_point

    for partition, end in (
        open_restore_point(str(tmp_path / "sp")).manifest.sources["events"].items()
    ):
        for i in range(end):
            before[event(partition, i)[0]] += 1
    for name, stream in streams(local_files(tmp_path / "copy")).items():
        last: dict[str, int] = {}
        for key, count in stream:
            assert count == last.get(key, before[key]) + 1, (name, key, count)
            last[key] = count


def _numbers(partition: int, offset: int) -> dict[str, Any]:
    return {"i": offset, "v": offset * 0.5} if offset != 1800 else {"i": "eighteen hundred"}


def test_a_record_that_does_not_fit_fails_the_job_clearly_and_keeps_committed_files(
    tmp_path: Path,
) -> None:
    flow = rf.Dataflow("parquet-bad-record")
    flow.source("nums", rf.sources.Generator(_numbers, limit=2000, rate=1500)).sink(
        "out", rf.sinks.Parquet(tmp_path / "out", rows_per_file=100)
    )
    with pytest.raises(rf.JobFailedError) as info:
        rf.run(
            flow,
            checkpoint=rf.Checkpointing(storage=str(tmp_path / "cp"), interval_s=0.1),
            restart=rf.RestartStrategy(max_failures=0),
        )
    text = str(info.value)
    assert info.value.step == "out"
    assert "Parquet sink 'out' (partition 0)" in text
    assert "'eighteen hundred' (str)" in text and "is i: int64" in text
    assert "Fix: convert the records with a map step before the sink" in text
    # What was committed before stays, once and whole: the records 0..n-1.
    rows = [r for _, rows in committed_files(tmp_path / "out") for r in rows]
    assert 0 < len(rows) < 1800
    assert rows == [{"i": i, "v": i * 0.5} for i in range(len(rows))]


# -- the writer on its own (no job) ----------------------------------------------------------


def _writer(sink: rf.sinks.Sink, run: str, restored: int | None = None) -> Any:
    sink.setup("job", step="out", run_id=run, restored_checkpoint=restored)
    return sink.open(SinkContext("job", "out", 0, 1, restored, run))


def test_commits_are_idempotent_per_run_and_a_restore_drops_later_staged_files(
    tmp_path: Path,
) -> None:
    sink = rf.sinks.Parquet(tmp_path / "out", rows_per_file=2)
    w = _writer(sink, "r000001aaaaaa")
    w.write([{"a": 1}, {"a": 2}, {"a": 3}])
    first = w.prepare_commit(1)
    w.write([{"a": 4}])
    second = w.prepare_commit(2)
    assert len(first["files"]) == 2 and len(second["files"]) == 1
    assert not list((tmp_path / "out").glob("part-*"))  # staged, not published
    w.close()
    # A restart from checkpoint 1 (its manifest was written, its commit never ran): the
    # restore re-issues 1's commit, and checkpoint 2's staged file is dropped.
    w = _writer(sink, "r000002bbbbbb", restored=1)
    for _ in range(2):  # a re-issued commit changes nothing
        w.commit(first)
    assert [r for _, rows in committed_files(tmp_path / "out") for r in rows] == [
        {"a": 1},
        {"a": 2},
        {"a": 3},
    ]
    with pytest.raises(FileNotFoundError, match="is gone and was never committed"):
        w.commit(second)
    # A later run (a restore from an old savepoint) reusing id 1 publishes its own files.
    w.write([{"a": 5}])
    w.commit(w.prepare_commit(1))
    assert sorted(r["a"] for _, rows in local_files(tmp_path / "out") for r in rows) == [
        1,
        2,
        3,
        5,
    ]
    w.close()
    # A fresh run of the job starts from an empty folder.
    _writer(sink, "r000003cccccc").close()
    assert not list((tmp_path / "out").glob("part-*"))


def test_chunks_of_columns_are_cast_to_the_schema_or_refused_clearly(tmp_path: Path) -> None:
    # Chunks of columns reach the writer as Arrow tables (runtime/operators.py).
    import numpy as np

    from rayflow._internal.runtime.columns import Columns

    chunk = Columns({"k": np.arange(3, dtype=np.int32), "v": np.array([1, 2, 3])}, key="k")
    # Without schema=, the first chunk fixes it.
    w = _writer(rf.sinks.Parquet(tmp_path / "inferred"), "r000001aaaaaa")
    w.write([chunk.to_arrow(), chunk.to_arrow()])
    w.commit(w.prepare_commit(1))
    w.close()
    ((_, rows),) = committed_files(tmp_path / "inferred")
    assert rows == 2 * [{"k": 0, "v": 1}, {"k": 1, "v": 2}, {"k": 2, "v": 3}]
    # With schema=, columns are cast exactly; a column the schema lacks, a value that
    # does not fit, a missing non-nullable column: each named, with the fix.
    schema = pa.schema([("k", pa.int64()), ("v", pa.float64()), ("note", pa.string())])
    w = _writer(rf.sinks.Parquet(tmp_path / "given", schema=schema), "r000001aaaaaa")
    w.write([chunk.to_arrow()])
    with pytest.raises(ValueError, match=r"'out'.*column 'extra'.*add it to schema="):
        w.write([pa.table({"k": [1], "v": [1.0], "extra": [1]})])
    with pytest.raises(ValueError, match=r"column 'k' of type double.*does not fit exactly"):
        w.write([pa.table({"k": [1.5], "v": [1.0]})])
    strict = pa.schema([pa.field("k", pa.int64(), nullable=False), ("v", pa.float64())])
    w2 = _writer(rf.sinks.Parquet(tmp_path / "strict", schema=strict), "r000001aaaaaa")
    with pytest.raises(ValueError, match=r"no column 'k', which is not nullable"):
        w2.write([pa.table({"v": [1.0]})])
    w2.close()
    w.commit(w.prepare_commit(1))
    w.close()
    ((_, rows),) = committed_files(tmp_path / "given")
    assert rows == [{"k": k, "v": float(k + 1), "note": None} for k in range(3)]


def test_records_of_every_shape_and_clear_errors_for_misfits(tmp_path: Path) -> None:
    from collections import namedtuple
    from dataclasses import dataclass

    @dataclass
    class Click:
        user: str
        n: int

    Pair = namedtuple("Pair", "key value")
    cases: list[tuple[list[Any], list[dict[str, Any]]]] = [
        ([("a", 1), ("b", 2)], [{"f0": "a", "f1": 1}, {"f0": "b", "f1": 2}]),
        ([Pair("a", 1)], [{"key": "a", "value": 1}]),
        ([Click("u", 3)], [{"user": "u", "n": 3}]),
        ([7, 8], [{"value": 7}, {"value": 8}]),
        ([{"x": 1}, {"x": 2.5, "y": None}], [{"x": 1.0, "y": None}, {"x": 2.5, "y": None}]),
    ]
    for i, (records, rows) in enumerate(cases):
        w = _writer(rf.sinks.Parquet(tmp_path / f"shape-{i}"), "r1")
        w.write(records)
        w.commit(w.prepare_commit(1))
        assert [r for _, got in local_files(tmp_path / f"shape-{i}") for r in got] == rows

    w = _writer(rf.sinks.Parquet(tmp_path / "typed"), "r1")
    w.write([{"n": i, "s": "x"} for i in range(1000)])  # the schema: n int64, s string
    misfits = {
        "1.5 (float)": {"n": 1.5},  # never truncated to 1
        "'7' (str)": {"n": "7"},  # never parsed
        "True (bool)": {"n": True},
        "has the field 'extra'": {"n": 1, "extra": 2},
        "has the key 3 (int); Parquet column names are strings": {3: 1},
    }
    for message, record in misfits.items():
        with pytest.raises(ValueError, match=re.escape(message)) as info:
            w.write([{"n": 1}, record])
        text = str(info.value)
        assert text.startswith("Parquet sink 'out' (partition 0): the record {")
        assert "Fix: " in text and "is n: int64, s: string" in text
    w.write([{"n": 2.0}, {"s": None}])  # exact values fit; missing and None are null
    w.close()

    w = _writer(rf.sinks.Parquet(tmp_path / "nulls"), "r1")
    w.write([{"n": 1, "later": None}])
    w.prepare_commit(1)  # the schema is fixed from what there is: 'later' is null
    with pytest.raises(ValueError, match=r"schema=\[\('later', pa\.int64\(\)\), \.\.\.\]"):
        w.write([{"n": 2, "later": 5}])
    w.close()
    w = _writer(rf.sinks.Parquet(tmp_path / "given", schema=[("n", pa.int64())]), "r1")
    with pytest.raises(ValueError, match=r"has the field 'later'.*add the field to schema="):
        w.write([{"n": 2, "later": 5}])
    w.close()

    with pytest.raises(rf.ConfigError, match="rows_per_file must be at least 1"):
        rf.sinks.Parquet(tmp_path / "x", rows_per_file=0)
    with pytest.raises(rf.ConfigError, match="local folder or s3://bucket/prefix"):
        rf.sinks.Parquet("gs://bucket/x")


def test_a_place_of_another_sink_or_with_unclaimed_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "part-0.parquet").write_bytes(b"not ours")
    with pytest.raises(rf.ConfigError, match="part files that no rayflow sink claimed"):
        _writer(rf.sinks.Parquet(tmp_path / "foreign"), "r1")
    _writer(rf.sinks.JsonLines(tmp_path / "taken"), "r1").close()
    with pytest.raises(rf.ConfigError, match="is the output of step 'out' of job 'job'"):
        rf.sinks.Parquet(tmp_path / "taken").setup(
            "another", step="out", run_id="r1", restored_checkpoint=None
        )


def test_s3_unreachable_declines_and_keeps_the_data_for_the_next_checkpoint(
    tmp_path: Path, s3_proxy: Any, s3_server: Any
) -> None:
    prefix = f"parquet-outage-{uuid.uuid4().hex[:6]}"
    w = _writer(rf.sinks.Parquet(f"s3://{BUCKET}/{prefix}", rows_per_file=3), "r1")
    w.write([{"a": i} for i in range(5)])
    s3_proxy.faults()  # cut open connections
    s3_proxy.down = True
    with pytest.raises(TransientSinkError, match="unreachable"):
        w.prepare_commit(1)
    assert w.spilled_bytes > 0  # on local disk meanwhile
    s3_proxy.clear()
    time.sleep(1.1)  # the writer fails fast for a second after an outage
    w.write([{"a": 5}])
    committable = w.prepare_commit(2)
    w.commit(committable)
    w.commit(committable)  # idempotent
    w.close()
    files = s3_files(s3_server, prefix)
    assert [r["a"] for _, rows in files for r in rows] == list(range(6))
    assert [_place(name)[1] for name, _ in files] == [2, 2, 2]


def test_uploads_created_by_requests_whose_answer_was_lost_are_aborted(
    tmp_path: Path, s3_proxy: Any, s3_server: Any
) -> None:
    # A CreateMultipartUpload that reached S3 with its answer lost leaves an upload
    # nobody completes (as for S3JsonLines): once a create succeeded only on its retry,
    # once every attempt was lost; the uploads S3 made for nothing are aborted.
    prefix = f"parquet-lost-{uuid.uuid4().hex[:6]}"
    client = s3_server.client()
    w = _writer(rf.sinks.Parquet(f"s3://{BUCKET}/{prefix}", rows_per_file=100), "r1")

    def open_uploads() -> list[Any]:
        return client.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads", [])

    w.write([{"a": i} for i in range(3)])
    s3_proxy.lose_answers(1)  # the first attempt's answer is lost, the retry's is not
    first = w.prepare_commit(1)
    assert s3_proxy.counts["lost"] >= 1 and len(open_uploads()) == 2
    w.commit(first)
    assert open_uploads() == []
    w.write([{"a": i} for i in range(3, 6)])
    s3_proxy.lose_answers(3)  # every attempt (botocore makes 3 here) lost: the call fails
    with pytest.raises(TransientSinkError, match="unreachable"):
        w.prepare_commit(2)
    assert open_uploads() == []  # S3 answers again: aborted on the way out
    time.sleep(1.1)  # the writer fails fast for a second after an outage
    w.commit(w.prepare_commit(3))
    w.close()
    assert open_uploads() == []
    files = s3_files(s3_server, prefix)
    assert [r["a"] for _, rows in files for r in rows] == list(range(6))


def test_a_missing_pyarrow_is_named_with_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # None: import raises ImportError
    with pytest.raises(rf.ConfigError, match=re.escape("pip install 'rayflow[parquet]'")) as info:
        rf.sinks.Parquet("out")
    assert "rf.sinks.Parquet needs pyarrow" in str(info.value)
