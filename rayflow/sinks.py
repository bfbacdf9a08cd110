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
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import IO, Any

from rayflow.errors import ConfigError

__all__ = ["JsonLines", "Print", "S3JsonLines", "Sink", "SinkContext", "SinkWriter"]


@dataclass(frozen=True)
class SinkContext:
    """Where a writer runs: the job, the sink step and the partition.

    ``restored_checkpoint`` is the checkpoint the job (re)started from, or
    None for a fresh start: data a writer stages from now on belongs to a
    later checkpoint.
    """

    job: str
    step: str
    partition: int
    parallelism: int
    restored_checkpoint: int | None = None


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
        """

    def abort(self, committable: Any) -> None:  # noqa: B027 - optional hook
        """Discard staged data that will never be committed."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; called once the writer is done."""


class Sink(ABC):
    """A destination; subclass it and return a writer from ``open``."""

    def setup(self, job: str, *, restored_checkpoint: int | None) -> None:  # noqa: B027
        """Called once by the job's coordinator before the writers open.

        ``restored_checkpoint`` is None when the job starts from nothing, so a
        sink may clear what an earlier run left; otherwise the job continues
        from that checkpoint, and data staged for later checkpoints will never
        be committed and may be deleted.
        """

    @abstractmethod
    def open(self, ctx: SinkContext) -> SinkWriter:
        """Open the writer of partition ``ctx.partition``."""


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
    ``.part-NNNNN.jsonl.commit`` file beside each part file records the last
    committed checkpoint and the file's size after it; that makes commit
    idempotent and lets a restart cut off a half-finished append. A fresh
    (not resumed) job clears the part files an earlier run left; a restored
    one deletes what was staged for checkpoints after the one it restored.
    """

    def __init__(self, folder: str | os.PathLike[str]):
        if not isinstance(folder, (str, os.PathLike)) or not os.fspath(folder):
            raise ConfigError(f"JsonLines needs an output folder path; got {folder!r}")
        self.folder = os.path.abspath(os.fspath(folder))

    def setup(self, job: str, *, restored_checkpoint: int | None) -> None:
        os.makedirs(self.folder, exist_ok=True)
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


def _read_marker(marker: str) -> tuple[int, int]:
    try:
        with open(marker) as f:
            data = json.load(f)
        return int(data["checkpoint"]), int(data["size"])
    except FileNotFoundError:
        return 0, 0


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
        self.bucket, _, prefix = uri[5:].partition("/")
        self.prefix = prefix.strip("/")
        self.part_bytes = part_bytes

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def setup(self, job: str, *, restored_checkpoint: int | None) -> None:
        from rayflow._internal.storage.s3 import s3_client

        client = s3_client()
        start = self._key("part-")
        paginator = client.get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=start):
            for upload in page.get("Uploads", []):
                after = _s3_part_after(upload["Key"])
                if restored_checkpoint is None or after is None or after >= restored_checkpoint:
                    # Begun after the restored checkpoint: it will never be committed.
                    client.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
        if restored_checkpoint is None:
            keys: list[str] = []
            for page in client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=start
            ):
                keys.extend(o["Key"] for o in page.get("Contents", []))
            for i in range(0, len(keys), 1000):
                client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True},
                )

    def open(self, ctx: SinkContext) -> SinkWriter:
        return _S3JsonLinesWriter(self, ctx)

    def __repr__(self) -> str:
        return f"S3JsonLines({self.uri!r})"


def _s3_part_after(key: str) -> int | None:
    """The checkpoint id in ``.../part-PPPPP-<after>-<id>.jsonl``; None if not ours."""
    name = key.rsplit("/", 1)[-1]
    fields = name[: -len(".jsonl")].split("-") if name.endswith(".jsonl") else []
    if len(fields) == 4 and fields[0] == "part" and fields[2].isdigit():
        return int(fields[2])
    return None


class _S3JsonLinesWriter(SinkWriter):
    def __init__(self, sink: S3JsonLines, ctx: SinkContext):
        from rayflow._internal.storage.s3 import s3_client

        self._sink = sink
        self._ctx = ctx
        self._client = s3_client()
        self._buffer: list[str] = []
        self._buffered = 0
        self._upload: dict[str, Any] | None = None  # key, upload id, parts so far
        self._after = ctx.restored_checkpoint or 0  # the checkpoint staged data follows

    def write(self, items: list[Any]) -> None:
        dumps = json.dumps
        try:
            lines = [dumps(item) + "\n" for item in items]
        except TypeError as exc:
            raise TypeError(
                f"S3JsonLines sink {self._ctx.step!r} can only write JSON-serializable "
                f"records: {exc}; convert the records with a map step before the sink"
            ) from None
        self._buffer.extend(lines)
        self._buffered += sum(map(len, lines))
        if self._buffered >= self._sink.part_bytes:
            self._upload_part()

    def _upload_part(self) -> None:
        if not self._buffer:
            return
        if self._upload is None:
            name = f"part-{self._ctx.partition:05d}-{self._after:010d}-{uuid.uuid4().hex[:8]}.jsonl"
            key = self._sink._key(name)
            created = self._client.create_multipart_upload(Bucket=self._sink.bucket, Key=key)
            self._upload = {"key": key, "upload_id": created["UploadId"], "parts": []}
        body = "".join(self._buffer).encode()
        number = len(self._upload["parts"]) + 1
        response = self._client.upload_part(
            Bucket=self._sink.bucket,
            Key=self._upload["key"],
            UploadId=self._upload["upload_id"],
            PartNumber=number,
            Body=body,
        )
        self._upload["parts"].append({"PartNumber": number, "ETag": response["ETag"]})
        self._buffer = []
        self._buffered = 0

    def prepare_commit(self, checkpoint_id: int) -> Any:
        self._upload_part()  # the last part may be smaller than 5 MiB
        upload, self._upload = self._upload, None
        self._after = checkpoint_id
        if upload is None:
            return None
        return {**upload, "bucket": self._sink.bucket, "checkpoint": checkpoint_id}

    def commit(self, committable: Any) -> None:
        if committable is None:
            return
        try:
            self._client.complete_multipart_upload(
                Bucket=committable["bucket"],
                Key=committable["key"],
                UploadId=committable["upload_id"],
                MultipartUpload={"Parts": committable["parts"]},
            )
        except Exception as exc:
            # Completed before (a re-issued commit): then the object exists.
            try:
                self._client.head_object(Bucket=committable["bucket"], Key=committable["key"])
            except Exception:
                raise exc from None

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
        staged = os.path.join(
            self._staging, f"part-{self._ctx.partition:05d}-{checkpoint_id:010d}.jsonl"
        )
        os.replace(self._current_path, staged)
        return {"staged": staged, "checkpoint": checkpoint_id, "partition": self._ctx.partition}

    def commit(self, committable: Any) -> None:
        if committable is None:
            return
        staged, checkpoint = committable["staged"], committable["checkpoint"]
        part, marker = _part_paths(self._folder, committable["partition"])
        done, size = _read_marker(marker)
        if checkpoint <= done:  # committed before (a re-issued commit)
            with contextlib.suppress(FileNotFoundError):
                os.remove(staged)
            return
        with open(part, "ab") as out:
            out.truncate(size)  # cut any partial append of an interrupted commit
            with open(staged, "rb") as src:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
            new_size = out.tell()
        tmp = marker + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"checkpoint": checkpoint, "size": new_size}, f)
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
