"""Sources: partitioned, replayable inputs.

A :class:`Source` has a fixed number of partitions; each is read by a
:class:`SourceReader` that can be reopened at an offset it reported earlier.
That is what makes recovery exact: a checkpoint records every partition's
offset, and a restore reopens the readers there.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from rayflow.errors import ConfigError

__all__ = ["Generator", "S3Files", "Source", "SourceReader", "TextFiles"]


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

    @property
    def replays_in_order(self) -> bool:
        """Whether a partition reopened at an offset reads the same records in the same
        order as the first time. Partial recovery restarts only a lost partition of a
        source that does; one that does not (tailing files, whose lines interleave as
        they come) is recovered by a global restart."""
        return True

    def restore_offsets(self, offsets: dict[int, Any]) -> dict[int, Any]:
        """The offsets to reopen partitions at, from those a checkpoint holds.

        ``offsets`` maps every partition of this step in the restored
        checkpoint to the offset its reader reported then, perhaps under
        another partitioning (the inputs changed between runs). The default
        keeps them by partition number, right where a partition's identity
        never changes (a generator's). A source whose partitions come from
        something that may change (a file list, topics) overrides it to move
        each offset to the partition that reads its input now, and raises
        ``ConfigError`` for offsets it cannot place.
        """
        return offsets


class _LineFiles(Source):
    """What TextFiles and S3Files share: partitions of files, offsets per file."""

    _what = "files"

    def _setup(
        self,
        store: Any,
        *,
        tail: bool,
        partitions: int | None,
        poll_s: float,
        encoding: str,
    ) -> None:
        name = type(self).__name__
        if not isinstance(tail, bool):
            raise ConfigError(f"{name} tail must be True or False; got {tail!r}")
        if partitions is not None and (
            not isinstance(partitions, int) or isinstance(partitions, bool) or partitions < 1
        ):
            raise ConfigError(f"{name} partitions must be an int >= 1 or None; got {partitions!r}")
        if isinstance(poll_s, bool) or not isinstance(poll_s, (int, float)) or poll_s <= 0:
            raise ConfigError(f"{name} poll_s must be > 0 seconds; got {poll_s!r}")
        self._store = store
        self.tail = tail
        self.poll_s = float(poll_s)
        self.encoding = encoding
        # A partition per file (bounded, partitions=None), else files by a stable hash.
        self._hashed = tail or partitions is not None
        self._partitions = partitions if partitions is not None else 1
        try:
            listed = store.list()
        except Exception as exc:
            raise ConfigError(f"{self._describe()}: listing failed: {exc}") from exc
        self.files: list[str] = sorted(listed)
        if not tail and not self.files:
            where = f" (looked from {os.getcwd()})" if self._what == "files" else ""
            raise ConfigError(
                f"{self._describe()} matched no {self._what}{where}; check the path and "
                "the pattern (or pass tail=True to wait for them)"
            )
        self._index = {f: i for i, f in enumerate(self.files)}

    def _describe(self) -> str:
        return f"{type(self).__name__}({self._store.describe()})"

    def partitions(self) -> int:
        if self._hashed:
            return self._partitions
        return len(self.files)

    @property
    def bounded(self) -> bool:
        return not self.tail

    @property
    def replays_in_order(self) -> bool:
        # Tailing, one partition's files interleave as lines come: not again alike.
        return not self.tail

    def _owner(self, name: str) -> int | None:
        """The partition reading file ``name`` (None: no partition reads it)."""
        if self._hashed:
            from rayflow._internal.connectors.files import owner

            return owner(name, self._partitions)
        return self._index.get(name)

    def open(self, partition: int, offset: Any | None) -> SourceReader:
        from rayflow._internal.connectors.files import LineReader, positions_of

        what = f"{self._describe()} partition {partition}"
        positions = {} if offset is None else positions_of(offset, what)
        for name in positions:
            if self._owner(name) != partition:
                raise ConfigError(
                    f"{what}: the offset to restore names {name}, which this partition "
                    "does not read (offsets of file sources are regrouped per file by "
                    "restore_offsets; was it bypassed?)"
                )
        files: list[str] | None = None
        if not self.tail:
            if self._hashed:
                files = [f for f in self.files if self._owner(f) == partition]
            else:
                files = [self.files[partition]]
            known = set(files)
            positions = {f: p for f, p in positions.items() if f in known}
        return LineReader(
            self._store,
            positions,
            files=files,
            owns=lambda name: self._owner(name) == partition,
            poll_s=self.poll_s,
            encoding=self.encoding,
        )

    def restore_offsets(self, offsets: dict[int, Any]) -> dict[int, Any]:
        """Every file's position in the checkpoint, for the partition that reads it now.

        Files are matched by name: one the checkpoint does not know starts at
        0; one it knows that is not matched any more is not read (bounded:
        dropped now, tailing: forgotten at the first listing).
        """
        from rayflow._internal.connectors.files import regroup

        return regroup(
            offsets,
            self.partitions(),
            self._owner,
            None if self.tail else self.files,
            self._describe(),
        )

    def __repr__(self) -> str:
        if self.tail:
            return (
                f"{type(self).__name__}({self._store.describe()}, tail=True, "
                f"partitions={self._partitions})"
            )
        return f"{type(self).__name__}({self._store.describe()}, {len(self.files)} {self._what})"


class TextFiles(_LineFiles):
    """Lines of local text files; offsets are (file, byte position).

    ``pattern`` is a glob (relative to the working directory of the process
    that creates the source; operators may run elsewhere but must see the
    same files: one machine, or a shared file system). Records are the lines
    as ``str`` without their line ending.

    ``tail=False``: the files matching when the source is created, each to
    its end; a partition per file unless ``partitions=N`` spreads them over N
    by a stable hash of their path. ``tail=True``: the glob is listed every
    ``poll_s`` seconds and never ends; new files are read from their start,
    lines appended to a file are read as they come (only complete lines: a
    last line waits for its newline), a file that shrank below the position
    read (replaced, truncated) is read again from its start, and one that
    disappeared is forgotten. Files belong to ``partitions`` partitions
    (default 1) by a stable hash of their path.

    The offset of a partition names its files (``{"files": {path: byte
    position}}``), so a restore gives every file its own position, whatever
    the glob matches by then: new files start at 0, files no longer matched
    are not read, a renamed file is a new file.
    """

    def __init__(
        self,
        pattern: str,
        *,
        tail: bool = False,
        partitions: int | None = None,
        poll_s: float = 1.0,
        encoding: str = "utf-8",
    ):
        from rayflow._internal.connectors.files import LocalFiles

        if not isinstance(pattern, (str, os.PathLike)):
            raise ConfigError(
                f"TextFiles needs a glob pattern string such as 'data/*.txt'; got {pattern!r}"
            )
        self.pattern = os.fspath(pattern)
        self._setup(
            LocalFiles(self.pattern, os.getcwd()),
            tail=tail,
            partitions=partitions,
            poll_s=poll_s,
            encoding=encoding,
        )


class S3Files(_LineFiles):
    """Lines of S3 objects whose keys match a glob; offsets are (object, byte position).

    ``uri_glob`` is ``s3://bucket/prefix/*.jsonl``: ``*`` and ``?`` match
    within one ``/`` level, ``**`` across levels. Objects are read with ranged
    GETs from the byte position on, streamed (memory stays bounded whatever
    their size), through boto3 configured like rayflow's S3 storage
    (``AWS_ENDPOINT_URL`` for S3-compatible servers; the ``s3`` extra).
    ``tail``, ``partitions`` and ``poll_s`` work as in :class:`TextFiles`
    (with ``tail=True`` an object that grew is read on from its position).
    """

    _what = "objects"

    def __init__(
        self,
        uri_glob: str,
        *,
        tail: bool = False,
        partitions: int | None = None,
        poll_s: float = 1.0,
        encoding: str = "utf-8",
    ):
        from rayflow._internal.connectors.files import S3Objects, split_s3_uri
        from rayflow._internal.extras import require_installed

        bucket, key = split_s3_uri(uri_glob, "S3Files")
        require_installed("boto3", "rf.sources.S3Files", "s3")
        self.uri = uri_glob
        self._setup(
            S3Objects(bucket, key),
            tail=tail,
            partitions=partitions,
            poll_s=poll_s,
            encoding=encoding,
        )


class Generator(Source):
    """An unbounded (or ``limit``-ed) replayable source computed by a function.

    ``fn(partition, offset)`` returns the record at ``offset`` of
    ``partition``; because a record is a function of its position, any
    offset can be replayed exactly. ``rate`` caps the records per second of
    the whole source (split evenly over partitions); ``limit`` ends each
    partition after that many records.

    Columnar instead: ``batch_fn(partition, offset, count)`` returns the
    ``count`` records from ``offset`` on as columns (a dict of column name
    -> NumPy array, a pandas DataFrame or a pyarrow Table), cut at multiples
    of ``rows_per_batch``. They travel as one chunk, never as Python
    objects, through ``map_batches``, a ``key_by`` on a column, ``sum`` and
    sinks that take batches; any other step gets them as records (a dict
    per row, or the value when the only column is ``"item"``).
    """

    def __init__(
        self,
        fn: Callable[[int, int], Any] | None = None,
        *,
        partitions: int = 1,
        rate: float | None = None,
        limit: int | None = None,
        batch_fn: Callable[[int, int, int], Any] | None = None,
        rows_per_batch: int = 8192,
    ):
        if (fn is None) == (batch_fn is None):
            raise ConfigError(
                "Generator needs either fn(partition, offset) -> record or "
                "batch_fn(partition, offset, count) -> columns; got "
                + ("both" if fn is not None else "neither")
            )
        if fn is not None and not callable(fn):
            raise ConfigError(
                f"Generator needs a function fn(partition, offset) -> record; got {fn!r}"
            )
        if batch_fn is not None and not callable(batch_fn):
            raise ConfigError(
                "Generator batch_fn must be a function (partition, offset, count) -> columns; "
                f"got {batch_fn!r}"
            )
        if not isinstance(rows_per_batch, int) or rows_per_batch < 1:
            raise ConfigError(
                f"Generator rows_per_batch must be an int >= 1; got {rows_per_batch!r}"
            )
        if not isinstance(partitions, int) or partitions < 1:
            raise ConfigError(f"Generator partitions must be an int >= 1; got {partitions!r}")
        if rate is not None and (not isinstance(rate, (int, float)) or rate <= 0):
            raise ConfigError(f"Generator rate must be > 0 records/s or None; got {rate!r}")
        if limit is not None and (not isinstance(limit, int) or limit < 0):
            raise ConfigError(f"Generator limit must be an int >= 0 or None; got {limit!r}")
        self.fn = fn
        self.batch_fn = batch_fn
        self.rows_per_batch = rows_per_batch
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
        if self.batch_fn is not None:
            return _ColumnsReader(
                self.batch_fn,
                partition,
                int(offset or 0),
                per_partition,
                self.limit,
                self.rows_per_batch,
            )
        assert self.fn is not None
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

    def _due(self) -> int:
        """With a rate: the offset up to which records are due by now."""
        assert self._rate is not None
        return self._start_offset + int((time.monotonic() - self._started) * self._rate)

    def backlog(self) -> int | None:
        """With a rate: the records due by now that were not read yet."""
        if self._rate is None:
            return None
        due = self._due()
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
            stop = min(stop, max(start, self._due()))
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


class _ColumnsReader(_GeneratorReader):
    """Reads whole chunks of ``rows``, cut at multiples of ``rows`` (a replay cuts alike)."""

    def __init__(
        self,
        batch_fn: Callable[[int, int, int], Any],
        partition: int,
        offset: int,
        rate: float | None,
        limit: int | None,
        rows: int,
    ):
        super().__init__(lambda p, i: None, partition, offset, rate, limit)
        self._batch_fn = batch_fn
        self._rows = rows

    def read(self, max_items: int) -> list[Any] | None:
        from rayflow._internal.runtime.columns import Columns

        start = self._next
        if self._limit is not None and start >= self._limit:
            return None
        out: list[Any] = []
        wanted = max(max_items, 1)
        read = 0
        while read < wanted:
            stop = (start // self._rows + 1) * self._rows  # the end of this chunk
            if self._limit is not None:
                stop = min(stop, self._limit)
            if stop <= start:
                break
            if self._rate is not None and self._due() < stop:
                break  # a chunk goes whole or not at all
            what = (
                f"Generator batch_fn (partition {self._partition}, offset {start}, "
                f"count {stop - start})"
            )
            chunk = Columns.of(self._batch_fn(self._partition, start, stop - start), what)
            if len(chunk) != stop - start:
                raise ValueError(f"{what} returned {len(chunk)} rows; return exactly count rows")
            out.append(chunk)
            read += stop - start
            start = self._next = stop
        return out


# Connectors (rayflow/_internal/connectors/), re-exported here; they import this module.
from rayflow._internal.connectors.kafka_source import Kafka, KafkaMessage  # noqa: E402

__all__ += ["Kafka", "KafkaMessage"]
