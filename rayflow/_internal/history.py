"""The metrics a job handle has polled over the job's life, kept compactly in a ring.

The driver already polls the job's coordinator once per
``RuntimeConfig.metrics_interval_s`` (default 1 s) for telemetry; every poll
is also recorded here, so ``handle.history()`` costs the job no call of its
own. Memory is bounded: each poll is one flat array of floats (about 100
bytes per step partition), and the ring keeps the last :data:`MAX_POLLS`
polls (an hour at the default interval) but at most :data:`MAX_ROWS` rows
(about 50 MB; a job of more than ~140 step partitions keeps less than an
hour), dropping the oldest first. The job's final metrics are recorded
last, when it ends, and nothing after them.

pandas is imported only when a DataFrame is asked for; it is an optional
dependency (``pip install 'rayflow[notebook]'``).
"""

from __future__ import annotations

import importlib
import math
import threading
from array import array
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rayflow._internal.extras import missing_extra

#: Polls kept: at the default interval of 1 s, the last hour.
MAX_POLLS = 3600
#: Rows (step partitions x polls) kept at most, whatever the number of polls.
MAX_ROWS = 500_000

#: Per-partition figures kept from each poll (see the README's metrics section).
FIELDS: tuple[str, ...] = (
    "records_in",
    "records_out",
    "records_in_per_s",
    "records_out_per_s",
    "busy_ms_per_s",
    "idle_ms_per_s",
    "backpressured_ms_per_s",
    "mailbox_depth",
    "mailbox_bytes",
    "inflight_records",
    "inflight_s",
    "state_keys",
)

#: Fields every partition reports: integers in the frame (a missing one counts as 0).
_COUNTS = ("records_in", "records_out", "mailbox_depth", "mailbox_bytes")
#: Integer fields only some partitions (or polls) have: nullable integers in the frame.
_OPTIONAL_COUNTS = ("inflight_records", "state_keys")

#: Job-level columns, repeated on every row of a poll.
JOB_COLUMNS: tuple[str, ...] = (
    "status",
    "restarts",
    "checkpoints_completed",
    "checkpoints_failed",
    "last_checkpoint",
)

COLUMNS: tuple[str, ...] = (
    "time",
    "elapsed_s",
    "step",
    "kind",
    "partition",
    *FIELDS,
    *JOB_COLUMNS,
)


def require(module: str, what: str) -> Any:
    """Import an optional dependency of the notebook surface, or say how to install it.

    Raises ``rf.ConfigError`` naming ``pip install 'rayflow[notebook]'``.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise missing_extra(module.split(".")[0], what, "notebook") from None


@dataclass(frozen=True)
class _Poll:
    """One poll: when, the job-level figures, and a row of FIELDS per (step, partition)."""

    time: float
    status: str
    restarts: int | None
    checkpoints_completed: int | None
    checkpoints_failed: int | None
    last_checkpoint: int | None
    keys: tuple[tuple[str, int], ...]
    values: array  # len(keys) * len(FIELDS) floats, row after row


class MetricsHistory:
    """A bounded ring of polled metrics; thread-safe (polled in one thread, read in another)."""

    def __init__(
        self,
        origin: float,
        kinds: Mapping[str, str] | None = None,
        *,
        max_polls: int = MAX_POLLS,
        max_rows: int = MAX_ROWS,
    ):
        if max_polls < 1 or max_rows < 1:
            raise ValueError(
                f"max_polls and max_rows must be >= 1; got {max_polls!r} and {max_rows!r}"
            )
        self.origin = origin  # wall-clock time that elapsed_s counts from
        self.kinds = dict(kinds or {})  # step -> its kind ("source", "map", ..., "sink")
        self.max_polls = max_polls
        self.max_rows = max_rows
        self._polls: deque[_Poll] = deque()
        self._rows = 0  # rows of the polls kept
        self._closed = False
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._polls)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def record(self, when: float, data: Mapping[str, Any]) -> None:
        """Keep one poll (the coordinator's ``telemetry`` answer); ignored once closed."""
        poll = self._poll(when, data)
        with self._lock:
            if not self._closed:
                self._append(poll)

    def close(self, when: float, data: Mapping[str, Any]) -> None:
        """Keep the job's final figures as the last poll; later polls are ignored."""
        poll = self._poll(when, data)
        with self._lock:
            if not self._closed:
                self._append(poll)
                self._closed = True

    def _append(self, poll: _Poll) -> None:
        """Keep ``poll``; drop the oldest beyond the bounds (the newest always stays)."""
        self._polls.append(poll)
        self._rows += len(poll.keys)
        while len(self._polls) > 1 and (
            len(self._polls) > self.max_polls or self._rows > self.max_rows
        ):
            self._rows -= len(self._polls.popleft().keys)

    def _poll(self, when: float, data: Mapping[str, Any]) -> _Poll:
        keys: list[tuple[str, int]] = []
        values = array("d")
        for step, entries in (data.get("metrics") or {}).items():
            for entry in entries:
                keys.append((str(step), int(entry.get("partition", len(keys)))))
                values.extend(_number(entry.get(f)) for f in FIELDS)
        stats = data.get("checkpoints") or {}
        last = stats.get("last") or {}
        key_tuple = tuple(keys)
        previous = self._polls[-1] if self._polls else None
        if previous is not None and previous.keys == key_tuple:
            key_tuple = previous.keys  # one shared copy while the layout stays the same
        return _Poll(
            time=when,
            status=str(data.get("status", "")),
            restarts=data.get("restarts"),
            checkpoints_completed=stats.get("completed"),
            checkpoints_failed=stats.get("failed"),
            last_checkpoint=last.get("id"),
            keys=key_tuple,
            values=values,
        )

    def frame(self) -> Any:
        """A pandas DataFrame with one row per (poll, step, partition); see :data:`COLUMNS`."""
        pd = require("pandas", "history()")
        np = require("numpy", "history()")
        with self._lock:
            polls = list(self._polls)
        counts = [len(p.keys) for p in polls]
        rows = sum(counts)
        if rows:
            values = np.concatenate([np.frombuffer(p.values, dtype=np.float64) for p in polls])
        else:
            values = np.empty(0, dtype=np.float64)
        values = values.reshape(rows, len(FIELDS))
        times = np.repeat(np.array([p.time for p in polls], dtype=np.float64), counts)
        steps = [s for p in polls for s, _ in p.keys]
        columns: dict[str, Any] = {
            "time": pd.to_datetime(times, unit="s", utc=True),
            "elapsed_s": times - self.origin,
            "step": pd.array(steps, dtype="string"),
            "kind": pd.array([self.kinds.get(s) for s in steps], dtype="string"),
            "partition": np.array([n for p in polls for _, n in p.keys], dtype=np.int64),
        }
        for i, name in enumerate(FIELDS):
            column = values[:, i]
            if name in _COUNTS:
                columns[name] = np.nan_to_num(column, nan=0.0).astype(np.int64)
            elif name in _OPTIONAL_COUNTS:
                columns[name] = pd.array(column, dtype="Float64").astype("Int64")
            else:
                columns[name] = column
        for name in JOB_COLUMNS:
            per_poll = [getattr(p, name) for p in polls]
            repeated = [value for value, n in zip(per_poll, counts, strict=True) for _ in range(n)]
            dtype = "string" if name == "status" else "Int64"
            columns[name] = pd.array(repeated, dtype=dtype)
        return pd.DataFrame(columns, columns=list(COLUMNS))


def _number(value: Any) -> float:
    """A metric as a float; NaN where a partition does not report it."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
