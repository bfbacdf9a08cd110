"""Checkpoint storage in S3 or any S3-compatible server, on boto3.

Credentials come from boto3's usual chain; ``AWS_ENDPOINT_URL`` points it at
an S3-compatible server (path-style addressing is used then). Timeouts and
retries are short on purpose: a checkpoint that cannot be written should be
declined in seconds, not hang the job for minutes.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from rayflow._internal.extras import missing_extra
from rayflow._internal.storage.base import ObjectNotFound, Storage, StorageError

# boto3 comes with the [s3] extra; this module is imported only when an s3://
# storage or an S3 sink is opened, so a missing boto3 is reported then.
try:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError
except ImportError as exc:
    raise missing_extra("boto3", "S3 support (s3:// storage, S3JsonLines)", "s3") from exc

log = logging.getLogger("rayflow")


def s3_client(attempts: int | None = None) -> Any:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    style = os.environ.get("RAYFLOW_S3_ADDRESSING_STYLE", "path" if endpoint else "auto")
    config = Config(
        s3={"addressing_style": style},
        # Adaptive: retries throttling (SlowDown, 503) and timeouts with backoff and
        # jitter, and slows its own request rate while the server says so.
        retries={
            "max_attempts": attempts or int(os.environ.get("RAYFLOW_S3_ATTEMPTS", "5")),
            "mode": "adaptive",
        },
        connect_timeout=float(os.environ.get("RAYFLOW_S3_CONNECT_TIMEOUT", "3")),
        read_timeout=float(os.environ.get("RAYFLOW_S3_READ_TIMEOUT", "20")),
    )
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint or None, config=config)


_TRANSIENT_CODES = {
    "SlowDown",
    "RequestTimeout",
    "ServiceUnavailable",
    "InternalError",
    "Throttling",
    "ThrottlingException",
    "RequestTimeTooSkewed",
}


def is_transient(exc: BaseException) -> bool:
    """An S3 error that goes away by itself: unreachable, timed out, throttled, 5xx."""
    from botocore.exceptions import (
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    if isinstance(
        exc, (EndpointConnectionError, ConnectionClosedError, ConnectTimeoutError, ReadTimeoutError)
    ):
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = exc.response.get("Error", {}).get("Code")
        return int(status) >= 500 or code in _TRANSIENT_CODES
    return isinstance(exc, (BotoCoreError, ConnectionError, TimeoutError))


#: The longest a FailFastGate fails calls fast after the destination could not be reached.
GATE_MAX_PAUSE_S = 2.0


class FailFastGate:
    """After the destination could not be reached, calls fail fast for a while.

    (Pauses double up to 2 s: the storage probe's period, so that a sink is
    back about when the checkpoints are; with 8 s a checkpoint waited up to 8 s
    after an outage.) An outage then costs no waiting at every checkpoint;
    the checkpoints and commits retry. Used by the S3 sinks.
    """

    def __init__(self, what: str):
        self.what = what
        self._retry_at = 0.0
        self._pause = 1.0

    @property
    def open(self) -> bool:
        """Whether a call would be tried now (not failed fast)."""
        return time.monotonic() >= self._retry_at

    def call(self, fn: Any, **kwargs: Any) -> Any:
        from rayflow.sinks import TransientSinkError

        now = time.monotonic()
        if now < self._retry_at:
            raise TransientSinkError(
                f"{self.what} was unreachable {self._pause:.0f} s ago; trying again in "
                f"{self._retry_at - now:.1f} s"
            )
        try:
            result = fn(**kwargs)
        except Exception as exc:
            if is_transient(exc):
                self._retry_at = time.monotonic() + self._pause
                self._pause = min(self._pause * 2, GATE_MAX_PAUSE_S)
                raise TransientSinkError(f"{self.what} unreachable: {exc}") from exc
            raise
        self._pause = 1.0
        return result


def create_upload(
    gate: FailFastGate, client: Any, bucket: str, key: str, suspects: dict[str, str | None]
) -> str:
    """Begin a multipart upload of ``key`` through ``gate``; return its upload id.

    A create that failed, or succeeded only on a retry, may have reached S3 with
    its answer lost, leaving an upload nobody will complete: ``key`` is noted in
    ``suspects`` with the upload id in use (None: none), and
    :func:`abort_stray_uploads` later aborts every other upload under it. A key
    created again (a retried prepare reuses its names) takes the new id.
    """
    try:
        created = gate.call(client.create_multipart_upload, Bucket=bucket, Key=key)
    except Exception:
        suspects[key] = None
        raise
    if created.get("ResponseMetadata", {}).get("RetryAttempts") or key in suspects:
        suspects[key] = created["UploadId"]
    return str(created["UploadId"])


def abort_stray_uploads(client: Any, bucket: str, suspects: dict[str, str | None]) -> None:
    """Abort the uploads under each suspect key but the one in use (:func:`create_upload`).

    Only keys the writer named itself, so no other partition's or incarnation's
    upload is touched. Best effort: a key whose listing or abort fails stays in
    ``suspects`` for the next try.
    """
    for key, keep in list(suspects.items()):
        try:
            listed = client.list_multipart_uploads(Bucket=bucket, Prefix=key)
            for upload in listed.get("Uploads", []):
                if upload["Key"] == key and upload["UploadId"] != keep:
                    client.abort_multipart_upload(
                        Bucket=bucket, Key=key, UploadId=upload["UploadId"]
                    )
        except Exception as exc:  # unreachable again: at the next try
            log.debug("uploads under %s not aborted yet: %s", key, exc)
            continue
        del suspects[key]


def clean_sink_prefix(
    client: Any, bucket: str, prefix: str, *, abort: Callable[[str], bool], delete_all: bool
) -> None:
    """What a two-phase S3 sink does as it starts: abort the multipart uploads under
    ``prefix`` whose key ``abort`` selects (staged for checkpoints that will never
    commit), and with ``delete_all`` (a fresh start) delete every object under it."""
    for page in client.get_paginator("list_multipart_uploads").paginate(
        Bucket=bucket, Prefix=prefix
    ):
        for upload in page.get("Uploads", []):
            if abort(upload["Key"]):
                client.abort_multipart_upload(
                    Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )
    if not delete_all:
        return
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(o["Key"] for o in page.get("Contents", []))
    for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1,000 keys
        client.delete_objects(
            Bucket=bucket,
            Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True},
        )


class S3Storage(Storage):
    def __init__(self, uri: str):
        self.uri = uri
        rest = uri[len("s3://") :]
        self.bucket, _, prefix = rest.partition("/")
        self.prefix = prefix.strip("/")
        self._client = s3_client()
        self._fast: S3Storage | None = None

    def fail_fast(self) -> S3Storage:
        if self._fast is None:
            fast = copy.copy(self)
            fast._client = s3_client(attempts=1)
            fast._fast = fast
            self._fast = fast
        return self._fast

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, action: str, key: str, exc: Exception) -> StorageError:
        return StorageError(f"S3 {action} of {self.describe(key)} failed: {exc}")

    def put(self, key: str, data: bytes) -> None:
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("put", key, exc) from exc

    def put_if_absent(self, key: str, data: bytes) -> bool:
        try:
            self._client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*"
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (
                409,
                412,
            ):
                return False
            raise self._fail("conditional put", key, exc) from exc
        except BotoCoreError as exc:
            raise self._fail("conditional put", key, exc) from exc
        return True

    def get(self, key: str) -> bytes:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            body: bytes = response["Body"].read()
            return body
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise ObjectNotFound(f"{self.describe(key)} does not exist") from None
            raise self._fail("get", key, exc) from exc
        except BotoCoreError as exc:
            raise self._fail("get", key, exc) from exc

    def list(self, prefix: str) -> list[str]:
        full = self._key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        try:
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("list", prefix, exc) from exc
        return sorted(keys)

    def delete(self, keys: Iterable[str]) -> None:
        batch = [self._key(k) for k in keys]
        for start in range(0, len(batch), 1000):
            chunk = batch[start : start + 1000]
            try:
                self._client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True},
                )
            except (BotoCoreError, ClientError) as exc:
                raise self._fail("delete", chunk[0], exc) from exc
