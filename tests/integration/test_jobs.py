"""The example jobs in jobs/, run as a person would (their main functions)."""

from __future__ import annotations

import json
import sys
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "jobs"))

import clickstream  # noqa: E402
import generator_to_s3  # noqa: E402


def _sessions_by_hand(pattern_folder: Path, gap: float) -> list[dict[str, Any]]:
    """A user's clicks, in time order, split where they stayed away longer than ``gap``."""
    events: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for path in sorted(pattern_folder.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            event = json.loads(line)
            events[event["user"]].append(event)
    sessions = []
    for user, evs in events.items():
        current: dict[str, Any] | None = None
        for e in sorted(evs, key=lambda e: e["ts"]):
            if current is not None and e["ts"] > current["end"]:
                sessions.append(current)
                current = None
            if current is None:
                current = {"user": user, "start": e["ts"], "clicks": 0, "pages": []}
            current["end"] = e["ts"] + gap
            current["clicks"] += 1
            current["pages"].append(e["page"])
        if current is not None:
            sessions.append(current)  # the end of the input closes every session
    return sessions


def _key(s: dict[str, Any]) -> tuple[Any, ...]:
    return (s["user"], s["start"], s["end"], s["clicks"], tuple(s["pages"]))


def test_clickstream_sessions_match_a_by_hand_sessionization(tmp_path: Path) -> None:
    out = tmp_path / "sessions"
    clickstream.main(["--output", str(out), "--generate", "4000", "--gap", "1800"])
    got = [
        json.loads(line) for p in out.glob("part-*.jsonl") for line in p.read_text().splitlines()
    ]
    expected = _sessions_by_hand(tmp_path / "clicks", 1800)
    assert sorted(map(_key, got)) == sorted(map(_key, expected))
    assert len(got) > 100


def test_generator_to_s3_writes_exactly_once_to_s3(
    s3_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = f"s3://rayflow-test/gen-{uuid.uuid4().hex[:8]}"
    generator_to_s3.main(["--s3", prefix, "--seconds", "3", "--rate", "3000", "--interval", "0.5"])
    printed = capsys.readouterr().out
    assert "job generator-to-s3 STOPPED: final checkpoint" in printed
    client = s3_server.client()
    bucket, key_prefix = "rayflow-test", prefix.split("/", 3)[3] + "/generator/output/"
    lines = []
    for obj in client.list_objects_v2(Bucket=bucket, Prefix=key_prefix).get("Contents", []):
        if "/part-" not in obj["Key"]:
            continue  # the sink's claim on the prefix
        body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode()
        lines.extend(json.loads(x) for x in body.splitlines())
    assert lines
    # Each user's counts were committed once each: 1, 2, ..., n with no gap or repeat.
    per_user: dict[str, list[int]] = defaultdict(list)
    for row in lines:
        per_user[row["user"]].append(row["views"])
    for views in per_user.values():
        assert sorted(views) == list(range(1, len(views) + 1))
    checkpoints = client.list_objects_v2(
        Bucket=bucket, Prefix=prefix.split("/", 3)[3] + "/generator/checkpoints/"
    )
    assert any(o["Key"].endswith("manifest.json") for o in checkpoints.get("Contents", []))
