"""Sinks: where a dataflow's records leave it.

A :class:`Sink` opens one :class:`SinkWriter` per partition. Writers take
part in checkpoints with two-phase commit: ``prepare_commit`` stages what was
written since the last checkpoint and returns a small *committable* that
describes it; ``commit`` publishes a committable and must be idempotent,
because after a failure it is issued again for the last checkpoint. Without
checkpointing, a sink commits once, when its input ends.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import IO, Any

from rayflow._internal.extras import require_installed
from rayflow.errors import ConfigError, RayflowError

__all__ = [
    "JsonLines",
    "Print",
    "S3JsonLines",
    "Sink",
    "SinkContext",
    "SinkWriter",
    "TransientSinkError",
]


class TransientSinkError(RayflowError):
    """The sink's destination cannot be reached right now (an outage, throttling).

    Raised by ``prepare_commit``, the checkpoint is declined and the data stays
    with the writer for the next one; raised by ``commit`` or ``setup``, the
    runtime tries again later, with backoff. Any other exception fails the job.
    """


@dataclass(frozen=True)
class SinkContext:
    """Where a writer runs: the job, the sink step and the partition.

    ``restored_checkpoint`` is the checkpoint the job (re)started from, or
    None for a fresh start: data a writer stages from now on belongs to a
    later checkpoint. ``run_id`` names this run of the job: a committable
    should carry it, so that idempotency is per run and per checkpoint (after
    a rollback, a later run reuses no id of an earlier one, but a restore
    from an old savepoint may produce ids that an earlier run used).
    """

    job: str
    step: str
    partition: int
    parallelism: int
    restored_checkpoint: int | None = None
    run_id: str = ""


class SinkWriter(ABC):
    """Writes one partition of a sink."""

    @abstractmethod
    def write(self, items: list[Any]) -> None:
        """Take a batch of records (stage them; publish only on commit)."""

    def prepare_commit(self, checkpoint_id: int) -> Any:
        """Stage everything written since the last call; return what commit needs.

        The return value is stored with checkpoint ``checkpoint_id``, so it must
        be picklable and must describe staged data by name (a path, an upload
        id), not hold open handles.
        """
        return None

    def commit(self, committable: Any) -> None:  # noqa: B027 - optional hook
        """Publish a committable from ``prepare_commit``. Must be idempotent.

        After a restore it may be called on another partition's writer (the
        parallelism may have changed), so a committable names its partition.
        It runs in a thread of its own, possibly while ``write`` takes new
        records: publish what the committable names, nothing else.
        """

    def abort(self, committable: Any) -> None:  # noqa: B027 - optional hook
        """Discard staged data that will never be committed."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; called once the writer is done."""


class Sink(ABC):
    """A destination; subclass it and return a writer from ``open``.

    ``batch_format`` (a class attribute): None (the default) hands the writer
    records; ``"numpy"``, ``"pandas"`` or ``"pyarrow"`` hands it batches of
    that format instead (Ray Data's meanings, as ``map_batches``): each chunk
    of a columnar stream as it is, without making Python objects of its rows,
    and each run of records as one batch.
    """

    batch_format: str | None = None

    def location(self) -> str | None:
        """Where the sink writes (a folder, a URI), or None.

        Two sinks of one flow may not write to the same place, nor one
        inside the other's: the flow is refused when it is built.
        """
        return None

    def setup(  # noqa: B027 - optional hook
        self,
        job: str,
        *,
        step: str = "",
        run_id: str = "",
        restored_checkpoint: int | None,
    ) -> None:
        """Called once by the job's coordinator before the writers open.

        ``restored_checkpoint`` is None when the job starts from nothing, so a
        sink may clear what an earlier run of the same job and step left;
        otherwise the job continues from that checkpoint, and data staged for
        later checkpoints will never be committed and may be deleted. A sink
        must only touch its own files: those of this job and this step.
        """

    @abstractmethod
    def open(self, ctx: SinkContext) -> SinkWriter:
        """Open the writer of partition ``ctx.partition``."""


