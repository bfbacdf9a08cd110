"""Sources: partitioned, replayable inputs.

A :class:`Source` has a fixed number of partitions; each is read by a
:class:`SourceReader` that can be reopened at an offset it reported earlier.
That is what makes recovery exact: a checkpoint records every partition's
offset, and a restore reopens the readers there.
"""

from __future__ import annotations

import glob as _glob
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import IO, Any

from rayflow.errors import ConfigError

__all__ = ["Generator", "Source", "SourceReader", "TextFiles"]


class SourceReader(ABC):
    """Reads one partition of a source, in order, from a given offset."""

    @abstractmethod
    def read(self, max_items: int) -> list[Any] | None:
        """Return up to ``max_items`` next records.

        Return an empty list when nothing is available right now (an
        unbounded source waiting for data) and ``None`` once the partition is
        exhausted for good (a bounded source at its end). Return fewer than
        ``max_items`` only when that is all there is for now: the runtime
        takes a short read to mean the reader has caught up, and waits a
        moment (2.5 ms at most) before reading again instead of spinning.
        """

    @abstractmethod
    def offset(self) -> Any:
        """The position of the next record ``read`` would return.

        Beware off-by-one: after ``read`` returned records, this must point
        just past the last of them, because a restore reopens the partition
        here and must neither repeat nor skip a record. The value must be
        picklable and must not change afterwards (return a copy, not live state).
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release files or connections; called once the reader is done."""

    def backlog(self) -> int | None:
        """Records available but not read yet (a log's lag), or None if unknown.

        The ``backlog_growing`` alert watches it. It is called from another
        thread than ``read`` (the metrics are answered while reading goes on):
        read plain attributes, do not change any.
        """
        return None


class Source(ABC):
    """A partitioned, replayable input; subclass it to connect a new system."""

    @abstractmethod
    def partitions(self) -> int:
        """How many partitions this source has (fixed for the life of a job)."""

    @abstractmethod
    def open(self, partition: int, offset: Any | None) -> SourceReader:
        """Open ``partition`` at ``offset`` (``None``: from the beginning)."""

    @property
    def bounded(self) -> bool:
        """Whether every partition ends (the job then ends by itself)."""
        return True


class TextFiles(Source):
    """Lines of text files; one partition per file, offset = byte position.

    ``pattern`` is a glob evaluated once, when the source is created, so a
    job reads a fixed set of files. Paths are made absolute: operator
    processes may run in another working directory (they must see the same
    files, for example on one machine or a shared file system).
    """

    def __init__(self, pattern: str, *, encoding: str = "utf-8"):
        if not isinstance(pattern, (str, os.PathLike)):
            raise ConfigError(
                f"TextFiles needs a glob pattern string such as 'data/*.txt'; got {pattern!r}"
            )
        pattern = os.fspath(pattern)
        files = sorted(os.path.abspath(p) for p in _glob.glob(pattern) if os.path.isfile(p))
        if not files:
            raise ConfigError(
                f"TextFiles({pattern!r}) matched no files (looked from {os.getcwd()}); "
                "check the path and the pattern"
            )
        self.pattern = pattern
        self.files: list[str] = files
        self.encoding = encoding

    def partitions(self) -> int:
        return len(self.files)

    def open(self, partition: int, offset: Any | None) -> SourceReader:
        return _TextFileReader(self.files[partition], int(offset or 0), self.encoding)

    def __repr__(self) -> str:
        return f"TextFiles({self.pattern!r}, {len(self.files)} files)"


