"""map_batches' formats: records to a batch and back, the op's errors and on_error."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import rayflow as rf
from rayflow._internal.runtime.batches import BatchFormatError, from_batch, to_batch
from rayflow._internal.runtime.operators import MapBatchesOp, UserCodeError
from rayflow.errors import BuildError

FORMATS = ("list", "numpy", "pandas", "pyarrow")


@pytest.mark.parametrize("fmt", FORMATS)
def test_records_go_to_a_batch_and_back_unchanged(fmt: str) -> None:
    dicts = [{"sensor": i % 3, "value": i / 2, "name": f"s{i}"} for i in range(10)]
    assert from_batch(to_batch(dicts, fmt), fmt) == dicts
    plain = [3, 1, 4, 1, 5]
    assert from_batch(to_batch(plain, fmt), fmt) == plain


def test_each_format_is_what_ray_data_gives() -> None:
    dicts = [{"a": 1, "b": 2.5}, {"a": 2, "b": 3.5}]
    numpy = to_batch(dicts, "numpy")
    assert set(numpy) == {"a", "b"} and isinstance(numpy["a"], np.ndarray)
    assert numpy["a"].tolist() == [1, 2]
    assert isinstance(to_batch(dicts, "pandas"), pd.DataFrame)
    assert to_batch(dicts, "pyarrow").column_names == ["a", "b"]
    assert to_batch([7, 8], "numpy")["item"].tolist() == [7, 8]


def _op(fn: Any, fmt: str, on_error: str = "fail") -> tuple[MapBatchesOp, list[Any], list[Any]]:
    op = MapBatchesOp("scale", fn, fmt)
    op.on_error = on_error
    out: list[Any] = []
    dead: list[Any] = []
    op.downstream.append(out.extend)
    op.dead_downstream.append(dead.extend)
    return op, out, dead


def test_a_numpy_function_scales_and_clips_every_row_of_the_batch() -> None:
    def scale(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"sensor": batch["sensor"], "value": np.clip(batch["value"] * 2, 0, 10)}

    op, out, _ = _op(scale, "numpy")
    op.feed([{"sensor": s, "value": float(s)} for s in range(8)])
    assert out == [{"sensor": s, "value": min(2.0 * s, 10)} for s in range(8)]
    assert (op.records_in, op.records_out) == (8, 8)


def test_pandas_and_pyarrow_functions_may_change_the_number_of_rows() -> None:
    op, out, _ = _op(lambda df: df[df["v"] % 2 == 0], "pandas")
    op.feed([{"v": i} for i in range(6)])
    assert out == [{"v": 0}, {"v": 2}, {"v": 4}]
    op, out, _ = _op(lambda t: pa.concat_tables([t, t]), "pyarrow")
    op.feed([1, 2])
    assert out == [1, 2, 1, 2]


def test_a_wrong_return_type_names_the_step_the_value_and_the_fix() -> None:
    op, _, _ = _op(lambda batch: [1, 2], "numpy")
    with pytest.raises(UserCodeError) as info:
        op.feed([{"a": 1}])
    assert info.value.step == "scale"
    assert isinstance(info.value.cause, BatchFormatError)
    assert "dict of column name -> numpy array; got list" in str(info.value.cause)
    with pytest.raises(BatchFormatError, match="different lengths"):
        from_batch({"a": np.arange(2), "b": np.arange(3)}, "numpy")
    with pytest.raises(BatchFormatError, match="same keys"):
        to_batch([{"a": 1}, {"b": 2}], "pandas")
    with pytest.raises(BuildError, match="batch_format must be one of"):
        rf.Dataflow("x").source("s", rf.testing.from_items([1])).map_batches(
            "m", lambda b: b, batch_format="polars"
        )


def test_a_failing_batch_is_skipped_or_dead_lettered_whole() -> None:
    def picky(batch: list[int]) -> list[int]:
        if 13 in batch:
            raise ValueError("unlucky batch")
        return [x * 10 for x in batch]

    op, out, dead = _op(picky, "list", on_error="skip")
    op.feed([1, 2])
    op.feed([12, 13, 14])
    assert out == [10, 20] and op.records_failed == 3 and not dead
    op, out, dead = _op(picky, "list", on_error="dead_letter")
    op.feed([12, 13, 14])
    assert not out and [d.record for d in dead] == [12, 13, 14]
    assert all(d.step == "scale" and "unlucky batch" in d.message for d in dead)
