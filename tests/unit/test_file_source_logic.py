"""TextFiles and S3Files below the runtime: offsets per file, regrouping, tailing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

import rayflow as rf
from rayflow._internal.checkpoint.manifest import (
    Manifest,
    ObjectInfo,
    OperatorSnapshot,
    describe_flow,
    encode_offset,
)
from rayflow._internal.checkpoint.restore import RestorePoint, assign
from rayflow._internal.connectors.files import key_regex, owner
from rayflow._internal.plan import build_plan


def _drain(reader: rf.sources.SourceReader, n: int = 1000) -> list[Any]:
    out: list[Any] = []
    while batch := reader.read(n):
        out.extend(batch)
    return out


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines))


def test_offsets_name_their_files_and_a_restore_matches_them_by_name(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        _write(tmp_path / f"{name}.txt", [f"{name}{i}" for i in range(10)])
    first = rf.sources.TextFiles(str(tmp_path / "*.txt"))
    assert first.partitions() == 3  # a partition per file
    offsets = {}
    for p in range(3):
        reader = first.open(p, None)
        assert reader.read(4) is not None
        offsets[p] = reader.offset()
    a, c = (str(tmp_path / f"{n}.txt") for n in "ac")
    assert offsets[0] == {"files": {a: len("a0\na1\na2\na3\n")}}
    assert encode_offset(offsets[0]) == {"json": offsets[0]}  # readable in the manifest
    # Resume with a file added before the others and one renamed: b.txt -> d.txt.
    _write(tmp_path / "0.txt", ["new"])
    (tmp_path / "b.txt").rename(tmp_path / "d.txt")
    second = rf.sources.TextFiles(str(tmp_path / "*.txt"))
    regrouped = second.restore_offsets(offsets)
    zero, d = str(tmp_path / "0.txt"), str(tmp_path / "d.txt")
    assert second.files == [zero, a, c, d]
    assert regrouped == {
        0: {"files": {zero: 0}},
        1: {"files": {a: offsets[0]["files"][a]}},
        2: {"files": {c: offsets[2]["files"][c]}},
        3: {"files": {d: 0}},  # a renamed file is a new file
    }
    read = {p: _drain(second.open(p, regrouped[p])) for p in range(4)}
    assert read == {
        0: ["new"],
        1: [f"a{i}" for i in range(4, 10)],
        2: [f"c{i}" for i in range(4, 10)],
        3: [f"b{i}" for i in range(10)],
    }


def test_an_offset_for_another_file_is_refused_not_applied(tmp_path: Path) -> None:
    _write(tmp_path / "a.txt", ["x"])
    _write(tmp_path / "b.txt", ["y"])
    source = rf.sources.TextFiles(str(tmp_path / "*.txt"))
    with pytest.raises(rf.ConfigError, match=r"names .*a\.txt, which this partition does not"):
        source.open(1, {"files": {str(tmp_path / "a.txt"): 2}})


def test_an_old_format_offset_fails_with_a_clear_error(tmp_path: Path) -> None:
    _write(tmp_path / "a.txt", ["x"])
    source = rf.sources.TextFiles(str(tmp_path / "*.txt"))
    with pytest.raises(rf.ConfigError, match="older TextFiles"):
        source.restore_offsets({0: 123})
    # ... and through a restore: the checkpoint of an older rayflow.
    flow = rf.Dataflow("j")
    flow.source("src", source).sink("out", rf.testing.Collect())
    plan = build_plan(flow.spec())
    obj = ObjectInfo("j/checkpoints/0000000001/src-0-r.snapshot", 1, "x", 1, "plain")
    op = OperatorSnapshot("src", 0, obj, None, None, (), sources={"src": {"0": {"json": 3}}})
    manifest = Manifest("j", 1, "checkpoint", 0.0, 1.0, describe_flow(plan), (op,))
    with pytest.raises(
        rf.ConfigError, match=r"checkpoint 1, source step .src.: TextFiles\(.*older TextFiles"
    ):
        assign(plan, RestorePoint("/s", manifest))


def test_hashed_partitions_own_each_file_once_and_regroup_at_another_count(
    tmp_path: Path,
) -> None:
    for i in range(12):
        _write(tmp_path / f"f{i}.txt", [f"f{i}-{j}" for j in range(3)])
    two = rf.sources.TextFiles(str(tmp_path / "*.txt"), partitions=2)
    assert two.partitions() == 2
    offsets, seen = {}, []
    for p in range(2):
        reader = two.open(p, None)
        seen.extend(reader.read(5) or [])
        offsets[p] = reader.offset()
        assert all(owner(f, 2) == p for f in offsets[p]["files"])
    three = rf.sources.TextFiles(str(tmp_path / "*.txt"), partitions=3)
    regrouped = three.restore_offsets(offsets)
    rest = [line for p in range(3) for line in _drain(three.open(p, regrouped[p]))]
    expected = {f"f{i}-{j}" for i in range(12) for j in range(3)}
    assert sorted(seen + rest) == sorted(expected)  # nothing repeated, nothing skipped


def test_tailing_reads_new_files_appended_lines_and_waits_for_a_newline(
    tmp_path: Path,
) -> None:
    source = rf.sources.TextFiles(str(tmp_path / "*.log"), tail=True, poll_s=0.01)
    assert not source.bounded and source.partitions() == 1
    reader = source.open(0, None)
    assert reader.read(10) == []  # nothing yet: empty, never None
    log = tmp_path / "a.log"
    log.write_text("one\ntw")
    time.sleep(0.02)
    assert reader.read(10) == ["one"]  # "tw" has no newline yet
    with log.open("a") as f:
        f.write("o\nthree\n")
    time.sleep(0.02)
    assert reader.read(10) == ["two", "three"]
    offset = reader.offset()
    assert offset == {"files": {str(log): len("one\ntwo\nthree\n")}}
    _write(tmp_path / "b.log", ["b1"])
    time.sleep(0.02)
    assert reader.read(10) == ["b1"]
    # A restore continues each file at its position; a truncated file starts over.
    again = source.open(0, offset)
    time.sleep(0.02)
    assert sorted(again.read(10) or []) == ["b1"]
    log.write_text("x\n")
    time.sleep(0.02)
    assert again.read(10) == ["x"]
    # A file that disappears is forgotten.
    (tmp_path / "b.log").unlink()
    time.sleep(0.02)
    assert again.read(10) == []
    assert set(again.offset()["files"]) == {str(log)}


def test_tailing_checks_for_new_files_every_poll_s(tmp_path: Path) -> None:
    source = rf.sources.TextFiles(str(tmp_path / "*.log"), tail=True, poll_s=0.3)
    reader = source.open(0, None)
    assert reader.read(10) == []
    _write(tmp_path / "a.log", ["late"])
    assert reader.read(10) == []  # not listed again yet
    time.sleep(0.35)
    assert reader.read(10) == ["late"]


def test_a_tailing_source_with_no_match_yet_is_fine_a_bounded_one_is_not(
    tmp_path: Path,
) -> None:
    assert rf.sources.TextFiles(str(tmp_path / "*.x"), tail=True).files == []
    with pytest.raises(rf.ConfigError, match="matched no files"):
        rf.sources.TextFiles(str(tmp_path / "*.x"))
    with pytest.raises(rf.ConfigError, match="partitions must be"):
        rf.sources.TextFiles(str(tmp_path / "*.x"), tail=True, partitions=0)
    with pytest.raises(rf.ConfigError, match="poll_s must be"):
        rf.sources.TextFiles(str(tmp_path / "*.x"), tail=True, poll_s=0)
    with pytest.raises(rf.ConfigError, match=r"s3://bucket/prefix"):
        rf.sources.S3Files("bucket/x/*.jsonl")


def test_s3_key_globs_keep_star_within_a_level() -> None:
    assert key_regex("in/*.jsonl").fullmatch("in/a.jsonl")
    assert not key_regex("in/*.jsonl").fullmatch("in/sub/a.jsonl")
    assert key_regex("in/**/*.jsonl").fullmatch("in/sub/deep/a.jsonl")
    assert key_regex("in/**/*.jsonl").fullmatch("in/a.jsonl")
    assert key_regex("in/part-[0-9].txt").fullmatch("in/part-3.txt")
    assert not key_regex("in/part-[!0-9].txt").fullmatch("in/part-3.txt")
    assert key_regex("a+b/?.txt").fullmatch("a+b/x.txt")
