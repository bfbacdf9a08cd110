"""Columnar chunks: many rows that travel through the runtime as one element.

A :class:`Columns` holds equal-length NumPy arrays by column name. A batch
of the runtime (a Python list) may hold chunks instead of records; a chunk
moves, is pickled (each array as one buffer, no per-row objects), routed and
logged as one element, and only steps that work on columns look inside:
``map_batches`` (columnar formats), ``key_by`` on a column, ``sum`` and
sinks with a ``batch_format``. Every other step gets the rows, made by
:func:`explode` exactly as a per-record stream would carry them: a dict per
row, or the bare value when the only column is ``"item"``; after a key_by on
a column, ``(key, row)`` pairs.

Why whole chunks are the unit: receivers drop re-sent elements by their
index on the channel (exactly-once after a partial recovery), so a chunk
must be the same chunk when it is made again. Chunks are cut only where that
holds: a columnar source cuts at fixed offsets (``rows_per_batch``), and the
steps that work on columns map one chunk to one chunk (a key_by splits one
into one per receiver, in row order).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rayflow._internal.keygroups import stable_hash

if TYPE_CHECKING:
    import numpy as np

# NumPy is imported where chunks are made or cut, not here: every actor
# imports this module, and a job without chunks should not pay for NumPy.

#: The column that holds rows that are not dicts.
ITEM = "item"


class ColumnsError(TypeError):
    """A batch cannot be a chunk of columns (names what is wrong and the fix)."""


class Columns:
    """Rows as equal-length NumPy arrays; ``key`` names the key column after a key_by."""

    __slots__ = ("data", "key", "n")

    def __init__(self, data: dict[str, np.ndarray], key: str | None = None, n: int | None = None):
        self.data = data
        self.key = key
        self.n = len(next(iter(data.values()))) if n is None and data else (n or 0)

    @classmethod
    def of(cls, batch: Any, what: str, key: str | None = None) -> Columns:
        """A chunk of ``batch``: a dict of arrays (or lists), a DataFrame or an Arrow table."""
        data = _as_arrays(batch, what)
        lengths = {name: len(column) for name, column in data.items()}
        if len(set(lengths.values())) > 1:
            raise ColumnsError(
                f"{what} returned columns of different lengths {lengths}; "
                "return columns of one length"
            )
        if not data:
            raise ColumnsError(f"{what} returned no columns; return at least one")
        if key is not None and key not in data:
            raise ColumnsError(
                f"{what} returned no column {key!r} (the key column); columns: {list(data)}"
            )
        return cls(data, key)

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        keyed = f"; key {self.key}" if self.key else ""
        return f"Columns({self.n} rows: {', '.join(self.data)}{keyed})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Columns, (self.data, self.key, self.n))

    def __eq__(self, other: object) -> bool:
        import numpy as np

        return (
            isinstance(other, Columns)
            and self.key == other.key
            and list(self.data) == list(other.data)
            and all(np.array_equal(self.data[c], other.data[c]) for c in self.data)
        )

    __hash__ = None  # type: ignore[assignment]

    def take(self, index: np.ndarray) -> Columns:
        return Columns({c: a[index] for c, a in self.data.items()}, self.key, len(index))

    def rows(self) -> list[Any]:
        """The rows as Python objects, as a per-record stream carries them."""
        names = list(self.data)
        if names == [ITEM]:
            values: list[Any] = self.data[ITEM].tolist()
        else:
            columns = [self.data[c].tolist() for c in names]
            values = [dict(zip(names, row, strict=True)) for row in zip(*columns, strict=True)]
        if self.key is None:
            return values
        return list(zip(self.data[self.key].tolist(), values, strict=True))

    def to_arrow(self) -> Any:
        """The chunk as a ``pyarrow.Table`` of its columns (one named ``item`` alone, a
        chunk of plain values, is named ``value``, as rows of plain values are)."""
        import pyarrow as pa

        if list(self.data) == [ITEM]:
            return pa.table({"value": self.data[ITEM]})
        return pa.table(self.data)

    def to_format(self, batch_format: str) -> Any:
        """The chunk as a batch of ``batch_format`` ("numpy", "pandas", "pyarrow")."""
        if batch_format == "numpy":
            return dict(self.data)
        if batch_format == "pandas":
            import pandas as pd

            return pd.DataFrame(self.data, copy=False)
        import pyarrow as pa

        return pa.table(self.data)


class ColumnKey:
    """The key function of ``key_by(name, "column")``: the record's field ``column``."""

    def __init__(self, column: str):
        self.column = column

    def __call__(self, record: Any) -> Any:
        return record[self.column]

    def __repr__(self) -> str:
        return f"ColumnKey({self.column!r})"


