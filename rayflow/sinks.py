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

__all__ = ["JsonLines", "Print", "Sink", "SinkContext", "SinkWriter"]


@dataclass(frozen=True)
class SinkContext:
    """Where a writer runs: the job, the sink step and the partition."""

    job: str
    step: str
    partition: int
    parallelism: int


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
        """Publish a committable from ``prepare_commit``. Must be idempotent."""

    def abort(self, committable: Any) -> None:  # noqa: B027 - optional hook
        """Discard staged data that will never be committed."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; called once the writer is done."""


class Sink(ABC):
    """A destination; subclass it and return a writer from ``open``."""

    def setup(self, job: str, *, fresh: bool) -> None:  # noqa: B027 - optional hook
        """Called once on the driver before a job starts.

        ``fresh`` is true when the job starts from nothing (not resumed from a
        checkpoint), so a sink may clear output that an earlier run left.
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
    (not resumed) job clears the part files an earlier run left.
    """

    def __init__(self, folder: str | os.PathLike[str]):
        if not isinstance(folder, (str, os.PathLike)) or not os.fspath(folder):
            raise ConfigError(f"JsonLines needs an output folder path; got {folder!r}")
        self.folder = os.path.abspath(os.fspath(folder))

    def setup(self, job: str, *, fresh: bool) -> None:
        os.makedirs(self.folder, exist_ok=True)
        if fresh:
            patterns = ("part-*.jsonl", ".part-*.jsonl.commit", ".staging/*")
            for pattern in patterns:
                for path in glob.glob(os.path.join(self.folder, pattern)):
                    os.remove(path)

    def open(self, ctx: SinkContext) -> SinkWriter:
        return _JsonLinesWriter(self.folder, ctx)

    def __repr__(self) -> str:
        return f"JsonLines({self.folder!r})"


class _JsonLinesWriter(SinkWriter):
    def __init__(self, folder: str, ctx: SinkContext):
        self._ctx = ctx
        self._staging = os.path.join(folder, ".staging")
        os.makedirs(self._staging, exist_ok=True)
        self._part = os.path.join(folder, f"part-{ctx.partition:05d}.jsonl")
        self._marker = os.path.join(folder, f".part-{ctx.partition:05d}.jsonl.commit")
        self._current: IO[str] | None = None
        self._current_path = ""
        self._truncate_to_committed()

    def _read_marker(self) -> tuple[int, int]:
        try:
            with open(self._marker) as f:
                data = json.load(f)
            return int(data["checkpoint"]), int(data["size"])
        except FileNotFoundError:
            return 0, 0

    def _truncate_to_committed(self) -> None:
        # A crash in the middle of a commit can leave a partial append; the
        # marker holds the size of the part file after the last full commit.
        _, size = self._read_marker()
        if os.path.exists(self._part) and os.path.getsize(self._part) > size:
            with open(self._part, "r+b") as f:
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
        return {"staged": staged, "checkpoint": checkpoint_id}

    def commit(self, committable: Any) -> None:
        if committable is None:
            return
        staged, checkpoint = committable["staged"], committable["checkpoint"]
        done, size = self._read_marker()
        if checkpoint <= done:  # committed before (a re-issued commit)
            with contextlib.suppress(FileNotFoundError):
                os.remove(staged)
            return
        with open(self._part, "ab") as out:
            out.truncate(size)  # cut any partial append of an interrupted commit
            with open(staged, "rb") as src:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
            new_size = out.tell()
        tmp = self._marker + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"checkpoint": checkpoint, "size": new_size}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._marker)
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