OWNER_FILE = ".rayflow-sink.json"


def _owner_conflict(where: str, owner: dict[str, Any], job: str, step: str) -> ConfigError:
    return ConfigError(
        f"sink {step!r} of job {job!r}: {where} is the output of step "
        f"{owner.get('step')!r} of job {owner.get('job')!r} (see its {OWNER_FILE}); "
        "a sink writes only into a place of its own. Use another folder or prefix, or "
        "delete that output first."
    )


def _claim_folder(folder: str, job: str, step: str) -> None:
    """Make ``folder`` this job's and step's, or refuse if it belongs to another."""
    path = os.path.join(folder, OWNER_FILE)
    try:
        with open(path) as f:
            owner = json.load(f)
    except FileNotFoundError:
        owner = None
    except (OSError, ValueError):
        owner = {}
    if owner is not None:
        if (owner.get("job"), owner.get("step")) != (job, step):
            raise _owner_conflict(folder, owner, job, step)
        return
    foreign = sorted(glob.glob(os.path.join(folder, "part-*.jsonl")))
    if foreign:
        raise ConfigError(
            f"sink {step!r} of job {job!r}: {folder} already holds part files that no "
            f"rayflow sink claimed (e.g. {os.path.basename(foreign[0])}); a sink writes only "
            "into a folder of its own. Use another folder, or delete those files."
        )
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "w") as f:
        json.dump({"job": job, "step": step}, f)
    os.replace(tmp, path)


class Print(Sink):
    """Prints every record (with ``print``) as it arrives; no commit protocol."""

    def __init__(self, *, prefix: str | None = None):
        self.prefix = prefix

    def open(self, ctx: SinkContext) -> SinkWriter:
        return _PrintWriter(self.prefix)


class _PrintWriter(SinkWriter):
    def __init__(self, prefix: str | None):
        self._prefix = prefix

    def write(self, items: list[Any]) -> None:
        if self._prefix is None:
            print("\n".join(map(str, items)), flush=True)
        else:
            print("\n".join(f"{self._prefix}{item}" for item in items), flush=True)


class JsonLines(Sink):
    """JSON Lines files in ``folder``: ``part-00000.jsonl`` per partition.

    Records are staged in ``folder/.staging/`` and appended to the partition's
    file only when a checkpoint commits (or, without checkpointing, when the
    input ends), so the part files hold exactly the committed output. A
    ``.part-NNNNN.jsonl.commit`` file beside each part file records, per run
    of the job, the last committed checkpoint, and the file's size after it;
    that makes commit idempotent (a re-issued commit is skipped, a new run's
    is not, whatever its id) and lets a restart cut off a half-finished
    append. The folder belongs to one sink of one job (``.rayflow-sink.json``
    says which); a fresh (not resumed) run of that job clears the files an
    earlier run left, a restored one deletes what was staged for checkpoints
    after the one it restored.
    """

    def __init__(self, folder: str | os.PathLike[str]):
        if not isinstance(folder, (str, os.PathLike)) or not os.fspath(folder):
            raise ConfigError(f"JsonLines needs an output folder path; got {folder!r}")
        self.folder = os.path.abspath(os.fspath(folder))

    def location(self) -> str:
        return self.folder

    def setup(
        self,
        job: str,
        *,
        step: str = "",
        run_id: str = "",
        restored_checkpoint: int | None,
        partition: int | None = None,
    ) -> None:
        os.makedirs(self.folder, exist_ok=True)
        _claim_folder(self.folder, job, step)
        if partition is not None:
            # One partition restarted alone (partial recovery): only its staged files.
            mine = _part_prefix(partition)
            for path in glob.glob(os.path.join(self.folder, ".staging", mine + "*")):
                staged_id = _staged_checkpoint(os.path.basename(path))
                if staged_id is None or staged_id > (restored_checkpoint or 0):
                    os.remove(path)
            return
        if restored_checkpoint is None:
            patterns = ("part-*.jsonl", ".part-*.jsonl.commit", ".staging/*")
            for pattern in patterns:
                for path in glob.glob(os.path.join(self.folder, pattern)):
                    os.remove(path)
            return
        for path in glob.glob(os.path.join(self.folder, ".staging", "*")):
            name = os.path.basename(path)
            staged_id = _staged_checkpoint(name)
            if staged_id is None or staged_id > restored_checkpoint:
                os.remove(path)  # in progress, or staged for a checkpoint that never committed

    def open(self, ctx: SinkContext) -> SinkWriter:
        return _JsonLinesWriter(self.folder, ctx)

    def __repr__(self) -> str:
        return f"JsonLines({self.folder!r})"


