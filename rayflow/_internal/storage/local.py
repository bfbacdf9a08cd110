"""Checkpoint storage in a local (or shared) folder."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterable

from rayflow._internal.storage.base import ObjectNotFound, Storage, StorageError


class LocalStorage(Storage):
    def __init__(self, root: str):
        self.uri = root
        self.root = root

    def _path(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise StorageError(f"invalid storage key {key!r}")
        return os.path.join(self.root, *key.split("/"))

    def _write_temp(self, path: str, data: bytes) -> str:
        folder = os.path.dirname(path)
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc}") from exc
        return tmp

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = self._write_temp(path, data)
        try:
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise StorageError(f"cannot write {path}: {exc}") from exc

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        tmp = self._write_temp(path, data)
        try:
            os.link(tmp, path)  # atomic, and fails if the name exists
        except FileExistsError:
            return False
        except OSError as exc:
            raise StorageError(f"cannot create {path}: {exc}") from exc
        finally:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        _fsync_dir(os.path.dirname(path))
        return True

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise ObjectNotFound(f"{path} does not exist") from None
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc}") from exc

    def _walk_start(self, prefix: str) -> str | None:
        """The folder to walk for keys under ``prefix`` (None: nothing there)."""
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if os.path.isdir(base):
            return base
        if base == self.root:
            return None  # the storage folder does not exist (yet)
        return os.path.dirname(base)

    def list(self, prefix: str) -> list[str]:
        start = self._walk_start(prefix)
        if start is None:
            return []
        keys = []
        for folder, _, files in os.walk(start):
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                rel = os.path.relpath(os.path.join(folder, name), self.root)
                key = rel.replace(os.sep, "/")
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def collect_temporaries(self, prefix: str, older_than_s: float) -> int:
        """Delete ``.tmp-*`` files (writes cut short by a killed process) under ``prefix``."""
        start = self._walk_start(prefix)
        if start is None:
            return 0
        cutoff = time.time() - older_than_s
        removed = 0
        for folder, _, files in os.walk(start):
            for name in files:
                if not name.startswith(".tmp-"):
                    continue
                path = os.path.join(folder, name)
                with contextlib.suppress(OSError):
                    if os.path.getmtime(path) < cutoff:
                        os.remove(path)
                        removed += 1
        return removed

    def delete(self, keys: Iterable[str]) -> None:
        folders = set()
        for key in keys:
            path = self._path(key)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            folders.add(os.path.dirname(path))
        # Drop folders that became empty, up to the root.
        for folder in sorted(folders, key=len, reverse=True):
            while folder.startswith(self.root) and folder != self.root:
                try:
                    os.rmdir(folder)
                except OSError:
                    break
                folder = os.path.dirname(folder)


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
