"""TextFiles and S3Files in jobs: a prefix glob read exactly, tailing, kills, changed globs.

S3 objects live on the session's loopback S3 server (tests/conftest.py).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import rayflow as rf
from rayflow._internal.checkpoint.restore import open_restore_point

BUCKET = "rayflow-test"


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not reached in {timeout} s"
        time.sleep(0.1)


def _records_out(handle: rf.JobHandle, step: str) -> int:
    return sum(int(p.get("records_out", 0)) for p in handle.metrics().get(step, []))


def _put(server: Any, key: str, body: str) -> None:
    server.client().put_object(Bucket=BUCKET, Key=key, Body=body.encode())


def test_s3_files_read_exactly_the_objects_a_prefix_glob_matches(s3_server: Any) -> None:
    prefix = f"s3files-{uuid.uuid4().hex[:8]}"
    big = [f"big {i} " + "x" * (i % 90) for i in range(20_000)]  # ~1.2 MB: several buffers
    objects = {
        "in/a.jsonl": "a1\na2\na3\n",
        "in/b.jsonl": "b1\r\nb2\r\nb-last-without-newline",
        "in/big.jsonl": "".join(f"{line}\n" for line in big),
        "in/sub/nested.jsonl": "not matched: * stays within a level\n",
        "in/a.txt": "not matched: another suffix\n",
        "other/c.jsonl": "not matched: another prefix\n",
    }
    for key, body in objects.items():
        _put(s3_server, f"{prefix}/{key}", body)
    uri = f"s3://{BUCKET}/{prefix}/in/*.jsonl"
    per_object = rf.sources.S3Files(uri)
    assert per_object.partitions() == 3
    expected = ["a1", "a2", "a3", "b1", "b2", "b-last-without-newline", *big]
    flow = rf.Dataflow("s3files-glob", parallelism=2)
    flow.source("objects", per_object).sink("per_object", rf.testing.Collect())
    hashed = rf.sources.S3Files(uri, partitions=2)
    flow.source("hashed", hashed).sink("by_hash", rf.testing.Collect())
    result = rf.run(flow)
    assert result.status is rf.JobStatus.FINISHED
    assert sorted(result.output("per_object")) == sorted(expected)
    assert sorted(result.output("by_hash")) == sorted(expected)
    # Each object's lines in order, whichever partition read it.
    big_seen = [line for line in result.output("per_object") if line.startswith("big ")]
    assert big_seen == big


def test_s3_files_read_on_exactly_through_cut_connections(
    s3_server: Any, s3_proxy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A GET cut mid-object is opened again at the last line returned: nothing lost or doubled."""
    key = f"cut-{uuid.uuid4().hex[:8]}/big.jsonl"
    # ~16 MB: more than the socket buffers hold, so that a cut loses bytes under way.
    lines = [f"{i:07d} " + "y" * (i % 80) for i in range(330_000)]
    _put(s3_server, key, "".join(f"{line}\n" for line in lines))
    source = rf.sources.S3Files(f"s3://{BUCKET}/{key}", poll_s=0.05)
    reader = source.open(0, None)
    got = list(reader.read(1_000) or [])
    s3_proxy.faults(drop_rate=0.5)  # cuts the open GET; half of the new ones too
    while (batch := reader.read(20_000)) is not None:
        got.extend(batch)
    assert "trying again" in caplog.text  # the reader's own retry, not only boto3's
    assert got == lines
    reader.close()


def test_tailing_picks_up_new_files_objects_and_appended_lines(
    tmp_path: Path, s3_server: Any
) -> None:
    prefix = f"tail-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "a.log"
    log.write_text("a1\na2\na3-par")  # the last line is not complete yet
    _put(s3_server, f"{prefix}/o1.jsonl", "o1\n")
    flow = rf.Dataflow("tailing", parallelism=2)
    files = rf.sources.TextFiles(str(tmp_path / "*.log"), tail=True, poll_s=0.2, partitions=2)
    flow.source("files", files).sink("file_lines", rf.testing.Collect())
    objects = rf.sources.S3Files(f"s3://{BUCKET}/{prefix}/*.jsonl", tail=True, poll_s=0.2)
    flow.source("objects", objects).sink("object_lines", rf.testing.Collect())
    handle = rf.start(flow, runtime=rf.RuntimeConfig(metrics_interval_s=0.2))
    try:
        _wait_for(lambda: _records_out(handle, "files") == 2, "the complete lines of a.log")
        _wait_for(lambda: _records_out(handle, "objects") == 1, "the first object")
        with log.open("a") as f:
            f.write("t\na4\n")
        (tmp_path / "b.log").write_text("b1\nb2\n")
        (tmp_path / "b.txt").write_text("not matched\n")
        _put(s3_server, f"{prefix}/o2.jsonl", "o2-1\no2-2\n")
        _put(s3_server, f"{prefix}/o1.jsonl", "o1\no1-more\n")  # the object grew
        _wait_for(lambda: _records_out(handle, "files") == 6, "appended lines and a new file")
        _wait_for(lambda: _records_out(handle, "objects") == 4, "a new and a grown object")
        assert handle.status() is rf.JobStatus.RUNNING  # tailing never ends by itself
    finally:
        result = handle.stop()
    assert result.status is rf.JobStatus.STOPPED
    assert sorted(result.output("file_lines")) == ["a1", "a2", "a3-part", "a4", "b1", "b2"]
    assert sorted(result.output("object_lines")) == ["o1", "o1-more", "o2-1", "o2-2"]


