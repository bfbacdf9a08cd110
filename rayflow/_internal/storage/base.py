"""The storage interface that checkpoints are written through.

Keys are ``/``-separated paths relative to the storage root. ``put_if_absent``
is the one atomic operation the protocol needs: a manifest is created only
if no manifest with that key exists, so two writers can never both commit
the same checkpoint.
"""

from __future__ import annotations

import os
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

    def exists(self, key: str) -> bool:
        try:
            self.get(key)
        except ObjectNotFound:
            return False
        return True

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
