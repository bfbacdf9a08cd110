"""``map_batches``: records to a batch of a format and back, with Ray Data's meanings.

- ``"list"``: the records as a list; ``fn`` returns a list (or any sequence).
- ``"numpy"``: a ``dict`` of column name -> ``numpy.ndarray``. Records that are
  dicts become columns (every record must have the same keys); any other
  record goes into a single column ``"item"``.
- ``"pandas"``: a ``pandas.DataFrame`` with the same columns.
- ``"pyarrow"``: a ``pyarrow.Table`` with the same columns.

The batch ``fn`` returns goes back to records: one dict per row, or the
bare value when its only column is ``"item"``, as Python objects (what a
per-record step downstream expects). A batch is what reaches the step at once
(a source read, a received message: up to ``RuntimeConfig.batch_size``
records); ``fn`` may return more or fewer rows than it got.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rayflow._internal.extras import require_installed

#: The formats map_batches accepts.
BATCH_FORMATS = ("list", "numpy", "pandas", "pyarrow")
#: The column that holds records that are not dicts.
ITEM = "item"


class BatchFormatError(TypeError):
    """The batch a function returned does not fit its format (names the fix)."""


def check_format(step: str, batch_format: Any) -> str:
    """``batch_format`` if known (and its library installed), else a clear error."""
    from rayflow.errors import BuildError

    if batch_format not in BATCH_FORMATS:
        raise BuildError(
            f"step {step!r}: batch_format must be one of "
            f"{', '.join(map(repr, BATCH_FORMATS))}; got {batch_format!r}"
        )
    if batch_format in ("pandas", "pyarrow"):
        require_installed(batch_format, f"step {step!r} (batch_format={batch_format!r})", "batches")
    return str(batch_format)


def _columns(records: list[Any]) -> dict[str, list[Any]]:
    """Records as columns: dict records by key, anything else as the "item" column."""
    first = records[0]
    if type(first) is not dict:
        if any(type(r) is dict for r in records):
            raise BatchFormatError(
                "a batch mixes dict records with other records; make every record a dict "
                "(or none) before a columnar map_batches"
            )
        return {ITEM: records}
    keys = list(first)
    columns: dict[str, list[Any]] = {k: [] for k in keys}
    for r in records:
        if type(r) is not dict or r.keys() != first.keys():
            raise BatchFormatError(
                f"records of one batch must have the same keys for a columnar format: "
                f"{keys} and {list(r) if isinstance(r, dict) else type(r).__name__}; "
                "give them the same fields first (a map before this step)"
            )
        for k in keys:
            columns[k].append(r[k])
    return columns


def to_batch(records: list[Any], batch_format: str) -> Any:
    """The records as a batch of ``batch_format``."""
    if batch_format == "list":
        return records
    columns = _columns(records)
    if batch_format == "numpy":
        import numpy as np

        return {k: np.asarray(v) for k, v in columns.items()}
    if batch_format == "pandas":
        import pandas as pd

        return pd.DataFrame(columns)
    import pyarrow as pa

    return pa.table(columns)


def _rows(columns: Mapping[str, Sequence[Any]], what: str) -> list[Any]:
    """Columns (equal lengths) back to records."""
    names = list(columns)
    lengths = {n: len(columns[n]) for n in names}
    if len(set(lengths.values())) > 1:
        raise BatchFormatError(
            f"the {what} returned has columns of different lengths {lengths}; "
            "return columns of one length"
        )
    if names == [ITEM]:
        return list(columns[ITEM])
    values = [columns[n] for n in names]
    return [dict(zip(names, row, strict=True)) for row in zip(*values, strict=True)]


def from_batch(batch: Any, batch_format: str) -> list[Any]:
    """The records of a batch ``fn`` returned (Python objects)."""
    if batch_format == "list":
        if isinstance(batch, (str, bytes, Mapping)) or not isinstance(batch, Sequence):
            raise BatchFormatError(
                f"with batch_format='list' the function must return a list of records; "
                f"got {type(batch).__name__}"
            )
        return list(batch)
    if batch_format == "numpy":
        import numpy as np

        if not isinstance(batch, Mapping) or not all(
            isinstance(v, np.ndarray) for v in batch.values()
        ):
            raise BatchFormatError(
                "with batch_format='numpy' the function must return a dict of column name "
                f"-> numpy array; got {_describe(batch)}"
            )
        return _rows({k: v.tolist() for k, v in batch.items()}, "dict of arrays")
    if batch_format == "pandas":
        import pandas as pd

        if not isinstance(batch, pd.DataFrame):
            raise BatchFormatError(
                "with batch_format='pandas' the function must return a pandas.DataFrame; "
                f"got {_describe(batch)}"
            )
        return _rows({str(k): batch[k].tolist() for k in batch.columns}, "DataFrame")
    import pyarrow as pa

    if not isinstance(batch, pa.Table):
        raise BatchFormatError(
            "with batch_format='pyarrow' the function must return a pyarrow.Table; "
            f"got {_describe(batch)}"
        )
    return _rows(batch.to_pydict(), "Table")


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        kinds = sorted({type(v).__name__ for v in value.values()})
        return f"a {type(value).__name__} of {', '.join(kinds) or 'nothing'}"
    return type(value).__name__


def batch_function(fn: Callable[[Any], Any], batch_format: str) -> Callable[[list[Any]], list[Any]]:
    """``records -> records`` running ``fn`` on the batch of its format."""

    def run(records: list[Any]) -> list[Any]:
        return from_batch(fn(to_batch(records, batch_format)), batch_format)

    return run
