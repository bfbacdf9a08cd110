from __future__ import annotations

from typing import Any

import pytest

from rayflow._internal.runtime.operators import (
    FlatMapOp,
    MapOp,
    ReduceOp,
    StatefulMapOp,
    UserCodeError,
)
from rayflow._internal.spec import MISSING


def _collect(op: Any) -> list[Any]:
    out: list[Any] = []
    op.downstream.append(out.extend)
    return out


def test_reduce_with_and_without_initial() -> None:
    summed = ReduceOp("sum", lambda acc, v: acc + v, 10)
    out = _collect(summed)
    summed.feed([("a", 1), ("b", 2), ("a", 3)])
    assert out == [("a", 11), ("b", 12), ("a", 14)]
    first = ReduceOp("max", max, MISSING)
    out2 = _collect(first)
    first.feed([("a", 5), ("a", 3), ("a", 9)])
    assert out2 == [("a", 5), ("a", 5), ("a", 9)]


def test_reduce_copies_a_mutable_initial_per_key() -> None:
    op = ReduceOp("lists", lambda acc, v: (acc.append(v), acc)[1], [])
    out = _collect(op)
    op.feed([("a", 1), ("b", 2)])
    assert out == [("a", [1]), ("b", [2])]


def test_stateful_map_deletes_state_when_it_returns_none() -> None:
    def count_to_three(state: int | None, value: str) -> tuple[int | None, list[str]]:
        n = (state or 0) + 1
        if n == 3:
            return None, [f"{value}: third"]
        return n, []

    op = StatefulMapOp("three", count_to_three)
    out = _collect(op)
    op.feed([("k", "x"), ("k", "y"), ("k", "z"), ("k", "again")])
    assert out == [("k", "z: third")]
    assert op.state.values == {"k": 1}


def test_user_errors_name_the_step_and_the_failing_record() -> None:
    op = MapOp("invert", lambda x: 1 / x)
    with pytest.raises(UserCodeError) as info:
        op.feed([1, 2, 0, 4])
    failure = info.value.failure(partition=3)
    assert (failure.step, failure.partition, failure.record) == ("invert", 3, "0")
    assert failure.message == "ZeroDivisionError: division by zero"
    assert "1 / x" in (failure.traceback or "")


def test_flat_map_returning_a_non_iterable_is_explained() -> None:
    op = FlatMapOp("split", lambda x: None if x == "bad" else x.split())
    with pytest.raises(UserCodeError) as info:
        op.feed(["a b", "bad"])
    assert info.value.record == "bad"
    assert "must return an iterable of records; it returned None" in str(
        info.value.failure(0).message
    )


def test_stateful_map_wrong_return_shape_is_explained() -> None:
    op = StatefulMapOp("sm", lambda s, v: v)
    with pytest.raises(UserCodeError) as info:
        op.feed([("k", 5)])
    assert "must return a pair (new_state_or_None, outputs); it returned 5" in str(
        info.value.failure(0).message
    )
