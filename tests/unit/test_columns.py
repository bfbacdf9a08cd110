"""Columnar chunks: hashing and routing like per-record keys, running sums, the
columnar Generator, map_batches and sinks on chunks, and their errors."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import rayflow as rf
from rayflow._internal.keygroups import KeyRouter, stable_hash
from rayflow._internal.runtime.channels import OutputChannel, hash_router
from rayflow._internal.runtime.columns import (
    Columns,
    ColumnsError,
    count_rows,
    explode,
    exploding,
    hash_column,
    partitions_of,
    running_sum,
)
from rayflow._internal.runtime.mailbox import Mailbox
from rayflow._internal.runtime.operators import (
    KeyByColumnOp,
    MapBatchesOp,
    SumOp,
    UserCodeError,
    _as_batches,
)
from rayflow.errors import BuildError, ConfigError
from tests.unit.test_channels import sender_into

COLUMNS = [
    np.arange(-5000, 5000, 7),
    np.array([0, 2**63 - 1, -(2**63)], dtype=np.int64),
    np.array([2**64 - 1, 3], dtype=np.uint64),
    np.array([1, 200], dtype=np.uint8),
    np.array([True, False]),
    np.array([1.0, -3.0, 2.5, float("nan"), 1e300]),
    np.array(["a", "bé", "", "a"]),
    np.array(["x", 1, (2, "y")], dtype=object),
]


@pytest.mark.parametrize("values", COLUMNS, ids=lambda v: str(v.dtype))
def test_a_column_hashes_and_routes_as_its_values_do_one_by_one(values: np.ndarray) -> None:
    assert hash_column(values).tolist() == [stable_hash(v) for v in values.tolist()]
    for parallelism in (1, 3, 7):
        router = KeyRouter(128, parallelism)
        assert partitions_of(values, 128, parallelism).tolist() == [
            router.partition(v) for v in values.tolist()
        ]


def _channels(n: int) -> list[OutputChannel]:
    return [
        OutputChannel(
            (0, 0),
            f"rx{q}",
            sender_into(Mailbox([(0, 0)], 100, 10**7), (0, 0)),
            credit_batches=100,
            credit_bytes=10**7,
            batch_size=1000,
        )
        for q in range(n)
    ]


def test_the_columnar_shuffle_sends_every_row_where_a_per_record_key_by_would() -> None:
    rng = np.random.default_rng(3)
    chunks = [
        Columns({"sensor": rng.integers(0, 500, 1000), "value": np.arange(1000.0) + i}, "sensor")
        for i in range(3)
    ]

    async def scenario() -> tuple[list[list[Any]], list[list[Any]]]:
        by_chunk, by_record = _channels(3), _channels(3)
        hash_router(by_chunk, 128)(list(chunks))
        hash_router(by_record, 128)(explode(chunks))
        return [ch.buffer for ch in by_chunk], [ch.buffer for ch in by_record]

    columnar, per_record = asyncio.run(scenario())
    for q in range(3):
        assert all(type(x) is Columns for x in columnar[q])
        # The same rows, in the same order, on every channel.
        assert explode(columnar[q]) == per_record[q]
    assert sum(count_rows(b) for b in columnar) == 3000 and all(columnar)


def test_running_sums_match_adding_record_by_record_across_chunks() -> None:
    rnd = random.Random(5)
    state: dict[Any, Any] = {}
    changed: set[Any] = set()
    expected: dict[Any, int] = {}
    for _ in range(4):
        keys = [rnd.randrange(40) * 1000 for _ in range(777)]  # a span wider than uint16
        values = [rnd.randrange(-50, 50) for _ in range(777)]
        out = running_sum(
            Columns({"k": np.array(keys), "v": np.array(values), "x": np.arange(777)}, "k"),
            "v",
            state,
            changed,
        )
        want = []
        for k, v in zip(keys, values, strict=True):
            expected[k] = expected.get(k, 0) + v
            want.append(expected[k])
        assert out.data["v"].tolist() == want
        assert out.data["x"].tolist() == list(range(777))  # the other columns ride along
    assert state == expected and changed == set(expected)
    floats = running_sum(
        Columns({"k": np.array([1, 2, 1]), "v": np.array([0.5, 1.25, 0.25])}, "k"), "v", {}, None
    )
    assert floats.data["v"].tolist() == [0.5, 1.25, 0.75]


def test_sum_gives_the_same_records_on_chunks_as_on_rows() -> None:
    rng = np.random.default_rng(8)
    chunks = [
        Columns({"s": rng.integers(0, 30, 500), "v": rng.integers(0, 9, 500)}, "s")
        for _ in range(3)
    ]
    columnar, per_record = SumOp("total", "v"), SumOp("total", "v")
    got: list[Any] = []
    want: list[Any] = []
    columnar.downstream = [got.extend]
    per_record.downstream = [want.extend]
    for chunk in chunks:
        columnar.feed([chunk])
        per_record.feed(explode([chunk]))
    assert explode(got) == want
    assert columnar.state.values == per_record.state.values
    assert columnar.records_in == columnar.records_out == 1500  # rows, not chunks
    plain = SumOp("total", None)
    out: list[Any] = []
    plain.downstream = [out.extend]
    plain.feed([("a", 1), ("b", 2), ("a", 3)])
    assert out == [("a", 1), ("b", 2), ("a", 4)]


def test_sum_names_the_column_it_misses() -> None:
    op = SumOp("total", "value")
    op.downstream = [lambda items: None]
    with pytest.raises(Exception, match="no column 'value' to add up; the columns are"):
        op.feed([Columns({"s": np.arange(3), "v": np.arange(3)}, "s")])


def test_key_by_a_column_keys_chunks_and_dict_records() -> None:
    op = KeyByColumnOp("by", "s")
    out: list[Any] = []
    op.downstream = [out.extend]
    chunk = Columns({"s": np.array([1, 2]), "v": np.array([3.0, 4.0])})
    op.feed([chunk])
    op.feed([{"s": "a", "v": 1}])
    assert out[0].key == "s" and out[0].data is chunk.data
    assert out[1] == ("a", {"s": "a", "v": 1})
    assert explode(out[:1]) == [(1, {"s": 1, "v": 3.0}), (2, {"s": 2, "v": 4.0})]


@pytest.mark.parametrize("fmt", ["numpy", "pandas", "pyarrow"])
def test_map_batches_keeps_a_chunk_a_chunk(fmt: str) -> None:
    def scale(batch: Any) -> Any:
        if fmt == "numpy":
            return {**batch, "v": batch["v"] * 2}
        if fmt == "pandas":
            assert isinstance(batch, pd.DataFrame)
            return batch.assign(v=batch["v"] * 2)
        assert isinstance(batch, pa.Table)
        return batch.set_column(1, "v", pa.compute.multiply(batch["v"], 2))

    op = MapBatchesOp("scale", scale, fmt)
    out: list[Any] = []
    op.downstream = [out.extend]
    op.feed([Columns({"s": np.arange(4), "v": np.arange(4.0)})])
    assert len(out) == 1 and type(out[0]) is Columns
    assert out[0].rows() == [{"s": i, "v": 2.0 * i} for i in range(4)]
    assert op.records_in == op.records_out == 4


def test_a_failing_chunk_becomes_dead_letters_row_by_row() -> None:
    def bad(batch: Any) -> Any:
        raise ValueError("no")

    op = MapBatchesOp("scale", bad, "numpy")
    op.on_error = "dead_letter"
    letters: list[Any] = []
    op.downstream = [lambda items: None]
    op.dead_downstream = [letters.extend]
    op.feed([Columns({"item": np.array([7, 8, 9])})])
    assert [d.record for d in letters] == [7, 8, 9] and op.records_failed == 3
    op.on_error = "fail"
    with pytest.raises(UserCodeError) as failed:
        op.feed([Columns({"item": np.array([7, 8, 9])})])
    assert failed.value.failure(0).record.startswith("a chunk of 3 rows")


def test_a_step_that_takes_records_gets_the_rows() -> None:
    got: list[Any] = []
    feed = exploding(got.extend)
    feed([Columns({"item": np.array([1, 2])}), Columns({"a": np.array([3])})])
    feed([5])
    assert got == [1, 2, {"a": 3}, 5]


def test_a_sink_with_a_batch_format_gets_batches() -> None:
    chunk = Columns({"s": np.arange(3)})
    batches = _as_batches([chunk, {"s": 9}, {"s": 10}], "pandas")
    assert [type(b) for b in batches] == [pd.DataFrame, pd.DataFrame]
    assert batches[1]["s"].tolist() == [9, 10]
    assert _as_batches([chunk], "pyarrow")[0].column_names == ["s"]


def test_the_columnar_generator_cuts_chunks_at_fixed_offsets() -> None:
    def batch(p: int, offset: int, count: int) -> dict[str, np.ndarray]:
        return {"i": np.arange(offset, offset + count), "p": np.full(count, p)}

    source = rf.sources.Generator(batch_fn=batch, partitions=2, limit=25, rows_per_batch=10)
    reader = source.open(1, None)
    first = reader.read(5)
    assert first is not None and [len(c) for c in first] == [10]  # a whole chunk
    assert reader.offset() == 10
    rest = reader.read(100)
    assert rest is not None and [len(c) for c in rest] == [10, 5]  # the limit cuts the last
    assert reader.read(100) is None
    assert explode(first + rest) == [{"i": i, "p": 1} for i in range(25)]
    # Reopened at an offset it gave, it cuts the same chunks.
    again = source.open(1, 10).read(100)
    assert again is not None and explode(again) == explode(rest)
    # Any of the formats may come back.
    frames = rf.sources.Generator(
        batch_fn=lambda p, o, n: pd.DataFrame({"i": range(o, o + n)}), limit=4, rows_per_batch=2
    ).open(0, None)
    assert explode(frames.read(4) or []) == [{"i": i} for i in range(4)]


def test_the_columnar_generator_says_what_is_wrong() -> None:
    with pytest.raises(ConfigError, match="either fn"):
        rf.sources.Generator()
    with pytest.raises(ConfigError, match="both"):
        rf.sources.Generator(lambda p, i: i, batch_fn=lambda p, o, n: {})
    short = rf.sources.Generator(batch_fn=lambda p, o, n: {"i": np.arange(n - 1)}, limit=9)
    with pytest.raises(ValueError, match=r"offset 0, count 9\) returned 8 rows"):
        short.open(0, None).read(9)
    wrong = rf.sources.Generator(batch_fn=lambda p, o, n: [1, 2], limit=2)
    with pytest.raises(ColumnsError, match="must return a dict of column name"):
        wrong.open(0, None).read(2)


def test_sum_needs_a_keyed_stream() -> None:
    flow = rf.Dataflow("f")
    src = flow.source("s", rf.sources.Generator(lambda p, i: i, limit=3))
    with pytest.raises(BuildError, match="sum needs a keyed stream"):
        src.sum("total")
    with pytest.raises(BuildError, match="column must be a str"):
        src.key_by("k", "sensor").sum("total", 3)  # type: ignore[arg-type]


def test_the_plan_knows_which_streams_are_chunks() -> None:
    from rayflow._internal.plan import build_plan

    flow = rf.Dataflow("f", parallelism=2)
    cols = flow.source(
        "cols", rf.sources.Generator(batch_fn=lambda p, o, n: {"k": np.arange(n)}, limit=9)
    )
    recs = flow.source("recs", rf.sources.Generator(lambda p, i: {"k": i}, limit=9))
    scaled = cols.map_batches("scale", lambda b: b, batch_format="numpy")
    scaled.key_by("by_k", "k").sum("total", "k").sink("a", rf.testing.Collect())
    scaled.map_batches("as_list", lambda b: b).sink("b", rf.testing.Collect())
    scaled.union("both", recs).sink("c", rf.testing.Collect())  # mixed: rows
    scaled.union("same", cols).key_by("k2", lambda r: r["k"]).sink("d", rf.testing.Collect())
    plan = build_plan(flow.spec())
    assert plan.columnar
    assert plan.chunk_steps == {"cols", "scale", "by_k", "total", "same"}


def test_a_sink_with_an_unknown_batch_format_is_refused() -> None:
    class Odd(rf.testing.Collect):
        batch_format = "arrow"

    flow = rf.Dataflow("f")
    src = flow.source("s", rf.sources.Generator(lambda p, i: i, limit=3))
    with pytest.raises(BuildError, match=r"step 'out': the sink's batch_format must be None"):
        src.sink("out", Odd())
