"""Lines of local files and S3 objects: listing, partitioning, reading.

The machinery behind ``rf.sources.TextFiles`` and ``rf.sources.S3Files``
(rayflow/sources.py holds the public classes and their documentation).

A source partition owns a set of files (a file is its absolute path, an
object its ``s3://bucket/key``). Its offset names them::

    {"files": {"/data/a.txt": 1234, "/data/b.txt": 0}}

the byte position of the next line to read in each file it owns. Which
partition owns a file is decided by the file alone (its index in the list
fixed when the source was created, or a stable hash of its name), and a
restore goes through :func:`regroup`, which collects every file's position
from the checkpoint and hands it to the partition that owns the file now:
an offset is never applied to another file, whatever the glob matches today.
"""

from __future__ import annotations

import glob
import hashlib
import io
import logging
import os
import re
import stat
import time
from collections.abc import Callable
from typing import IO, Any

from rayflow.errors import ConfigError
from rayflow.sources import SourceReader

log = logging.getLogger("rayflow")

#: Transient read or listing errors are retried for this long before the reader fails.
RETRY_FOR_S = 60.0


def owner(name: str, partitions: int) -> int:
    """The partition that owns file ``name`` out of ``partitions`` (stable everywhere)."""
    digest = hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % partitions


def positions_of(offset: Any, what: str) -> dict[str, int]:
    """The per-file positions of a file source's offset; a clear error for anything else."""
    if isinstance(offset, dict) and isinstance(offset.get("files"), dict):
        return {str(f): int(p) for f, p in offset["files"].items()}
    if isinstance(offset, int):
        raise ConfigError(
            f"{what}: the checkpoint holds a byte position without a file name ({offset!r}), "
            "the offset format of rayflow's older TextFiles (a partition per file at plan "
            "time), which cannot be matched to files safely. Finish that job with the "
            "rayflow that wrote the checkpoint, or start this one afresh (another job name "
            "or checkpoint storage)"
        )
    raise ConfigError(
        f"{what}: the checkpoint holds an offset {offset!r} that is not a file source's "
        "({'files': {name: byte position}}); was the step's source changed?"
    )


def regroup(
    offsets: dict[int, Any],
    partitions: int,
    owner_of: Callable[[str], int | None],
    current: list[str] | None,
    what: str,
) -> dict[int, Any]:
    """Offsets of a checkpoint, per file, handed to the partitions that own the files now.

    ``current`` is the fixed file list of a bounded source (files it does not
    list are dropped, the ones it adds start at 0); ``None`` for a tailing
    source, whose readers list the files themselves.
    """
    if not offsets:
        return {}
    positions: dict[str, int] = {}
    for sp in sorted(offsets):
        positions.update(positions_of(offsets[sp], what))
    names = list(positions) if current is None else current
    result: dict[int, Any] = {p: {"files": {}} for p in range(partitions)}
    for name in names:
        p = owner_of(name)
        if p is not None:
            result[p]["files"][name] = positions.get(name, 0)
    if current is not None:
        gone = sorted(set(positions) - set(current))
        new = sorted(set(current) - set(positions))
        if gone:
            log.warning(
                "%s: %d file(s) of the checkpoint are not matched any more and are not read: %s",
                what,
                len(gone),
                ", ".join(gone[:5]) + (" ..." if len(gone) > 5 else ""),
            )
        if new:
            log.info("%s: %d new file(s) are read from their start", what, len(new))
    return result


# -- listing and opening ---------------------------------------------------------


class LocalFiles:
    """Files on this machine (or a shared file system) matching a glob."""

    def __init__(self, pattern: str, root: str):
        self.pattern = pattern
        self.root = root  # relative patterns are evaluated from here, in any process

    def describe(self) -> str:
        return repr(self.pattern)

    def list(self) -> dict[str, int]:
        """Every regular file matching now: absolute path -> size."""
        found: dict[str, int] = {}
        for match in glob.glob(self.pattern, root_dir=self.root):
            path = os.path.abspath(os.path.join(self.root, match))
            try:
                st = os.stat(path)
            except OSError:
                continue  # gone between the listing and now
            if stat.S_ISREG(st.st_mode):
                found[path] = st.st_size
        return found

    def open(self, name: str, position: int) -> IO[bytes]:
        f = open(name, "rb")
        if position:
            f.seek(position)
        return f

    def missing(self, exc: BaseException) -> bool:
        return isinstance(exc, FileNotFoundError)

    def transient(self, exc: BaseException) -> bool:
        return False


_GLOB_CHARS = re.compile(r"[*?\[]")


