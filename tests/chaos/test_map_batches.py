"""map_batches in every format, between per-record steps and before a keyed step, with
operators killed: the committed counts are exactly those of a run without failures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

import rayflow as rf
from tests.chaos.flows import (
    check_exactly_once,
    collect_streams,
    event,
    expected_counts,
    json_lines_streams,
    kill_after_checkpoints,
)

PER_PARTITION = 60_000


def _numpy(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**batch, "value": batch["value"] * batch["w"]}  # 1 -> 2


def _pandas(df: Any) -> Any:
    return df.assign(value=df["value"] + 1)  # 2 -> 3


def _pyarrow(table: pa.Table) -> pa.Table:
    return table.drop_columns(["w"])


def test_every_batch_format_under_kills_counts_each_record_once(tmp_path: Path) -> None:
    flow = rf.Dataflow("batches", parallelism=2)
    events = flow.source(
        "events", rf.sources.Generator(event, partitions=2, limit=PER_PARTITION, rate=20_000)
    )
    rows = events.map("as_dict", lambda e: {"key": e[0], "value": e[1]})
    rows = rows.map_batches("weigh", lambda b: [{**r, "w": 2} for r in b])  # list
    rows = rows.map_batches("double", _numpy, batch_format="numpy")
    rows = rows.map_batches("plus_one", _pandas, batch_format="pandas")
    rows = rows.map_batches("drop_w", _pyarrow, batch_format="pyarrow")
    pairs = rows.map("as_pair", lambda r: (r["key"], r["value"] // 3))  # back to 1
    counts = pairs.key_by("by_key", lambda kv: kv[0]).reduce(
        "count", lambda acc, kv: acc + kv[1], initial=0
    )
    counts.sink("collected", rf.testing.Collect())
    counts.sink("files", rf.sinks.JsonLines(tmp_path / "out"))
    handle = rf.start(
        flow, checkpoint=rf.Checkpointing(storage=str(tmp_path / "cp"), interval_s=0.4)
    )
    monkey = rf.testing.chaos(handle, seed=5, kills=3, targets=("operators",), every_s=0.8)
    result = handle.wait(timeout=180)
    monkey.check()
    assert result.status is rf.JobStatus.FINISHED, result.failures
    assert monkey.kills and result.restarts >= 1, monkey.kills
    expected = expected_counts(PER_PARTITION)
    check_exactly_once(collect_streams(result, "collected"), expected, "Collect")
    check_exactly_once(json_lines_streams(tmp_path / "out"), expected, "JsonLines")
    # Batch steps report their figures like every step (rows, per partition).
    assert {"weigh", "double", "plus_one", "drop_w"} <= set(result.metrics)
    assert all(len(result.metrics[s]) == 2 for s in ("weigh", "double", "plus_one", "drop_w"))


SENSORS = 40
ROWS = 50_000


def _readings(p: int, offset: int, count: int) -> dict[str, np.ndarray]:
    """Sensor ``2 * (j % 20) + p`` (each sensor read by one source partition), value j % 7."""
    j = np.arange(offset, offset + count, dtype=np.int64)
    return {"sensor": 2 * (j % (SENSORS // 2)) + p, "value": j % 7}


def _parquet_streams(folder: Path) -> dict[int, list[tuple[int, dict[str, Any]]]]:
    """Per partition, its committed rows as (sensor, row), files in commit (name) order."""
    import pyarrow.parquet as pq

    streams: dict[int, list[tuple[int, dict[str, Any]]]] = {}
    for path in sorted(folder.glob("part-*.parquet")):
        rows = streams.setdefault(int(path.name.split("-")[1]), [])
        rows.extend((row["sensor"], row) for row in pq.read_table(path).to_pylist())
    return streams


def test_a_columnar_pipeline_under_kills_sums_each_reading_once_in_order(tmp_path: Path) -> None:
    # Chunks all the way (batch_fn -> map_batches -> key_by column -> sum), rows only
    # in two sinks (Parquet takes the chunks as Arrow tables); a shuffle between the
    # two parallel stages (parallelism 2 each).
    flow = rf.Dataflow("columns", parallelism=2)
    readings = flow.source(
        "readings",
        rf.sources.Generator(
            batch_fn=_readings, partitions=2, limit=ROWS, rate=40_000, rows_per_batch=1000
        ),
    )
    scaled = readings.map_batches(
        "scale", lambda b: {**b, "value": b["value"] * 3}, batch_format="numpy"
    )
    sums = scaled.key_by("by_sensor", "sensor").sum("sum", "value")
    sums.sink("collected", rf.testing.Collect())
    sums.sink("files", rf.sinks.JsonLines(tmp_path / "out"))
    sums.sink("parquet", rf.sinks.Parquet(tmp_path / "pq", rows_per_file=20_000))  # as tables
    handle = rf.start(
        flow, checkpoint=rf.Checkpointing(storage=str(tmp_path / "cp"), interval_s=0.4)
    )
    monkey = rf.testing.chaos(handle, seed=11, kills=3, targets=("operators",), every_s=0.7)
    result = handle.wait(timeout=180)
    monkey.check()
    assert result.status is rf.JobStatus.FINISHED, result.failures
    assert monkey.kills and result.restarts >= 1, monkey.kills
    # Per sensor, in output order: the sums grow by each of its readings, in the
    # order its source partition read them, each once.
    want: dict[int, list[int]] = {}
    for p in range(2):
        chunk = _readings(p, 0, ROWS)
        for s, v in zip(chunk["sensor"].tolist(), chunk["value"].tolist(), strict=True):
            want.setdefault(s, []).append(v * 3)
    for what, streams in (
        ("Collect", collect_streams(result, "collected")),
        ("JsonLines", json_lines_streams(tmp_path / "out")),
        ("Parquet", _parquet_streams(tmp_path / "pq")),
    ):
        got: dict[int, list[int]] = {}
        last: dict[int, int] = {}
        for stream in streams.values():
            for key, row in stream:
                assert row["sensor"] == key
                got.setdefault(key, []).append(row["value"] - last.get(key, 0))
                last[key] = row["value"]
        assert sorted(got) == sorted(want), what
        for key, increments in want.items():
            assert got[key] == increments, f"{what}: sensor {key} differs"
    # Figures count rows, not chunks (a partition makes 50 chunks).
    assert max(m["records_out"] for m in result.metrics["readings"]) > ROWS // 1000


def _group(key: str) -> str:
    """One of five groups of the keys k0..k999."""
    return f"g{int(key[1:]) % 5}"


def _tally(batch: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """A count per group of keys in the batch: a few rows for a batch of many, so
    what it returns depends on where the batches were cut."""
    counts: dict[str, int] = {}
    for key, _ in batch:
        group = _group(key)
        counts[group] = counts.get(group, 0) + 1
    return list(counts.items())


def test_a_batch_dependent_function_is_not_restarted_alone_and_stays_exact(
    tmp_path: Path,
) -> None:
    # map_batches may return any number of rows. A partition of its stage restarted
    # alone would cut its replay into other batches than the first run, and its
    # receivers, dropping what they had consumed by record index, kept ~50 counts
    # twice per group (fails on the old code: partial recovery of latest/0, seed 1).
    # Such a stage is recovered globally (docs/protocol.md, rule P6).
    flow = rf.Dataflow("tallies", parallelism=2)
    events = flow.source(
        "events", rf.sources.Generator(event, partitions=2, limit=PER_PARTITION, rate=20_000)
    )
    latest = events.key_by("by_key", lambda e: e[0]).reduce(
        "latest", lambda acc, e: e, initial=None
    )
    tallies = latest.map_batches("tally", _tally)
    totals = tallies.key_by("again", lambda kv: kv[0]).reduce(
        "total", lambda acc, kv: acc + kv[1], initial=0
    )
    totals.sink("collected", rf.testing.Collect())
    handle = rf.start(
        flow, checkpoint=rf.Checkpointing(storage=str(tmp_path / "cp"), interval_s=0.4)
    )
    result = kill_after_checkpoints(handle, "rayflow/tallies/latest/0", 2)
    want: dict[str, int] = {}
    for key, n in expected_counts(PER_PARTITION).items():
        want[_group(key)] = want.get(_group(key), 0) + n
    last: dict[str, int] = {}
    for p, records in result.output_partitions("collected").items():
        for group, total in records:
            assert total > last.get(group, 0), f"{p}: {group} went {last.get(group)}->{total}"
            last[group] = total
    assert last == want
    recoveries = handle.recoveries()
    assert recoveries and all(r["scope"] == "global" for r in recoveries), recoveries