def _part_prefix(partition: int | None) -> str:
    """How the names of a partition's part files (staged or published) begin; of every
    partition's with None. A partition restarted alone cleans up only its own."""
    return "part-" if partition is None else f"part-{partition:05d}-"


def _staged_checkpoint(name: str) -> int | None:
    """The checkpoint id of a staged file ``part-NNNNN-<id>.jsonl``; None if in progress."""
    if not name.endswith(".jsonl"):
        return None
    tail = name[: -len(".jsonl")].rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _part_paths(folder: str, partition: int) -> tuple[str, str]:
    return (
        os.path.join(folder, f"part-{partition:05d}.jsonl"),
        os.path.join(folder, f".part-{partition:05d}.jsonl.commit"),
    )


#: Runs remembered in a commit marker (a run is a start or a restart of the job).
MARKER_RUNS = 100


def _read_marker(marker: str) -> tuple[dict[str, int], int]:
    """(run id -> last checkpoint committed by that run, size of the part file)."""
    try:
        with open(marker) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}, 0
    runs = data.get("runs")
    if runs is None:  # written before runs were tracked
        runs = {"": int(data.get("checkpoint", 0))}
    return {str(r): int(c) for r, c in runs.items()}, int(data["size"])


class S3JsonLines(Sink):
    """JSON Lines objects under ``s3://bucket/prefix``, exactly-once.

    Each partition streams what it gets between two checkpoints into an S3
    multipart upload; the upload is completed (and the object appears) only
    when the checkpoint commits. Objects are named
    ``part-<partition>-<checkpoint before>-<id>.jsonl``; a restored job aborts
    the uploads begun after the checkpoint it restored, and a fresh job
    deletes the part objects and uploads an earlier run left. Credentials and
    ``AWS_ENDPOINT_URL`` as for checkpoint storage.
    """

    def __init__(self, uri: str, *, part_bytes: int = 8 << 20):
        if not isinstance(uri, str) or not uri.startswith("s3://") or len(uri) <= 5:
            raise ConfigError(f"S3JsonLines needs an s3://bucket/prefix URI; got {uri!r}")
        if part_bytes < 5 << 20:
            raise ConfigError(
                f"S3JsonLines part_bytes must be at least 5 MiB (S3's minimum part size); "
                f"got {part_bytes}"
            )
        # Here, not in the operators: a missing extra is a mistake to name at once.
        require_installed("boto3", "rf.sinks.S3JsonLines", "s3")
        self.bucket, _, prefix = uri[5:].partition("/")
        self.prefix = prefix.strip("/")
        self.part_bytes = part_bytes

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def location(self) -> str:
        return self.uri

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _claim(self, client: Any, job: str, step: str) -> None:
        key = self._key(OWNER_FILE)
        from botocore.exceptions import ClientError

        try:
            owner = json.loads(client.get_object(Bucket=self.bucket, Key=key)["Body"].read())
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("NoSuchKey", "404"):
                raise
            owner = None
        except ValueError:
            owner = {}
        if owner is not None:
            if (owner.get("job"), owner.get("step")) != (job, step):
                raise _owner_conflict(self.uri, owner, job, step)
            return
        listed = client.list_objects_v2(Bucket=self.bucket, Prefix=self._key("part-"), MaxKeys=1)
        if listed.get("Contents"):
            raise ConfigError(
                f"sink {step!r} of job {job!r}: {self.uri} already holds part objects that "
                f"no rayflow sink claimed (e.g. {listed['Contents'][0]['Key']}); a sink "
                "writes only into a prefix of its own. Use another prefix, or delete them."
            )
        body = json.dumps({"job": job, "step": step}).encode()
        client.put_object(Bucket=self.bucket, Key=key, Body=body)

    def setup(
        self,
        job: str,
        *,
        step: str = "",
        run_id: str = "",
        restored_checkpoint: int | None,
        partition: int | None = None,
    ) -> None:
        from rayflow._internal.storage.s3 import is_transient, s3_client

        try:
            self._setup(s3_client(), job, step, restored_checkpoint, partition)
        except Exception as exc:
            if is_transient(exc):
                raise TransientSinkError(f"S3JsonLines {self.uri} unreachable: {exc}") from exc
            raise

    def _setup(
        self,
        client: Any,
        job: str,
        step: str,
        restored_checkpoint: int | None,
        partition: int | None = None,
    ) -> None:
        from rayflow._internal.storage.s3 import clean_sink_prefix

        self._claim(client, job, step)
        if partition is not None:  # one partition restarted alone: only its uploads
            restored_checkpoint = restored_checkpoint or 0

        def abort(key: str) -> bool:
            # Begun after the restored checkpoint: it will never be committed.
            after = _s3_part_after(key)
            return restored_checkpoint is None or after is None or after >= restored_checkpoint

        clean_sink_prefix(
            client,
            self.bucket,
            self._key(_part_prefix(partition)),
            abort=abort,
            delete_all=restored_checkpoint is None,
        )

    def open(self, ctx: SinkContext) -> SinkWriter:
        return _S3JsonLinesWriter(self, ctx)

    def __repr__(self) -> str:
        return f"S3JsonLines({self.uri!r})"


