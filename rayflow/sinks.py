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
