"""Checkpoint storage: one small interface, a local-folder and an S3 implementation."""

from rayflow._internal.storage.base import Storage, StorageError, open_storage

__all__ = ["Storage", "StorageError", "open_storage"]
