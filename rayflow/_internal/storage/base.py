"""The storage interface that checkpoints are written through.

Keys are ``/``-separated paths relative to the storage root. ``put_if_absent``
is the one atomic operation the protocol needs: a manifest is created only
if no manifest with that key exists, so two writers can never both commit
the same checkpoint.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from functools import lru_cache

from rayflow.errors import ConfigError, RayflowError


class StorageError(RayflowError):
    """A storage operation failed (unreachable, denied, missing object...)."""


class ObjectNotFound(StorageError):
    """The key does not exist."""


class Storage(ABC):
    """A place to put checkpoint objects."""

    uri: str

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` at ``key``, replacing what was there."""

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Atomically create ``key``; False (and no change) if it exists."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """Read ``key``; raises :class:`ObjectNotFound` if it does not exist."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Every key that starts with ``prefix``, sorted."""

    @abstractmethod
    def delete(self, keys: Iterable[str]) -> None:
        """Delete ``keys``; missing keys are ignored."""

    def collect_temporaries(self, prefix: str, older_than_s: float) -> int:
        """Delete leftovers of writes that died half-way (none by default); how many."""
        return 0

    def exists(self, key: str) -> bool:
        try:
            self.get(key)
        except ObjectNotFound:
            return False
        return True

    def fail_fast(self) -> Storage:
        """This storage with calls that are tried once: for callers that ask again on a
        schedule of their own (a lease renewal, a probe), so that an answer after an
        outage comes on that schedule, not after the client's own backoff (~15 s)."""
        return self

    def describe(self, key: str) -> str:
        """A full address of ``key`` for messages."""
        return f"{self.uri.rstrip('/')}/{key}"


def normalize_uri(uri: str | os.PathLike[str]) -> str:
    """``s3://bucket/prefix`` stays; a local path becomes absolute."""
    text = os.fspath(uri)
    if text.startswith("s3://"):
        bucket = text[5:].split("/", 1)[0]
        if not bucket:
            raise ConfigError(f"storage {text!r} has no bucket; use s3://bucket/prefix")
        return text.rstrip("/")
    if "://" in text and not text.startswith("file://"):
        scheme = text.split("://", 1)[0]
        raise ConfigError(
            f"storage {text!r}: unsupported scheme {scheme!r}; use a local folder "
            "path or s3://bucket/prefix"
        )
    if text.startswith("file://"):
        text = text[7:]
    return os.path.abspath(text)


@lru_cache(maxsize=32)
def _open_cached(uri: str) -> Storage:
    if uri.startswith("s3://"):
        from rayflow._internal.storage.s3 import S3Storage

        return S3Storage(uri)
    from rayflow._internal.storage.local import LocalStorage

    return LocalStorage(uri)


def open_storage(uri: str | os.PathLike[str]) -> Storage:
    """The storage at ``uri`` (cached per process: clients are reused)."""
    return _open_cached(normalize_uri(uri))


#: Pause between tries while the outcome of a create is unknown.
RESOLVE_PAUSE_S = 0.2


def create_once(storage: Storage, key: str, data: bytes, *, resolve_s: float = 30.0) -> bool:
    """Create ``key`` holding ``data``; True if it holds exactly ``data`` afterwards.

    A create whose answer was lost (a timeout after the server applied it,
    then a retry that finds the object) is read back: if the object holds
    our bytes, it was ours. False means the key holds something else
    (another writer's). While the storage cannot answer, keep asking for up
    to ``resolve_s`` seconds, then raise :class:`StorageError`: the outcome
    is unknown and the caller must not act as if it knew either way.
    """
    deadline = time.monotonic() + resolve_s
    pause = RESOLVE_PAUSE_S
    while True:
        try:
            if storage.put_if_absent(key, data):
                return True
            return storage.get(key) == data
        except ObjectNotFound:
            continue  # it was there, then deleted: try to create it again
        except StorageError:
            if time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 2.0)