def _s3_part_after(key: str) -> int | None:
    """The checkpoint id in ``.../part-PPPPP-<after>-<run>-<id>.jsonl``; None if not ours."""
    name = key.rsplit("/", 1)[-1]
    fields = name[: -len(".jsonl")].split("-") if name.endswith(".jsonl") else []
    if len(fields) in (4, 5) and fields[0] == "part" and fields[2].isdigit():
        return int(fields[2])
    return None


class _S3JsonLinesWriter(SinkWriter):
    """Lines go to a local spill file first; parts are uploaded from it.

    So an S3 outage costs local disk, not memory, and loses nothing: parts
    that could not be uploaded are uploaded by the next ``prepare_commit``
    (which declines its checkpoint while S3 is down).
    """

    def __init__(self, sink: S3JsonLines, ctx: SinkContext):
        from rayflow._internal.storage.s3 import FailFastGate, s3_client

        self._sink = sink
        self._ctx = ctx
        # One try per call: the checkpoints and the gate retry, and a call here holds
        # up this partition's records while it waits (a second try after a refused
        # connection slept ~0.5 s in the client: 17% of the throughput during an
        # outage, with the gate trying every 2 s).
        self._client = s3_client(attempts=1)
        self._upload: dict[str, Any] | None = None  # key, upload id, parts so far
        self._after = ctx.restored_checkpoint or 0  # the checkpoint staged data follows
        fd, self._spill_path = tempfile.mkstemp(
            prefix=f"rayflow-{ctx.step}-{ctx.partition}-",
            suffix=".spill",
            dir=os.environ.get("RAYFLOW_SPILL_DIR") or None,
        )
        self._spill: IO[bytes] = os.fdopen(fd, "w+b")
        self._uploaded = 0  # bytes of the spill file uploaded as parts
        # After S3 could not be reached, calls fail fast for a while: an outage must
        # not hold up the records at every checkpoint.
        self._gate = FailFastGate(f"S3JsonLines sink {ctx.step!r}: {sink.uri}")
        # Keys whose CreateMultipartUpload may have reached S3 with its answer lost
        # (the call failed, or succeeded only on a retry), each with the upload id
        # this writer uses (None: none). Every other upload under such a key is an
        # orphan nobody will complete: aborted after the next commit and on close.
        self._suspects: dict[str, str | None] = {}

    @property
    def spilled_bytes(self) -> int:
        """Bytes written and not uploaded yet (on local disk)."""
        return self._spill.tell() - self._uploaded

    def write(self, items: list[Any]) -> None:
        dumps = json.dumps
        try:
            data = "".join([dumps(item) + "\n" for item in items]).encode()
        except TypeError as exc:
            raise TypeError(
                f"S3JsonLines sink {self._ctx.step!r} can only write JSON-serializable "
                f"records: {exc}; convert the records with a map step before the sink"
            ) from None
        self._spill.write(data)
        if self.spilled_bytes >= self._sink.part_bytes and self._gate.open:
            with contextlib.suppress(TransientSinkError):  # S3 is down: keep spilling
                self._upload_parts(final=False)

    def _upload_parts(self, *, final: bool) -> None:
        """Upload whole parts from the spill file (and the rest, if ``final``)."""
        part = self._sink.part_bytes
        end = self._spill.tell()
        while end - self._uploaded >= part or (final and end > self._uploaded):
            if self._upload is None:
                name = (
                    f"part-{self._ctx.partition:05d}-{self._after:010d}-"
                    f"{self._ctx.run_id or 'r'}-{uuid.uuid4().hex[:8]}.jsonl"
                )
                key = self._sink._key(name)
                from rayflow._internal.storage.s3 import create_upload

                upload_id = create_upload(
                    self._gate, self._client, self._sink.bucket, key, self._suspects
                )
                self._upload = {"key": key, "upload_id": upload_id, "parts": []}
            size = min(part, end - self._uploaded) if final else part
            self._spill.seek(self._uploaded)
            body = self._spill.read(size)
            self._spill.seek(end)
            number = len(self._upload["parts"]) + 1
            response = self._gate.call(
                self._client.upload_part,
                Bucket=self._sink.bucket,
                Key=self._upload["key"],
                UploadId=self._upload["upload_id"],
                PartNumber=number,
                Body=body,
            )
            self._upload["parts"].append({"PartNumber": number, "ETag": response["ETag"]})
            self._uploaded += len(body)

    def prepare_commit(self, checkpoint_id: int) -> Any:
        self._upload_parts(final=True)  # TransientSinkError: declined, all kept for the next
        upload, self._upload = self._upload, None
        self._spill.seek(0)
        self._spill.truncate()
        self._uploaded = 0
        self._after = checkpoint_id
        if upload is None:
            return None
        return {**upload, "bucket": self._sink.bucket, "checkpoint": checkpoint_id}

    def commit(self, committable: Any) -> None:
        if committable is None:
            return
        from botocore.exceptions import ClientError

        try:
            self._gate.call(
                self._client.complete_multipart_upload,
                Bucket=committable["bucket"],
                Key=committable["key"],
                UploadId=committable["upload_id"],
                MultipartUpload={"Parts": committable["parts"]},
            )
        except ClientError as exc:
            # Completed before (a re-issued commit): then the object exists.
            try:
                self._gate.call(
                    self._client.head_object, Bucket=committable["bucket"], Key=committable["key"]
                )
            except ClientError:
                raise exc from None
        if self._suspects:
            from rayflow._internal.storage.s3 import abort_stray_uploads

            abort_stray_uploads(self._client, self._sink.bucket, self._suspects)

    def abort(self, committable: Any) -> None:
        if committable is not None:
            with contextlib.suppress(Exception):
                self._client.abort_multipart_upload(
                    Bucket=committable["bucket"],
                    Key=committable["key"],
                    UploadId=committable["upload_id"],
                )

    def close(self) -> None:
        if self._upload is not None:  # staged but never to be committed
            self.abort({**self._upload, "bucket": self._sink.bucket})
            self._upload = None
        if self._suspects:
            from rayflow._internal.storage.s3 import abort_stray_uploads

            abort_stray_uploads(self._client, self._sink.bucket, self._suspects)
        with contextlib.suppress(OSError):
            self._spill.close()
            os.remove(self._spill_path)