class _TextFileReader(SourceReader):
    def __init__(self, path: str, offset: int, encoding: str):
        self._file: IO[bytes] = open(path, "rb")
        self._file.seek(offset)
        self._offset = offset
        self._encoding = encoding
        self._pending: list[bytes] = []

    def read(self, max_items: int) -> list[Any] | None:
        # Exactly max_items lines unless the file ends: a short read tells the
        # runtime that the reader has caught up. Lines read past max_items wait
        # in _pending; the offset counts only the lines returned.
        want = max(1, max_items)
        lines = self._pending
        while len(lines) < want:
            more = self._file.readlines((want - len(lines)) * 64)  # size hint in bytes
            if not more:
                break
            lines.extend(more)
        if not lines:
            return None
        raw, self._pending = lines[:want], lines[want:]
        self._offset += sum(map(len, raw))
        enc = self._encoding
        out = []
        for line in raw:
            text = line.decode(enc)
            if text.endswith("\n"):
                text = text[:-2] if text.endswith("\r\n") else text[:-1]
            out.append(text)
        return out

    def offset(self) -> int:
        return self._offset

    def close(self) -> None:
        self._file.close()


class Generator(Source):
    """An unbounded (or ``limit``-ed) replayable source computed by a function.

    ``fn(partition, offset)`` returns the record at ``offset`` of
    ``partition``; because a record is a function of its position, any
    offset can be replayed exactly. ``rate`` caps the records per second of
    the whole source (split evenly over partitions); ``limit`` ends each
    partition after that many records.
    """

    def __init__(
        self,
        fn: Callable[[int, int], Any],
        *,
        partitions: int = 1,
        rate: float | None = None,
        limit: int | None = None,
    ):
        if not callable(fn):
            raise ConfigError(
                f"Generator needs a function fn(partition, offset) -> record; got {fn!r}"
            )
        if not isinstance(partitions, int) or partitions < 1:
            raise ConfigError(f"Generator partitions must be an int >= 1; got {partitions!r}")
        if rate is not None and (not isinstance(rate, (int, float)) or rate <= 0):
            raise ConfigError(f"Generator rate must be > 0 records/s or None; got {rate!r}")
        if limit is not None and (not isinstance(limit, int) or limit < 0):
            raise ConfigError(f"Generator limit must be an int >= 0 or None; got {limit!r}")
        self.fn = fn
        self._partitions = partitions
        self.rate = rate
        self.limit = limit

    def partitions(self) -> int:
        return self._partitions

    @property
    def bounded(self) -> bool:
        return self.limit is not None

    def open(self, partition: int, offset: Any | None) -> SourceReader:
        per_partition = None if self.rate is None else self.rate / self._partitions
        return _GeneratorReader(self.fn, partition, int(offset or 0), per_partition, self.limit)

    def __repr__(self) -> str:
        return f"Generator(partitions={self._partitions}, rate={self.rate}, limit={self.limit})"


class _GeneratorReader(SourceReader):
    def __init__(
        self,
        fn: Callable[[int, int], Any],
        partition: int,
        offset: int,
        rate: float | None,
        limit: int | None,
    ):
        self._fn = fn
        self._partition = partition
        self._next = offset
        self._rate = rate
        self._limit = limit
        self._started = time.monotonic()
        self._start_offset = offset

    def backlog(self) -> int | None:
        """With a rate: the records due by now that were not read yet."""
        if self._rate is None:
            return None
        due = self._start_offset + int((time.monotonic() - self._started) * self._rate)
        if self._limit is not None:
            due = min(due, self._limit)
        return max(0, due - self._next)

    def read(self, max_items: int) -> list[Any] | None:
        start = self._next
        stop = start + max_items
        if self._limit is not None:
            if start >= self._limit:
                return None
            stop = min(stop, self._limit)
        if self._rate is not None:
            allowed = self._start_offset + int((time.monotonic() - self._started) * self._rate)
            stop = min(stop, max(start, allowed))
        fn, p = self._fn, self._partition
        out: list[Any] = []
        append = out.append
        i = start
        try:
            for i in range(start, stop):
                append(fn(p, i))
        except Exception:
            self._next = i  # so that a failure report names the failing offset
            raise
        self._next = stop
        return out

    def offset(self) -> int:
        return self._next
