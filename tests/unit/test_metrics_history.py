"""The ring of polled metrics behind handle.history(): its frame, its bound, its end."""

from __future__ import annotations

import pickle
import sys
from typing import Any

import pytest

import rayflow as rf
from rayflow._internal.history import COLUMNS, MetricsHistory


def _poll(records: int, *, state_keys: int | None = None, last: int | None = None) -> dict:
    head: dict[str, Any] = {
        "partition": 0,
        "records_in": records,
        "records_out": records,
        "records_in_per_s": 10.0,
        "records_out_per_s": 10.0,
        "busy_ms_per_s": 250.0,
        "idle_ms_per_s": 700.0,
        "backpressured_ms_per_s": 50.0,
        "mailbox_depth": 2,
        "mailbox_bytes": 300,
        "inflight_records": 5,
        "inflight_s": 0.5,
    }
    fused = {**head, "partition": 1, "mailbox_depth": 0}
    del fused["inflight_records"], fused["inflight_s"]
    if state_keys is not None:
        head["state_keys"] = state_keys
    return {
        "status": "RUNNING",
        "restarts": 0,
        "metrics": {"src": [head], "count": [fused]},
        "checkpoints": {"completed": 3, "failed": 1, "last": {"id": last} if last else None},
    }


def test_frame_has_a_row_per_poll_step_and_partition() -> None:
    history = MetricsHistory(origin=100.0, kinds={"src": "source", "count": "reduce"})
    history.record(101.0, _poll(10, state_keys=4, last=2))
    history.record(102.0, _poll(25))
    frame = history.frame()
    assert list(frame.columns) == list(COLUMNS)
    assert frame[["step", "partition", "records_out"]].values.tolist() == [
        ["src", 0, 10],
        ["count", 1, 10],
        ["src", 0, 25],
        ["count", 1, 25],
    ]
    assert frame["elapsed_s"].tolist() == [1.0, 1.0, 2.0, 2.0]
    assert frame["kind"].tolist() == ["source", "reduce"] * 2
    assert str(frame["time"].iloc[0]) == "1970-01-01 00:01:41+00:00"
    assert frame["records_out"].dtype == "int64"
    # Figures a partition does not report are missing, not zero.
    assert frame["state_keys"].tolist()[:1] == [4] and frame["state_keys"].isna().sum() == 3
    assert frame["inflight_s"].isna().tolist() == [False, True, False, True]
    assert frame["last_checkpoint"].tolist()[0] == 2 and frame["last_checkpoint"].isna()[2]
    assert frame["checkpoints_completed"].tolist() == [3, 3, 3, 3]
    assert frame["status"].tolist() == ["RUNNING"] * 4


def test_the_ring_keeps_the_newest_polls() -> None:
    history = MetricsHistory(origin=0.0, max_polls=3)
    for n in range(5):
        history.record(float(n), _poll(n))
    assert len(history) == 3
    assert sorted(set(history.frame()["records_in"])) == [2, 3, 4]


def test_the_ring_keeps_at_most_max_rows() -> None:
    history = MetricsHistory(origin=0.0, max_rows=5)  # 2 rows per poll: 2 polls fit
    for n in range(4):
        history.record(float(n), _poll(n))
    assert len(history) == 2
    assert sorted(set(history.frame()["records_in"])) == [2, 3]


def test_nothing_is_kept_after_the_final_metrics() -> None:
    history = MetricsHistory(origin=0.0)
    history.record(1.0, _poll(1))
    history.close(2.0, {**_poll(7), "status": "STOPPED"})
    history.record(3.0, _poll(9))  # a poll answered after the end
    frame = history.frame()
    assert frame["records_out"].tolist()[-2:] == [7, 7]
    assert frame["status"].iloc[-1] == "STOPPED"


def test_an_empty_history_is_an_empty_frame_with_every_column() -> None:
    frame = MetricsHistory(origin=0.0).frame()
    assert frame.empty and list(frame.columns) == list(COLUMNS)


def test_history_survives_pickling() -> None:
    history = MetricsHistory(origin=0.0)
    history.record(1.0, _poll(5))
    copy = pickle.loads(pickle.dumps(history))
    copy.record(2.0, _poll(6))
    assert copy.frame()["records_out"].tolist() == [5, 5, 6, 6]


def test_without_pandas_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas now fails
    with pytest.raises(rf.ConfigError, match=r"needs pandas.*pip install 'rayflow\[notebook\]'"):
        MetricsHistory(origin=0.0).frame()