def key_regex(pattern: str) -> re.Pattern[str]:
    """An S3 key glob as a regex: ``*`` and ``?`` stay within a ``/`` level, ``**`` crosses."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = i + 1
            if j < n and pattern[j] in "!^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                out.append(re.escape(c))
                i += 1
                continue
            body = pattern[i + 1 : j].replace("\\", "\\\\")
            if body[:1] in ("!", "^"):
                body = "^" + body[1:]
            out.append(f"[{body}]")
            i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out), re.DOTALL)


def split_s3_uri(uri: str, what: str) -> tuple[str, str]:
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise ConfigError(f"{what} needs an s3://bucket/prefix/*.jsonl glob; got {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket or not key:
        raise ConfigError(
            f"{what} needs a bucket and a key glob, as in s3://bucket/prefix/*.jsonl; got {uri!r}"
        )
    return bucket, key


class _Body(io.RawIOBase):
    """A GET's streaming body as a raw stream, for a buffered line reader."""

    def __init__(self, body: Any):
        super().__init__()
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return int(self._body.readinto(buffer))

    def close(self) -> None:
        try:
            self._body.close()
        finally:
            super().close()


class S3Objects:
    """Objects of one bucket whose keys match a glob, read through ranged GETs."""

    #: Bytes buffered per open object (what one read of the stream asks the socket for).
    BUFFER = 256 * 1024

    def __init__(self, bucket: str, key_pattern: str):
        self.bucket = bucket
        self.key_pattern = key_pattern
        match = _GLOB_CHARS.search(key_pattern)
        self.prefix = key_pattern if match is None else key_pattern[: match.start()]
        self.regex = key_regex(key_pattern)
        self._client: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_client"] = None  # a client is made where it is used
        return state

    def client(self) -> Any:
        if self._client is None:
            from rayflow._internal.storage.s3 import s3_client

            self._client = s3_client()
        return self._client

    def describe(self) -> str:
        return repr(f"s3://{self.bucket}/{self.key_pattern}")

    def list(self) -> dict[str, int]:
        """Every object matching now: ``s3://bucket/key`` -> size."""
        found: dict[str, int] = {}
        paginator = self.client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if self.regex.fullmatch(key) and not key.endswith("/"):
                    found[f"s3://{self.bucket}/{key}"] = int(obj["Size"])
        return found

    def open(self, name: str, position: int) -> IO[bytes]:
        from botocore.exceptions import ClientError

        key = name[len(f"s3://{self.bucket}/") :]
        try:
            response = self.client().get_object(
                Bucket=self.bucket, Key=key, Range=f"bytes={position}-"
            )
        except ClientError as exc:
            if _code(exc) in ("InvalidRange", "416"):
                return io.BytesIO(b"")  # at (or past) the end: nothing more yet
            raise
        return io.BufferedReader(_Body(response["Body"]), buffer_size=self.BUFFER)

    def missing(self, exc: BaseException) -> bool:
        from botocore.exceptions import ClientError

        return isinstance(exc, ClientError) and _code(exc) in ("NoSuchKey", "404")

    def transient(self, exc: BaseException) -> bool:
        from rayflow._internal.storage.s3 import is_transient

        return is_transient(exc)


def _code(exc: Any) -> str:
    response = getattr(exc, "response", {}) or {}
    code = response.get("Error", {}).get("Code")
    if code:
        return str(code)
    return str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


Store = LocalFiles | S3Objects


# -- reading ---------------------------------------------------------------------