class _JsonLinesWriter(SinkWriter):
    def __init__(self, folder: str, ctx: SinkContext):
        self._ctx = ctx
        self._folder = folder
        self._staging = os.path.join(folder, ".staging")
        os.makedirs(self._staging, exist_ok=True)
        self._current: IO[str] | None = None
        self._current_path = ""
        # A crash in the middle of a commit can leave a partial append; the
        # marker holds the size of the part file after the last full commit.
        part, marker = _part_paths(folder, ctx.partition)
        _, size = _read_marker(marker)
        if os.path.exists(part) and os.path.getsize(part) > size:
            with open(part, "r+b") as f:
                f.truncate(size)

    def write(self, items: list[Any]) -> None:
        if self._current is None:
            name = f"part-{self._ctx.partition:05d}-{uuid.uuid4().hex}.inprogress"
            self._current_path = os.path.join(self._staging, name)
            self._current = open(self._current_path, "w", encoding="utf-8")
        dumps = json.dumps
        try:
            self._current.write("".join([dumps(item) + "\n" for item in items]))
        except TypeError as exc:
            raise TypeError(
                f"JsonLines sink {self._ctx.step!r} can only write JSON-serializable "
                f"records (dict, list, str, int, float, bool, None): {exc}; convert the "
                "records with a map step before the sink"
            ) from None

    def prepare_commit(self, checkpoint_id: int) -> Any:
        if self._current is None:
            return None
        self._current.flush()
        os.fsync(self._current.fileno())
        self._current.close()
        self._current = None
        run = self._ctx.run_id or "r"
        staged = os.path.join(
            self._staging, f"part-{self._ctx.partition:05d}-{run}-{checkpoint_id:010d}.jsonl"
        )
        os.replace(self._current_path, staged)
        return {
            "staged": staged,
            "checkpoint": checkpoint_id,
            "partition": self._ctx.partition,
            "run": self._ctx.run_id,
        }

    def commit(self, committable: Any) -> None:
        if committable is None:
            return
        staged, checkpoint = committable["staged"], committable["checkpoint"]
        run = str(committable.get("run", ""))
        part, marker = _part_paths(self._folder, committable["partition"])
        runs, size = _read_marker(marker)
        if checkpoint <= runs.get(run, 0):  # committed before (a re-issued commit)
            with contextlib.suppress(FileNotFoundError):
                os.remove(staged)
            return
        if not os.path.exists(staged):
            raise FileNotFoundError(
                f"staged output {staged} of checkpoint {checkpoint} (run {run}) is gone and "
                "was never committed; it cannot be published"
            )
        with open(part, "ab") as out:
            out.truncate(size)  # cut any partial append of an interrupted commit
            with open(staged, "rb") as src:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
            new_size = out.tell()
        runs.pop(run, None)
        runs[run] = checkpoint  # the newest run last; the oldest are forgotten
        kept = dict(list(runs.items())[-MARKER_RUNS:])
        tmp = marker + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"runs": kept, "checkpoint": checkpoint, "size": new_size}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, marker)
        os.remove(staged)

    def abort(self, committable: Any) -> None:
        if committable is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(committable["staged"])

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._current_path)
            self._current = None


# Connectors (rayflow/_internal/connectors/), re-exported here; they import this module.
from rayflow._internal.connectors.parquet import Parquet  # noqa: E402

__all__ += ["Parquet"]

from rayflow._internal.connectors.kafka_sink import Kafka  # noqa: E402

__all__ += ["Kafka"]