class ColumnSum:
    """The fold of ``sum(name, column)`` (what a ``reduce`` would do, kept for specs)."""

    def __init__(self, column: str | None):
        self.column = column

    def __call__(self, acc: Any, value: Any) -> Any:
        return acc + (value if self.column is None else value[self.column])

    def __repr__(self) -> str:
        return f"ColumnSum({self.column!r})"


def _as_arrays(batch: Any, what: str) -> dict[str, np.ndarray]:
    import numpy as np

    if isinstance(batch, Mapping):
        return {str(k): np.asarray(v) for k, v in batch.items()}
    module = type(batch).__module__
    if module.startswith("pandas"):
        return {str(k): batch[k].to_numpy() for k in batch.columns}
    if module.startswith("pyarrow"):
        return {name: batch.column(name).to_numpy() for name in batch.column_names}
    raise ColumnsError(
        f"{what} must return a dict of column name -> numpy array, a pandas.DataFrame "
        f"or a pyarrow.Table; got {type(batch).__name__}"
    )


def has_columns(items: list[Any]) -> bool:
    """Whether a batch holds chunks (a batch is all chunks or all records; see explode)."""
    return bool(items) and (type(items[0]) is Columns or type(items[-1]) is Columns)


def explode(items: list[Any]) -> list[Any]:
    """The batch with every chunk replaced by its rows (records stay as they are)."""
    out: list[Any] = []
    for x in items:
        if type(x) is Columns:
            out.extend(x.rows())
        else:
            out.append(x)
    return out


def count_rows(items: list[Any]) -> int:
    """Rows in a batch: a chunk counts its rows, a record one."""
    return sum(x.n if type(x) is Columns else 1 for x in items)


def rows_in(items: list[Any]) -> int:
    """Records in a batch, a chunk counted by its rows (one check per batch of records)."""
    return count_rows(items) if has_columns(items) else len(items)


def exploding(feed: Any) -> Any:
    """``feed`` for a step that takes records: chunks reach it as their rows."""

    def take(items: list[Any]) -> None:
        feed(explode(items) if has_columns(items) else items)

    return take


# -- hashing columns like keys ---------------------------------------------------------


def _mix(z: np.ndarray) -> np.ndarray:
    """keygroups._mix over a uint64 array (wrapping arithmetic, as the masked ints)."""
    import numpy as np

    m1, m2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * m1
        z = (z ^ (z >> np.uint64(27))) * m2
    return z ^ (z >> np.uint64(31))


def hash_column(values: np.ndarray) -> np.ndarray:
    """``stable_hash`` of every value, as uint64: equal to the per-record hash.

    Integers (and bools) hash in NumPy; other values (strings, non-integer
    floats) once per distinct value in Python.
    """
    import numpy as np

    kind = values.dtype.kind
    if kind in "iub":
        return _mix(values.astype(np.int64, copy=False).view(np.uint64))
    if kind == "f" and _integral(values):
        return _mix(values.astype(np.int64).view(np.uint64))
    try:
        distinct, inverse = np.unique(values, return_inverse=True)
    except TypeError:  # values that do not order (mixed types): one by one, remembered
        seen: dict[Any, int] = {}
        out = [seen.get(v) or seen.setdefault(v, stable_hash(v)) for v in values.tolist()]
        return np.array(out, dtype=np.uint64)
    hashes = np.fromiter((stable_hash(v) for v in distinct.tolist()), np.uint64, len(distinct))
    return hashes[inverse.reshape(-1)]