class LineReader(SourceReader):
    """Lines of the files one partition owns, each file from its byte position.

    Bounded (``files`` given): the files in that order, each to its end.
    Tailing (``files`` is None): the store is listed every ``poll_s``; files
    this partition owns (``owns``) that are new start at 0, files that grew
    are read on, only complete lines are returned (a partial last line waits
    for its newline), a file that shrank below its position was replaced and
    is read again from the start, and a file that disappeared is forgotten.
    """

    def __init__(
        self,
        store: Store,
        positions: dict[str, int],
        *,
        files: list[str] | None,
        owns: Callable[[str], bool],
        poll_s: float,
        encoding: str,
    ):
        self._store = store
        self._pos: dict[str, int] = dict(positions)
        self._tail = files is None
        self._owns = owns
        self._poll_s = poll_s
        self._encoding = encoding
        # Bounded: the files still to read, in order. Tailing: the files with
        # unread bytes as of the last listing, in name order.
        self._todo: list[str] = list(files) if files is not None else []
        if files is not None:
            for name in files:
                self._pos.setdefault(name, 0)
        self._ends: dict[str, int] = {}  # tailing: where a file ended when last read
        self._next_listing = 0.0
        self._current: str | None = None
        self._stream: IO[bytes] | None = None
        self._pending: list[bytes] = []  # complete lines read but not returned yet
        self._partial: int | None = None  # tailing: bytes of a line without its newline
        self._offset: dict[str, Any] | None = None
        self._retry_at = 0.0
        self._failing_since: float | None = None  # reading: until lines come again
        self._listing_failing_since: float | None = None

    # -- the contract --

    def read(self, max_items: int) -> list[Any] | None:
        want = max(1, max_items)
        now = time.monotonic()
        if now < self._retry_at:
            return []
        if self._tail and now >= self._next_listing:
            self._list()
        raw: list[bytes] = []
        while len(raw) < want:
            if self._stream is None and not self._open_next():
                break
            name = self._current
            assert name is not None
            try:
                lines, at_end = self._take(want - len(raw))
            except Exception as exc:
                if not self._store.transient(exc):
                    raise
                self._failed(exc, f"reading {name}")
                break
            if lines:
                self._pos[name] += sum(map(len, lines))
                self._offset = None
                raw.extend(lines)
            if at_end:
                self._leave(ended=True)
        if raw:
            self._failing_since = None
        elif not self._tail and not self._todo and self._stream is None:
            return None
        return self._decode(raw)

    def offset(self) -> dict[str, Any]:
        if self._offset is None:
            self._offset = {"files": dict(self._pos)}
        return self._offset

    def close(self) -> None:
        self._close_stream()

    # -- files --

    def _open_next(self) -> bool:
        """Open the next file with something to read; False if there is none now."""
        while self._todo:
            name = self._todo.pop(0)
            if name not in self._pos:
                continue  # forgotten since (tailing: it disappeared)
            try:
                self._stream = self._store.open(name, self._pos[name])
            except Exception as exc:
                if self._store.missing(exc):
                    log.warning(
                        "source %s: %s disappeared before it was read to its end",
                        self._store.describe(),
                        name,
                    )
                    if self._tail:
                        self._forget(name)
                    continue
                if not self._store.transient(exc):
                    raise
                self._todo.insert(0, name)
                self._failed(exc, f"opening {name}")
                return False
            self._current = name
            self._pending = []
            self._partial = None
            return True
        return False

    def _take(self, n: int) -> tuple[list[bytes], bool]:
        """Up to ``n`` complete lines of the current file, and whether it is at its end."""
        stream = self._stream
        assert stream is not None
        lines = self._pending
        hit_end = False
        if self._partial is None:
            while len(lines) < n:
                more = stream.readlines((n - len(lines)) * 64)  # a size hint in bytes
                if not more:
                    hit_end = True
                    break
                if self._tail and not more[-1].endswith(b"\n"):
                    self._partial = len(more.pop())  # waits for its newline
                    lines.extend(more)
                    break
                lines.extend(more)
        raw, self._pending = lines[:n], lines[n:]
        return raw, not self._pending and (hit_end or self._partial is not None)

    def _leave(self, *, ended: bool) -> None:
        """Done with the current file for now (its end, or it changed)."""
        name = self._current
        if name is not None and ended and self._tail and name in self._pos:
            self._ends[name] = self._pos[name] + (self._partial or 0)
        self._close_stream()

    def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        self._current = None
        self._pending = []
        self._partial = None
        if stream is not None:
            try:
                stream.close()
            except Exception:
                pass

    def _forget(self, name: str) -> None:
        if self._current == name:
            self._close_stream()
        self._pos.pop(name, None)
        self._ends.pop(name, None)
        self._offset = None

    def _list(self) -> None:
        """Tailing: take in what the store holds now."""
        self._next_listing = time.monotonic() + self._poll_s
        try:
            listed = self._store.list()
        except Exception as exc:
            if not self._store.transient(exc):
                raise
            self._failed(exc, "listing", retry=False)
            return
        self._listing_failing_since = None
        mine = {name: size for name, size in listed.items() if self._owns(name)}
        for name in [n for n in self._pos if n not in mine]:
            log.warning(
                "source %s: %s disappeared; it is not read any more (a file of that "
                "name appearing later is read from its start)",
                self._store.describe(),
                name,
            )
            self._forget(name)
        for name, size in mine.items():
            position = self._pos.get(name)
            if position is None:
                self._pos[name] = 0
                self._offset = None
            elif size < position:
                log.warning(
                    "source %s: %s shrank below the position read (%d < %d bytes): it "
                    "was replaced or truncated, and is read again from its start",
                    self._store.describe(),
                    name,
                    size,
                    position,
                )
                if self._current == name:
                    self._close_stream()
                self._pos[name] = 0
                self._ends.pop(name, None)
                self._offset = None
        self._todo = [
            name
            for name in sorted(mine)
            if name != self._current and mine[name] > self._ends.get(name, self._pos[name])
        ]

    def _failed(self, exc: BaseException, doing: str, *, retry: bool = True) -> None:
        """A transient error: try again later, and fail once it has lasted too long."""
        now = time.monotonic()
        since = (self._failing_since if retry else self._listing_failing_since) or now
        if now - since > RETRY_FOR_S:
            raise exc
        if retry:
            self._failing_since = since
        else:
            self._listing_failing_since = since
        log.warning(
            "source %s: %s failed (%s: %s); trying again",
            self._store.describe(),
            doing,
            type(exc).__name__,
            exc,
        )
        if retry:
            name = self._current
            self._close_stream()  # reopened at the position of the last line returned
            if name is not None and name not in self._todo:
                self._todo.insert(0, name)
            self._retry_at = now + min(self._poll_s, 1.0)

    def _decode(self, raw: list[bytes]) -> list[Any]:
        enc = self._encoding
        out = []
        for line in raw:
            text = line.decode(enc)
            if text.endswith("\n"):
                text = text[:-2] if text.endswith("\r\n") else text[:-1]
            out.append(text)
        return out
