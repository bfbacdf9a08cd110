from __future__ import annotations

from typing import Any

import pytest

from rayflow._internal.runtime.operators import (
    FilterOp,
    FlatMapOp,
    KeyByOp,
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


def _bad(x: Any) -> Any:
    value = x[1] if isinstance(x, tuple) else x
    if value % 4 == 0:
        raise ValueError(f"bad {value}")
    return value


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda: MapOp("m", lambda x: _bad(x) * 10), [10, 10, 30, 50, 50, 60, 70, 90]),
        (lambda: FilterOp("f", lambda x: _bad(x) % 2), [1, 1, 3, 5, 5, 7, 9]),
        (
            lambda: FlatMapOp("fm", lambda x: [_bad(x)] * 2),
            [1, 1, 1, 1, 3, 3, 5, 5, 5, 5, 6, 6, 7, 7, 9, 9],
        ),
        (
            lambda: KeyByOp("k", lambda x: _bad(x) % 3),
            [(1, 1), (1, 1), (0, 3), (2, 5), (2, 5), (0, 6), (1, 7), (0, 9)],
        ),
    ],
    ids=["map", "filter", "flat_map", "key_by"],
)
def test_a_stateless_step_sets_aside_every_bad_record_and_keeps_the_rest_in_order(
    make: Any, expected: list[Any]
) -> None:
    items = [1, 1, 3, 4, 5, 5, 4, 6, 7, 8, 9]  # the same object twice (1, 5) and bad ones (4, 8)
    op = make()
    op.on_error = "dead_letter"
    out = _collect(op)
    letters: list[Any] = []
    op.dead_downstream.append(letters.extend)
    op.feed(items)
    assert out == expected
    assert [d.record for d in letters] == [4, 4, 8] and op.records_failed == 3
    assert letters[0].error_type == "builtins.ValueError" and letters[0].message == "bad 4"


def test_keyed_steps_skip_bad_records_without_applying_them_twice() -> None:
    summed = ReduceOp("sum", lambda acc, v: acc + _bad(v), 0)
    summed.on_error = "skip"
    out = _collect(summed)
    summed.feed([("a", 1), ("a", 4), ("a", 2), ("b", 8), ("a", 3)])
    assert out == [("a", 1), ("a", 3), ("a", 6)] and summed.records_failed == 2
    assert summed.state.values == {"a": 6}

    def step(state: int | None, v: int) -> tuple[int, list[int]]:
        total = (state or 0) + _bad(v)
        return total, [total]

    mapped = StatefulMapOp("run", step)
    mapped.on_error = "skip"
    out2 = _collect(mapped)
    mapped.feed([("a", 1), ("a", 4), ("a", 1), ("a", 8), ("a", 1)])  # equal tuples, bad between
    assert out2 == [("a", 1), ("a", 2), ("a", 3)] and mapped.state.values == {"a": 3}


def test_with_on_error_fail_the_error_names_the_step_and_record() -> None:
    op = MapOp("m", _bad)
    with pytest.raises(UserCodeError) as info:
        op.feed([1, 2, 4])
    assert info.value.step == "m" and info.value.record == 4
