"""Union, stateful_map and the other operators on a real Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import rayflow as rf


def test_union_of_two_sources_with_different_parallelism() -> None:
    flow = rf.Dataflow("union", parallelism=2)
    evens = flow.source(
        "evens", rf.testing.from_items(range(0, 2000, 2), partitions=3), parallelism=3
    )
    odds = flow.source("odds", rf.testing.from_items(range(1, 2000, 2), partitions=2))
    tagged = evens.map("tag", lambda x: ("even", x), parallelism=3)
    merged = tagged.union("merged", odds.map("tag_odd", lambda x: ("odd", x)))
    merged.filter("not_ten", lambda r: r[1] != 10).sink("out", rf.testing.Collect())
    result = rf.run(flow)
    out = result.output("out")
    assert sorted(x for _, x in out) == [x for x in range(2000) if x != 10]
    assert all((tag == "even") == (x % 2 == 0) for tag, x in out)


def _sessions(state: dict[str, Any] | None, event: tuple[str, str]) -> tuple[Any, list[Any]]:
    """Collect a user's pages until 'logout', then emit the session and forget it."""
    _, action = event
    pages = [] if state is None else state["pages"]
    if action == "logout":
        return None, [pages]
    return {"pages": [*pages, action]}, []


def test_stateful_map_with_deletes() -> None:
    events = []
    for i in range(300):
        user = f"u{i % 30}"
        events.append((user, f"p{i}"))
        if i % 7 == 6:
            events.append((user, "logout"))
    flow = rf.Dataflow("sessions", parallelism=2)
    src = flow.source("events", rf.testing.from_items(events), parallelism=1)
    sessions = src.key_by("by_user", lambda e: e[0]).stateful_map("sessionize", _sessions)
    sessions.sink("out", rf.testing.Collect())
    result = rf.run(flow)

    expected: list[tuple[str, list[str]]] = []
    open_sessions: dict[str, list[str]] = {}
    for user, action in events:
        if action == "logout":
            expected.append((user, open_sessions.pop(user, [])))
        else:
            open_sessions.setdefault(user, []).append(action)
    assert sorted(result.output("out")) == sorted(expected)
    # Deleted keys are gone from state; the rest are still open sessions.
    state_keys = sum(e["state_keys"] for e in result.metrics["sessionize"])
    assert state_keys == len(open_sessions)


def test_reduce_without_initial_and_flat_map_chain() -> None:
    flow = rf.Dataflow("maxes")
    nums = flow.source("nums", rf.testing.from_items(range(100), partitions=4), parallelism=2)
    pairs = nums.flat_map("twice", lambda x: [x, -x])
    maxima = pairs.key_by("parity", lambda x: x % 2).reduce("max", max, parallelism=3)
    maxima.sink("out", rf.testing.Collect(), parallelism=3)
    out = rf.run(flow).output("out")
    final: dict[int, int] = {}
    for key, value in out:
        final[key] = value  # per key, updates arrive in order
    assert final == {0: 98, 1: 99}
    assert len(out) == 200


def _columns(p: int, offset: int, count: int) -> dict[str, Any]:
    import numpy as np

    j = np.arange(offset, offset + count)
    return {"k": 2 * (j % 25) + p, "v": j % 11}  # key k is read by partition k % 2 only


def _row(p: int, i: int) -> dict[str, int]:
    return {"k": 2 * (i % 25) + p, "v": i % 11}


def test_columnar_and_per_record_paths_give_the_same_records_in_the_same_partitions() -> None:
    flow = rf.Dataflow("columns-vs-rows", parallelism=2)
    cols = flow.source(
        "cols",
        rf.sources.Generator(batch_fn=_columns, partitions=2, limit=5000, rows_per_batch=700),
    )
    rows = flow.source("rows", rf.sources.Generator(_row, partitions=2, limit=5000))
    cols.key_by("ck", "k").sum("csum", "v").sink("c_out", rf.testing.Collect())
    rows.key_by("rk", lambda r: r["k"]).sum("rsum", "v").sink("r_out", rf.testing.Collect())
    # A union of chunks and records: the steps after it get rows.
    cols.union("mixed", rows).map("key", lambda r: r["k"]).sink("m_out", rf.testing.Collect())
    result = rf.run(flow)

    def per_key(records: list[Any]) -> dict[int, list[Any]]:
        out: dict[int, list[Any]] = {}
        for key, row in records:
            out.setdefault(key, []).append(row)
        return out

    columnar, per_record = result.output_partitions("c_out"), result.output_partitions("r_out")
    assert sorted(columnar) == sorted(per_record) == [0, 1]
    for p in (0, 1):  # the same keys in each partition, the same sums in the same order
        assert per_key(columnar[p]) == per_key(per_record[p])
    assert sum(len(v) for v in columnar.values()) == 10_000
    assert sorted(result.output("m_out")) == sorted(
        2 * [r["k"] for p in (0, 1) for r in (_row(p, i) for i in range(5000))]
    )


def test_parquet_writes_chunks_of_columns_as_their_columns(tmp_path: Path) -> None:
    # The columnar path into Parquet: the files hold the chunks' columns (cast to the
    # given schema): in each partition, per key, the same sums in the same order as
    # the per-record path gives (the interleaving of keys from two sources may differ).
    import pyarrow as pa
    import pyarrow.parquet as pq

    flow = rf.Dataflow("columns-parquet", parallelism=2)
    cols = flow.source(
        "cols",
        rf.sources.Generator(batch_fn=_columns, partitions=2, limit=5000, rows_per_batch=700),
    )
    rows = flow.source("rows", rf.sources.Generator(_row, partitions=2, limit=5000))
    schema = pa.schema([("k", pa.int64()), ("v", pa.float64())])
    cols.key_by("ck", "k").sum("csum", "v").sink(
        "c_out", rf.sinks.Parquet(tmp_path / "c", schema=schema, rows_per_file=3000)
    )
    rows.key_by("rk", lambda r: r["k"]).sum("rsum", "v").sink("r_out", rf.testing.Collect())
    result = rf.run(flow)
    assert result.status is rf.JobStatus.FINISHED
    per_record = result.output_partitions("r_out")
    for p in (0, 1):
        files = sorted((tmp_path / "c").glob(f"part-{p:05d}-*.parquet"))
        assert len(files) == 2  # 5,000 rows, at most 3,000 per file
        tables = [pq.read_table(f) for f in files]
        assert all(t.schema == schema for t in tables)
        written: dict[int, list[float]] = {}
        for row in pa.concat_tables(tables).to_pylist():
            written.setdefault(row["k"], []).append(row["v"])
        want: dict[int, list[float]] = {}
        for key, row in per_record[p]:
            want.setdefault(key, []).append(float(row["v"]))
        assert written == want
