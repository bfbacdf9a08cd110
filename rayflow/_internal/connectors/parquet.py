"""``rf.sinks.Parquet``: Parquet files in a local folder or under ``s3://bucket/prefix``.

Two-phase commit, as :class:`rayflow.sinks.JsonLines`:

- ``write`` turns records into Arrow columns (checking them against the
  schema at once; chunks of columns come as Arrow tables already) and
  appends them to an in-progress Parquet file on local disk
  (``<folder>/.staging/`` for a folder, the temp folder or
  ``RAYFLOW_SPILL_DIR`` for S3), a file of at most ``rows_per_file`` rows;
  a full one is closed and the next begun. Memory holds at most a row group.
- ``prepare_commit(n)`` closes the in-progress file and stages the files of
  checkpoint *n* under their final names, invisible to readers: renamed to
  ``<folder>/.staging/part-PPPPP-<n>-<run>-<i>.parquet`` (a hidden folder,
  which pyarrow's dataset discovery skips), or uploaded as S3 multipart
  uploads of ``<prefix>/part-PPPPP-<n>-<run>-<i>.parquet`` left open.
- ``commit`` publishes them: a rename into ``<folder>``, or completing the
  uploads (the objects appear whole, at once). The names are the same on
  every attempt and carry the run, so a commit re-issued after a restart is
  a no-op once the file is there (rule R7: per run and per checkpoint).

A partition's files sort in commit order by name (checkpoint id, then the
file's index). The claim (``.rayflow-sink.json``), the S3 client and its
error classification are those of ``JsonLines`` and ``S3JsonLines``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import tempfile
import uuid
from collections.abc import Mapping
from typing import Any

from rayflow._internal.extras import missing_extra, require_installed
from rayflow.errors import ConfigError
from rayflow.sinks import (
    OWNER_FILE,
    S3JsonLines,
    Sink,
    SinkContext,
    SinkWriter,
    TransientSinkError,
    _claim_folder,
    _part_prefix,
)

__all__ = ["Parquet"]

#: Rows of a row group: buffered in memory (as Arrow) before they go to the file.
ROW_GROUP_ROWS = 65_536
ROW_GROUP_BYTES = 32 << 20
#: Without ``schema=``, the schema is inferred from at least this many first records
#: (or all a partition has at its first checkpoint).
INFER_ROWS = 1_000
#: S3 multipart upload part size (S3's minimum is 5 MiB, but for the last part).
PART_BYTES = 8 << 20

STAGING = ".staging"
SUFFIX = ".parquet"


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as exc:
        raise missing_extra("pyarrow", "rf.sinks.Parquet", "parquet") from exc
    return pyarrow


class Parquet(Sink):
    """Parquet files in a local folder or under ``s3://bucket/prefix``, exactly-once.

    Each partition writes files ``part-<partition>-<checkpoint>-<run>-<i>.parquet``
    of at most ``rows_per_file`` rows; they appear (a rename, or a completed S3
    multipart upload) only when their checkpoint commits, or, without
    checkpointing, when the input ends. A partition's files sort by name in
    the order they were committed.

    Records become rows: a dict's keys are the columns (strings); a named
    tuple's or a dataclass's fields are; any other tuple or list gives columns
    ``f0``, ``f1``, ... (so a keyed step's ``(key, value)`` is ``f0``, ``f1``);
    anything else is one column ``value``. Values are whatever pyarrow
    converts (numbers, str, bytes, bool, None, datetimes, lists, dicts as
    structs). A field may be None or left out (null). Without ``schema``
    (a ``pyarrow.Schema``, or what ``pyarrow.schema`` takes), each partition
    infers its schema from its first records and keeps it; a record that does
    not fit (another type, a field the schema lacks) fails the job with the
    step, the record and the fix. Ints go into float columns; nothing is ever
    converted with loss. Committed files are never touched by a failure.
    Each partition infers its own schema, and a restarted one infers it again:
    for one schema in every file, pass ``schema``.

    Chunks of columns (``rf.sources.Generator(batch_fn=...)`` and the steps
    that keep them columnar) are written as Arrow tables of their columns,
    with no row becoming a Python object: a keyed chunk's columns include
    its key column. The first chunk fixes the schema (or ``schema`` does;
    columns are cast to it exactly, as records are).

    Local: files in ``uri`` (a folder), staged in its hidden ``.staging/``.
    S3: credentials and ``AWS_ENDPOINT_URL`` as for checkpoint storage
    (``pip install 'rayflow[s3]'``). The place belongs to one sink of one job
    (``.rayflow-sink.json``); a fresh (not resumed) run of that job deletes
    the part files an earlier run left.
    """

    #: Records arrive as records, chunks of columns as ``pyarrow.Table`` (operators.py).
    _arrow_chunks = True

    def __init__(
        self,
        uri: str | os.PathLike[str],
        *,
        rows_per_file: int = 1_000_000,
        schema: Any = None,
    ):
        # Here, not in the operators: a missing extra is a mistake to name at once.
        require_installed("pyarrow", "rf.sinks.Parquet", "parquet")
        if isinstance(rows_per_file, bool) or not isinstance(rows_per_file, int):
            raise ConfigError(f"Parquet rows_per_file must be an int; got {rows_per_file!r}")
        if rows_per_file < 1:
            raise ConfigError(f"Parquet rows_per_file must be at least 1; got {rows_per_file}")
        self.rows_per_file = rows_per_file
        self.schema: Any = None
        if schema is not None:
            pa = _pyarrow()
            try:
                self.schema = schema if isinstance(schema, pa.Schema) else pa.schema(schema)
            except (TypeError, ValueError, pa.ArrowException) as exc:
                raise ConfigError(
                    f"Parquet schema must be a pyarrow.Schema (or what pyarrow.schema takes, "
                    f"e.g. [('user', pa.string()), ('n', pa.int64())]); got {schema!r}: {exc}"
                ) from None
        if not isinstance(uri, (str, os.PathLike)) or not os.fspath(uri):
            raise ConfigError(f"Parquet needs an output folder or s3://bucket/prefix; got {uri!r}")
        text = os.fspath(uri)
        # The S3 side is S3JsonLines' own: its bucket/prefix, key naming and claim.
        self._s3: S3JsonLines | None = None
        if text.startswith("s3://"):
            if not text[5:].strip("/"):
                raise ConfigError(f"Parquet needs s3://bucket/prefix; got {text!r}")
            require_installed("boto3", "rf.sinks.Parquet with an s3:// URI", "s3")
            self._s3 = S3JsonLines(text)
            self.uri = self._s3.uri
        elif "://" in text:
            raise ConfigError(
                f"Parquet writes to a local folder or s3://bucket/prefix; got {text!r}"
            )
        else:
            self.uri = os.path.abspath(text)

    def location(self) -> str:
        return self.uri

    def setup(
        self,
        job: str,
        *,
        step: str = "",
        run_id: str = "",
        restored_checkpoint: int | None,
        partition: int | None = None,
    ) -> None:
        if partition is not None:  # one partition restarted alone: only its staged files
            restored_checkpoint = restored_checkpoint or 0
        if self._s3 is None:
            self._setup_folder(job, step, restored_checkpoint, partition)
            return
        from rayflow._internal.storage.s3 import is_transient, s3_client

        try:
            self._setup_s3(s3_client(), job, step, restored_checkpoint, partition)
        except Exception as exc:
            if is_transient(exc):
                raise TransientSinkError(f"Parquet {self.uri} unreachable: {exc}") from exc
            raise

    def _setup_folder(
        self, job: str, step: str, restored_checkpoint: int | None, partition: int | None = None
    ) -> None:
        folder = self.uri
        os.makedirs(folder, exist_ok=True)
        if not os.path.exists(os.path.join(folder, OWNER_FILE)):
            foreign = sorted(glob.glob(os.path.join(folder, f"part-*{SUFFIX}")))
            if foreign:
                raise ConfigError(
                    f"sink {step!r} of job {job!r}: {folder} already holds part files that no "
                    f"rayflow sink claimed (e.g. {os.path.basename(foreign[0])}); a sink writes "
                    "only into a folder of its own. Use another folder, or delete those files."
                )
        _claim_folder(folder, job, step)
        os.makedirs(os.path.join(folder, STAGING), exist_ok=True)
        if restored_checkpoint is None:
            for pattern in (f"part-*{SUFFIX}", os.path.join(STAGING, "*")):
                for path in glob.glob(os.path.join(folder, pattern)):
                    os.remove(path)
            return
        mine = _part_prefix(partition) + "*"
        for path in glob.glob(os.path.join(folder, STAGING, mine)):
            staged = _checkpoint_of(os.path.basename(path))
            if staged is None or staged > restored_checkpoint:
                os.remove(path)  # in progress, or staged for a checkpoint that never committed

    def _setup_s3(
        self,
        client: Any,
        job: str,
        step: str,
        restored_checkpoint: int | None,
        partition: int | None = None,
    ) -> None:
        from rayflow._internal.storage.s3 import clean_sink_prefix

        s3 = self._s3
        assert s3 is not None
        s3._claim(client, job, step)

        def abort(key: str) -> bool:
            if not key.endswith(SUFFIX):
                return False  # not a Parquet sink's
            staged = _checkpoint_of(key.rsplit("/", 1)[-1])
            return restored_checkpoint is None or staged is None or staged > restored_checkpoint

        clean_sink_prefix(
            client,
            s3.bucket,
            s3._key(_part_prefix(partition)),
            abort=abort,
            delete_all=restored_checkpoint is None,
        )

    def open(self, ctx: SinkContext) -> SinkWriter:
        return _ParquetWriter(self, ctx)

    def __repr__(self) -> str:
        return f"Parquet({self.uri!r}, rows_per_file={self.rows_per_file})"


def _name(partition: int, checkpoint: int, run: str, index: int) -> str:
    return f"part-{partition:05d}-{checkpoint:010d}-{run or 'r'}-{index:05d}{SUFFIX}"


def _checkpoint_of(name: str) -> int | None:
    """The checkpoint id of ``part-PPPPP-<checkpoint>-<run>-<i>.parquet``; None if not one."""
    if not name.endswith(SUFFIX):
        return None
    fields = name[: -len(SUFFIX)].split("-")
    if len(fields) == 5 and fields[0] == "part" and fields[2].isdigit():
        return int(fields[2])
    return None


# -- records to columns -------------------------------------------------------------


class _Unfit(Exception):
    """A record does not fit: the message says which, why and what to do."""


def _columns(items: list[Any]) -> tuple[dict[str, list[Any]], list[Any]]:
    """Column name -> values, and each row's record (for errors), in order."""
    first = items[0]
    if type(first) is tuple and all(type(r) is tuple and len(r) == len(first) for r in items):
        # The common (key, value) of keyed steps, without a dict per record.
        return {f"f{i}": list(col) for i, col in enumerate(zip(*items, strict=True))}, items
    rows = [_row(r) for r in items]
    names: dict[str, None] = dict.fromkeys(rows[0])
    keys = rows[0].keys()
    for row in rows:
        if row.keys() != keys:
            names.update(dict.fromkeys(row))
    for name in names:
        if not isinstance(name, str):
            at = next(i for i, r in enumerate(rows) if name in r)
            raise _Unfit(
                f"the record {_short(items[at])} has the key {name!r} "
                f"({type(name).__name__}); Parquet column names are strings. Fix: convert "
                "the records with a map step before the sink (e.g. {str(k): v ...})"
            )
    get = dict.get
    return {name: [get(r, name) for r in rows] for name in names}, items


def _row(record: Any) -> dict[Any, Any]:
    if type(record) is dict:
        return record
    if isinstance(record, Mapping):
        return dict(record)
    if isinstance(record, tuple) and hasattr(record, "_fields"):  # a named tuple
        return dict(zip(record._fields, record, strict=True))
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
    if isinstance(record, (tuple, list)):
        return {f"f{i}": v for i, v in enumerate(record)}
    return {"value": record}


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _infer(pa: Any, name: str, values: list[Any], records: list[Any]) -> Any:
    """The Arrow array pyarrow infers for one column; a value it cannot take is named."""
    errors = (pa.ArrowException, TypeError, ValueError, OverflowError)
    try:
        return pa.array(values)
    except errors as exc:
        first = next((v for v in values if v is not None), None)
        for value, record in zip(values, records, strict=True):
            if value is None:
                continue
            given = f"gives field {name!r} the value {_short(value, 80)} ({type(value).__name__})"
            try:
                pa.array([value])
            except errors as one:
                raise _Unfit(
                    f"the record {_short(record)} {given}, which Parquet cannot store ({one}). "
                    "Fix: convert the records with a map step before the sink (to numbers, "
                    "str, bytes, bool, datetimes, lists or dicts of those)"
                ) from None
            try:
                pa.array([first, value])
            except errors:
                raise _Unfit(
                    f"the record {_short(record)} {given}, while other records give it "
                    f"{_short(first, 80)} ({type(first).__name__}); a Parquet column has one "
                    "type. Fix: convert the records with a map step before the sink, so that "
                    f"{name!r} has one type (None is fine)"
                ) from None
        raise _Unfit(
            f"field {name!r} has values pyarrow cannot store together ({exc}), e.g. in the "
            f"record {_short(records[0])}. Fix: convert the records with a map step before "
            "the sink"
        ) from None


def _castable(pa: Any, src: Any, dst: Any) -> bool:
    """Whether values of Arrow type ``src`` may go into a ``dst`` column (checked exactly)."""
    t = pa.types
    if src == dst or t.is_null(src):
        return True

    def numeric(x: Any) -> bool:
        return bool(t.is_integer(x) or t.is_floating(x) or t.is_decimal(x))

    def text(x: Any) -> bool:
        return bool(t.is_string(x) or t.is_large_string(x))

    def binary(x: Any) -> bool:
        return bool(t.is_binary(x) or t.is_large_binary(x) or t.is_fixed_size_binary(x))

    def listish(x: Any) -> bool:
        return bool(t.is_list(x) or t.is_large_list(x) or t.is_fixed_size_list(x))

    for family in (numeric, text, binary, t.is_temporal):
        if family(src) and family(dst):
            return True
    if listish(src) and listish(dst):
        return _castable(pa, src.value_type, dst.value_type)
    if t.is_struct(src) and t.is_struct(dst):
        names = {dst.field(i).name: dst.field(i).type for i in range(dst.num_fields)}
        return all(
            src.field(i).name in names
            and _castable(pa, src.field(i).type, names[src.field(i).name])
            for i in range(src.num_fields)
        )
    if t.is_map(src) and t.is_map(dst):
        return _castable(pa, src.key_type, dst.key_type) and _castable(
            pa, src.item_type, dst.item_type
        )
    return False


class _Converter:
    """Records -> Arrow tables of one schema (given, or inferred from the first records)."""

    def __init__(self, step: str, partition: int, schema: Any):
        self._pa = _pyarrow()
        self.step, self.partition = step, partition
        self.schema = schema
        self.given = schema is not None
        self.inferred_from = 0  # records the schema was inferred from

    def _unfit(self, message: str, inferring: int = 0) -> ValueError:
        if inferring:
            about = f"While inferring the partition's schema from its first {inferring} records"
        else:
            fields = ", ".join(f"{f.name}: {f.type}" for f in self.schema)
            origin = (
                "from schema="
                if self.given
                else f"inferred from the first {self.inferred_from} records it wrote"
            )
            about = f"The partition's schema, {origin}, is {fields}"
        return ValueError(
            f"Parquet sink {self.step!r} (partition {self.partition}): {message}. ({about}.)"
        )

    def infer(self, items: list[Any]) -> Any:
        """Fix the schema from ``items`` and return them as a table."""
        pa = self._pa
        try:
            columns, records = _columns(items)
            arrays = {name: _infer(pa, name, values, records) for name, values in columns.items()}
        except _Unfit as exc:
            raise self._unfit(str(exc), inferring=len(items)) from None
        self.schema = pa.schema([(name, array.type) for name, array in arrays.items()])
        self.inferred_from = len(items)
        return pa.Table.from_arrays(list(arrays.values()), schema=self.schema)

    def convert(self, items: list[Any]) -> Any:
        """``items`` as a table of the schema; a record that does not fit raises ValueError."""
        pa = self._pa
        schema = self.schema
        try:
            columns, records = _columns(items)
            extra = [name for name in columns if schema.get_field_index(name) < 0]
            if extra:
                values = columns[extra[0]]
                at = next((i for i, v in enumerate(values) if v is not None), 0)
                raise _Unfit(
                    f"the record {_short(records[at])} has the field {extra[0]!r}, which the "
                    "schema of its Parquet files does not have. Fix: "
                    + (
                        "add the field to schema="
                        if self.given
                        else "pass schema= to rf.sinks.Parquet with every field (a field may "
                        "be None or left out of a record, but the first records fix the "
                        "fields otherwise), or drop the field with a map step before the sink"
                    )
                )
            arrays = []
            for field in schema:
                if field.name not in columns:
                    arrays.append(pa.nulls(len(items), field.type))
                    continue
                values = columns[field.name]
                array = _infer(pa, field.name, values, records)
                if array.type != field.type:
                    array = self._cast(field, array, values, records)
                if not field.nullable and array.null_count:
                    at = next(i for i, v in enumerate(values) if v is None)
                    raise _Unfit(
                        f"the record {_short(records[at])} gives the non-nullable field "
                        f"{field.name!r} no value. Fix: give every record a value for it, or "
                        "make the field nullable in schema="
                    )
                arrays.append(array)
        except _Unfit as exc:
            raise self._unfit(str(exc)) from None
        return pa.Table.from_arrays(arrays, schema=schema)

    def fit(self, table: Any) -> Any:
        """A chunk's table as a table of the schema (fixing it from the first chunk when
        none is known yet); a column that does not fit raises ValueError."""
        pa = self._pa
        if self.schema is None:
            self.schema = table.schema
            self.inferred_from = table.num_rows
            return table
        schema = self.schema
        extra = [name for name in table.column_names if schema.get_field_index(name) < 0]
        if extra:
            raise self._unfit(
                f"a chunk of columns has the column {extra[0]!r}, which the schema of its "
                "Parquet files does not have. Fix: "
                + ("add it to schema=" if self.given else "drop it in the map_batches step")
            )
        arrays = []
        for field in schema:
            if field.name not in table.column_names:
                if not field.nullable:
                    raise self._unfit(
                        f"a chunk of columns has no column {field.name!r}, which is not "
                        "nullable. Fix: add the column, or make the field nullable in schema="
                    )
                arrays.append(pa.nulls(table.num_rows, field.type))
                continue
            column = table.column(field.name)
            if column.type != field.type:
                column = self._cast_column(field, column)
            if not field.nullable and column.null_count:
                raise self._unfit(
                    f"a chunk of columns has nulls in the non-nullable column {field.name!r}. "
                    "Fix: give every row a value, or make the field nullable in schema="
                )
            arrays.append(column)
        return pa.Table.from_arrays(arrays, schema=schema)

    def _cast_column(self, field: Any, column: Any) -> Any:
        pa = self._pa
        if _castable(pa, column.type, field.type):
            try:
                return column.cast(field.type, safe=True)
            except (pa.ArrowException, TypeError, ValueError) as exc:
                reason = f"a value does not fit exactly ({exc})"
        else:
            reason = "the types do not convert"
        raise self._unfit(
            f"a chunk of columns has the column {field.name!r} of type {column.type}, which "
            f"does not go into its {field.type} column: {reason}. Fix: convert it in the "
            "map_batches step before the sink" + (", or change schema=" if self.given else "")
        )

    def _cast(self, field: Any, array: Any, values: list[Any], records: list[Any]) -> Any:
        pa = self._pa
        if _castable(pa, array.type, field.type):
            try:
                return array.cast(field.type, safe=True)
            except (pa.ArrowException, TypeError, ValueError):
                pass  # a value that does not fit exactly: named below
        at = 0  # the first value that does not fit (else the first: cannot happen)
        for i, value in enumerate(values):
            if value is None:
                continue
            try:
                single = pa.array([value])
                if single.type != field.type:
                    if not _castable(pa, single.type, field.type):
                        raise TypeError
                    single.cast(field.type, safe=True)
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                at = i
                break
        value, record = values[at], records[at]
        if pa.types.is_null(field.type):
            fix = (
                f"{field.name!r} was None in every record the schema was inferred from, so its "
                "type is unknown (null). Fix: pass "
                f"schema= to rf.sinks.Parquet with the field's type (e.g. "
                f"schema=[({field.name!r}, {_arrow_name(pa, value)}), ...])"
            )
        else:
            fix = (
                f"the column's type is {field.type}, which cannot hold it unchanged. Fix: convert "
                f"the records with a map step before the sink so that every {field.name!r} fits "
                f"{field.type} exactly (or is None)"
                + (
                    ""
                    if self.given
                    else ", or pass schema= to rf.sinks.Parquet with the type you want"
                )
            )
        raise _Unfit(
            f"the record {_short(record)} gives field {field.name!r} the value "
            f"{_short(value, 80)} ({type(value).__name__}), which does not fit its Parquet "
            f"column; {fix}"
        )


def _arrow_name(pa: Any, value: Any) -> str:
    """How ``pa.<name>`` spells the type pyarrow infers for ``value`` (for the fix)."""
    try:
        kind = pa.array([value]).type
    except Exception:
        return "string()"
    simple = {"double": "float64", "float": "float32", "halffloat": "float16", "bool": "bool_"}
    text = str(kind)
    if "[" in text or "<" in text or "(" in text:
        return f"<the pyarrow type {text}>"
    return f"pa.{simple.get(text, text)}()"


# -- the writer -----------------------------------------------------------------------


class _ParquetWriter(SinkWriter):
    def __init__(self, sink: Parquet, ctx: SinkContext):
        self._sink = sink
        self._ctx = ctx
        self._convert = _Converter(ctx.step, ctx.partition, sink.schema)
        self._pa = self._convert._pa
        self._pending: list[Any] = []  # records before the schema is known (no schema=)
        self._tables: list[Any] = []  # converted, not in a file yet
        self._buffered = 0  # rows in _tables
        self._buffered_bytes = 0
        self._file: Any = None  # the in-progress pyarrow.parquet.ParquetWriter
        self._file_path = ""
        self._file_rows = 0
        self._done: list[str] = []  # closed files, not staged yet
        if sink._s3 is None:
            self._dir = os.path.join(sink.uri, STAGING)
            os.makedirs(self._dir, exist_ok=True)
            self._client: Any = None
        else:
            from rayflow._internal.storage.s3 import FailFastGate, s3_client

            self._dir = os.environ.get("RAYFLOW_SPILL_DIR") or tempfile.gettempdir()
            # Few retries per call: the checkpoints retry, and a call in prepare_commit
            # holds up this partition's records while it waits.
            self._client = s3_client(attempts=2)
            self._gate = FailFastGate(f"Parquet sink {ctx.step!r}: {sink.uri}")
            self._orphans: list[tuple[str, str]] = []  # uploads to abort (key, upload id)
            # Keys whose create may have reached S3 with its answer lost (it failed, or
            # succeeded only on a retry), with the upload id in use (None: none yet):
            # every other upload under such a key is an orphan (storage/s3.py create_upload).
            self._suspects: dict[str, str | None] = {}

    @property
    def spilled_bytes(self) -> int | None:
        """S3: bytes of written records on local disk, not uploaded yet."""
        if self._sink._s3 is None:
            return None
        total = 0
        for path in [*self._done, self._file_path] if self._file else self._done:
            with contextlib.suppress(OSError):
                total += os.path.getsize(path)
        return total

    # -- records ---------------------------------------------------------------------

    def write(self, items: list[Any]) -> None:
        if not items:
            return
        if isinstance(items[0], self._pa.Table):  # chunks of columns: no row is a record
            if self._pending:  # (a stream is all chunks or all records; to be safe)
                self._add(self._convert.infer(self._pending))
                self._pending = []
            for table in items:
                self._add(self._convert.fit(table))
            return
        if self._convert.schema is None:
            self._pending.extend(items)
            if len(self._pending) < INFER_ROWS:
                return
            items, self._pending = self._pending, []
            table = self._convert.infer(items)
        else:
            table = self._convert.convert(items)
        self._add(table)

    def _add(self, table: Any) -> None:
        """Buffer a table of the schema; a full row group goes to the file."""
        self._tables.append(table)
        self._buffered += table.num_rows
        self._buffered_bytes += table.nbytes
        if self._buffered >= ROW_GROUP_ROWS or self._buffered_bytes >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        """Write the buffered rows into files of at most rows_per_file rows."""
        if not self._tables:
            return
        pa = self._pa
        table = pa.concat_tables(self._tables) if len(self._tables) > 1 else self._tables[0]
        self._tables, self._buffered, self._buffered_bytes = [], 0, 0
        limit = self._sink.rows_per_file
        at = 0
        while at < table.num_rows:
            if self._file is None:
                self._open_file()
            take = min(limit - self._file_rows, table.num_rows - at)
            self._file.write_table(table.slice(at, take))
            self._file_rows += take
            at += take
            if self._file_rows >= limit:
                self._close_file()

    def _open_file(self) -> None:
        import pyarrow.parquet as pq

        name = f"part-{self._ctx.partition:05d}-{uuid.uuid4().hex}.inprogress"
        self._file_path = os.path.join(self._dir, name)
        self._file = pq.ParquetWriter(self._file_path, self._convert.schema)
        self._file_rows = 0

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._done.append(self._file_path)
            self._file_path = ""

    # -- two-phase commit ------------------------------------------------------------

    def prepare_commit(self, checkpoint_id: int) -> Any:
        if self._pending:  # fewer records than INFER_ROWS so far: the schema is theirs
            items, self._pending = self._pending, []
            self._tables.append(self._convert.infer(items))
        self._flush()
        self._close_file()
        if not self._done:
            return None
        run = self._ctx.run_id
        names = [_name(self._ctx.partition, checkpoint_id, run, i) for i in range(len(self._done))]
        committable: dict[str, Any] = {
            "partition": self._ctx.partition,
            "checkpoint": checkpoint_id,
            "run": run,
        }
        if self._sink._s3 is None:
            for path, name in zip(self._done, names, strict=True):
                _fsync(path)
                os.replace(path, os.path.join(self._dir, name))
            _fsync(self._dir)
            committable.update(folder=self._sink.uri, files=names)
        else:
            # S3 down: TransientSinkError declines the checkpoint; the files stay for the next.
            uploads = self._upload(names)
            for path in self._done:
                with contextlib.suppress(OSError):
                    os.remove(path)
            committable.update(bucket=self._sink._s3.bucket, uploads=uploads)
        self._done = []
        return committable

    def _upload(self, names: list[str]) -> list[dict[str, Any]]:
        """Each closed file as an S3 multipart upload, left open (invisible) until commit."""
        from rayflow._internal.storage.s3 import create_upload

        s3 = self._sink._s3
        assert s3 is not None
        self._abort_orphans()
        uploads: list[dict[str, Any]] = []
        try:
            for path, name in zip(self._done, names, strict=True):
                key = s3._key(name)
                upload_id = create_upload(self._gate, self._client, s3.bucket, key, self._suspects)
                upload: dict[str, Any] = {"key": key, "upload_id": upload_id, "parts": []}
                uploads.append(upload)
                with open(path, "rb") as f:
                    while True:
                        body = f.read(PART_BYTES)
                        if not body and upload["parts"]:
                            break
                        number = len(upload["parts"]) + 1
                        response = self._gate.call(
                            self._client.upload_part,
                            Bucket=s3.bucket,
                            Key=key,
                            UploadId=upload["upload_id"],
                            PartNumber=number,
                            Body=body,
                        )
                        upload["parts"].append({"PartNumber": number, "ETag": response["ETag"]})
                        if len(body) < PART_BYTES:
                            break
        except BaseException:
            # Never to be completed: abort (now, or at the next try if S3 is down).
            self._orphans.extend((u["key"], u["upload_id"]) for u in uploads)
            with contextlib.suppress(Exception):
                self._abort_orphans()
            raise
        return uploads

    def _abort_orphans(self) -> None:
        s3 = self._sink._s3
        assert s3 is not None
        if self._suspects:
            from rayflow._internal.storage.s3 import abort_stray_uploads

            abort_stray_uploads(self._client, s3.bucket, self._suspects)
        while self._orphans:
            key, upload_id = self._orphans[0]
            with contextlib.suppress(TransientSinkError):
                self._gate.call(
                    self._client.abort_multipart_upload,
                    Bucket=s3.bucket,
                    Key=key,
                    UploadId=upload_id,
                )
                self._orphans.pop(0)
                continue
            return  # unreachable now: later

    def commit(self, committable: Any) -> None:
        if committable is None:
            return
        if "files" in committable:
            self._commit_files(committable)
        else:
            self._commit_uploads(committable)

    def _commit_files(self, committable: dict[str, Any]) -> None:
        folder = committable["folder"]
        for name in committable["files"]:
            final = os.path.join(folder, name)
            try:
                os.replace(os.path.join(folder, STAGING, name), final)
            except FileNotFoundError:
                if not os.path.exists(final):  # else: committed before (a re-issued commit)
                    raise FileNotFoundError(
                        f"staged output {os.path.join(folder, STAGING, name)} of checkpoint "
                        f"{committable['checkpoint']} (run {committable['run']}) is gone and "
                        "was never committed; it cannot be published"
                    ) from None
        _fsync(folder)

    def _commit_uploads(self, committable: dict[str, Any]) -> None:
        from botocore.exceptions import ClientError

        bucket = committable["bucket"]
        client = self._client
        for upload in committable["uploads"]:
            try:
                self._gate.call(
                    client.complete_multipart_upload,
                    Bucket=bucket,
                    Key=upload["key"],
                    UploadId=upload["upload_id"],
                    MultipartUpload={"Parts": upload["parts"]},
                )
            except ClientError as exc:
                # Completed before (a re-issued commit): then the object exists.
                try:
                    self._gate.call(client.head_object, Bucket=bucket, Key=upload["key"])
                except ClientError:
                    raise exc from None
        if self._suspects:
            from rayflow._internal.storage.s3 import abort_stray_uploads

            abort_stray_uploads(client, bucket, self._suspects)

    def abort(self, committable: Any) -> None:
        if committable is None:
            return
        if "files" in committable:
            for name in committable["files"]:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(committable["folder"], STAGING, name))
        elif self._client is not None:
            for upload in committable["uploads"]:
                with contextlib.suppress(Exception):
                    self._client.abort_multipart_upload(
                        Bucket=committable["bucket"],
                        Key=upload["key"],
                        UploadId=upload["upload_id"],
                    )

    def close(self) -> None:
        """Drop what was not staged (it is replayed after a restart); staged data stays."""
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._file.close()
            self._file = None
            self._done.append(self._file_path)
        for path in self._done:
            with contextlib.suppress(OSError):
                os.remove(path)
        self._done, self._tables, self._pending = [], [], []
        if self._client is not None and (self._orphans or self._suspects):
            with contextlib.suppress(Exception):
                self._abort_orphans()


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