def _integral(values: np.ndarray) -> bool:
    """Floats that are all whole numbers in int64's range (they hash as ints)."""
    import numpy as np

    with np.errstate(invalid="ignore"):
        return bool(np.all((values == np.floor(values)) & (np.abs(values) < 2.0**63)))


def partitions_of(values: np.ndarray, max_parallelism: int, parallelism: int) -> np.ndarray:
    """The partition of every key, as ``KeyRouter.partition`` finds it per record."""
    import numpy as np

    hashes = hash_column(values)
    if max_parallelism & (max_parallelism - 1) == 0:  # a power of two: masks and shifts
        groups = (hashes & np.uint64(max_parallelism - 1)).astype(np.int64)
        return (groups * parallelism) >> (max_parallelism.bit_length() - 1)
    groups = (hashes % np.uint64(max_parallelism)).astype(np.int64)
    return groups * parallelism // max_parallelism


def split(chunk: Columns, parts: np.ndarray, parallelism: int) -> list[tuple[int, Columns]]:
    """The chunk's rows per receiving partition, in row order within each."""
    import numpy as np

    counts = np.bincount(parts, minlength=parallelism)
    if int(np.count_nonzero(counts)) == 1:
        return [(int(parts[0]), chunk)]
    out: list[tuple[int, Columns]] = []
    if parallelism <= 8:  # a pass per receiver beats a sort over the rows
        for p in range(parallelism):
            if counts[p]:
                out.append((p, chunk.take(np.flatnonzero(parts == p))))
        return out
    # A stable sort of small ints is a radix sort (linear).
    ranks = parts.astype(np.uint16) if parallelism <= 1 << 16 else parts
    order = np.argsort(ranks, kind="stable")
    start = 0
    for p in range(parallelism):
        n = int(counts[p])
        if n:
            out.append((p, chunk.take(order[start : start + n])))
            start += n
    return out


def _grouping(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, starts, sorted keys): a stable sort that groups equal keys (the rows of a
    key in their order), where each key's run starts in it, and the keys so sorted.

    Integer keys within a span of 65,536 sort as uint16, where NumPy's stable
    sort is a radix sort (linear); others by a merge sort.
    """
    import numpy as np

    sortable = keys
    if keys.dtype.kind in "iu":
        lo, hi = int(keys.min()), int(keys.max())
        if hi - lo < 1 << 16:
            sortable = (keys - lo).astype(np.uint16)
    order = np.argsort(sortable, kind="stable")
    ranked = sortable[order]
    starts = np.flatnonzero(np.concatenate(([True], ranked[1:] != ranked[:-1])))
    return order, starts, keys[order[starts]]


def running_sum(
    chunk: Columns, column: str, state: dict[Any, Any], changed: set[Any] | None
) -> Columns:
    """``chunk`` with ``column`` replaced by each key's running sum, row after row.

    ``state`` holds each key's sum before the chunk (updated here); keys are
    Python values (``tolist``), as a per-record step keeps them, so snapshots
    and rescaling treat them alike. Sums of floats are formed per chunk with
    one cumulative sum over the rows grouped by key, so their last bits may
    differ from adding row by row (integers are exact).
    """
    import numpy as np

    assert chunk.key is not None
    values = chunk.data[column]
    n = len(values)
    if n == 0:
        return chunk
    order, starts, distinct_keys = _grouping(chunk.data[chunk.key])
    distinct = distinct_keys.tolist()
    base = np.asarray(list(map(state.get, distinct, itertools.repeat(0))))
    ranked = values[order]
    final = base + np.add.reduceat(ranked, starts)
    # One cumulative sum over the grouped rows: each run begins at its key's sum
    # so far instead of where the previous run ended.
    steps = ranked.astype(np.result_type(ranked, final), copy=True)
    steps[starts] += base
    steps[starts[1:]] -= final[:-1]
    sums = np.empty_like(steps)
    sums[order] = np.cumsum(steps)
    state.update(zip(distinct, final.tolist(), strict=True))
    if changed is not None:
        changed.update(distinct)
    data = dict(chunk.data)
    data[column] = sums
    return Columns(data, chunk.key, n)