class _Writer(threading.Thread):
    """Appends numbered lines to files (some created on the way), a line sometimes in halves."""

    def __init__(self, folder: Path, files: int, lines: int):
        super().__init__(daemon=True)
        self.folder, self.files, self.lines = folder, files, lines
        self.written: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for i in range(self.lines):
                for f in range(self.files):
                    if f >= 2 and i < self.lines // 3:
                        continue  # files 2.. appear a third of the way through
                    line = f"f{f}-{i:05d}"
                    with (self.folder / f"f{f}.log").open("a") as out:
                        if i % 7 == 0:  # a partial line the readers must wait for
                            out.write(line[:3])
                            out.flush()
                            time.sleep(0.002)
                            out.write(line[3:] + "\n")
                        else:
                            out.write(line + "\n")
                    self.written.append(line)
                if i % 20 == 0:
                    time.sleep(0.02)
        except BaseException as exc:  # reported by the test
            self.error = exc


def _committed_lines(folder: Path) -> list[str]:
    """The lines the JsonLines sink committed so far (complete JSON lines only)."""
    out = []
    for part in sorted(folder.glob("part-*.jsonl")):
        for line in part.read_text().split("\n")[:-1]:
            out.append(json.loads(line)[1])
    return out


def test_tailing_is_exactly_once_under_kills(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    writer = _Writer(data, files=4, lines=600)
    (data / "f0.log").write_text("")
    flow = rf.Dataflow("tail-chaos", parallelism=2)
    lines = flow.source(
        "lines", rf.sources.TextFiles(str(data / "*.log"), tail=True, poll_s=0.1, partitions=3)
    )
    per_file = lines.key_by("by_file", lambda line: line.split("-")[0]).stateful_map(
        "number", lambda n, line: ((n or 0) + 1, [line])
    )
    per_file.sink("out", rf.sinks.JsonLines(out))
    handle = rf.start(
        flow, checkpoint=rf.Checkpointing(storage=str(tmp_path / "cp"), interval_s=0.25)
    )
    monkey = rf.testing.chaos(
        handle, seed=3, kills=2, targets=("sources", "operators"), every_s=0.6
    )
    try:
        writer.start()
        writer.join(60)
        assert writer.error is None and not writer.is_alive()
        total = len(writer.written)
        _wait_for(lambda: len(monkey.kills) >= 2, "two kills", timeout=30)
        _wait_for(lambda: len(_committed_lines(out)) >= total, "every line committed", 60)
    finally:
        monkey.stop()
        result = handle.stop()
    monkey.check()
    assert result.restarts >= 1, (monkey.kills, result.recoveries)
    # A tailing partition re-reads its files in another interleaving: never alone (P6).
    assert all(r["scope"] == "global" for r in result.recoveries), result.recoveries
    seen = Counter(_committed_lines(out))
    assert set(seen) == set(writer.written)
    assert [line for line, n in seen.items() if n != 1] == []  # each line exactly once
    # Per file, in the order written (a key's updates are in order through the shuffle).
    for f in range(4):
        mine = [line for line in _committed_lines(out) if line.startswith(f"f{f}-")]
        assert mine == sorted(mine), f"f{f} out of order"


def test_a_changed_glob_on_restore_never_applies_an_offset_to_another_file(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    contents = {name: [f"{name}{i:04d}" for i in range(300)] for name in ("a", "b", "c")}
    for name, lines in contents.items():
        (data / f"{name}.txt").write_text("".join(f"{line}\n" for line in lines))

    def slowly(line: str) -> str:
        time.sleep(0.002)  # fused with the source: the source reads at this pace
        return line

    def flow() -> rf.Dataflow:
        f = rf.Dataflow("changed-glob", parallelism=1)
        src = f.source("lines", rf.sources.TextFiles(str(data / "*.txt")))
        src.map("slowly", slowly).sink("out", rf.testing.Collect())
        return f

    config = rf.Checkpointing(storage=str(tmp_path / "cp"), interval_s=60.0)
    handle = rf.start(flow(), checkpoint=config, runtime=rf.RuntimeConfig(metrics_interval_s=0.2))
    _wait_for(lambda: _records_out(handle, "slowly") >= 100, "the first lines")
    savepoint = tmp_path / "sp"
    first = handle.stop(savepoint=savepoint)
    offsets = open_restore_point(str(savepoint)).manifest.sources["lines"]
    positions = {Path(f).name: p for o in offsets.values() for f, p in o["files"].items()}
    total = sum((data / f"{n}.txt").stat().st_size for n in contents)
    assert 0 < sum(positions.values()) < total, positions  # stopped partway
    # Before the restore: a file that sorts first is added (it takes partition 0) and
    # b.txt is renamed (so c.txt moves to another partition index as well).
    (data / "0.txt").write_text("new1\nnew2\n")
    (data / "b.txt").rename(data / "d.txt")
    second = rf.run(flow(), checkpoint=config, restore_from=savepoint)
    assert second.status is rf.JobStatus.FINISHED
    both = Counter(first.output("out")) + Counter(second.output("out"))
    for name in ("a", "c"):  # continued where they stopped: every line exactly once
        assert [both[line] for line in contents[name]] == [1] * 300, name
    assert second.output("out").count("new1") == 1  # the new file, from its start
    assert sorted(line for line in second.output("out") if line.startswith("b")) == contents["b"]
    assert [n for n in first.output("out") if n.startswith("new")] == []
