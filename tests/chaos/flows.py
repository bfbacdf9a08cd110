"""The jobs the chaos tests break, and what a run that never failed outputs."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import ray

import rayflow as rf

KEYS = 1000


def event(partition: int, offset: int) -> tuple[str, int]:
    """A replayable record: a function of its position only."""
    return f"k{(offset * 31 + partition * 7) % KEYS}", 1


def expected_counts(per_partition: int, partitions: int = 2) -> Counter[str]:
    counts: Counter[str] = Counter()
    for p in range(partitions):
        for i in range(per_partition):
            counts[event(p, i)[0]] += 1
    return counts


def expected_updates(per_partition: int, partitions: int = 2) -> list[tuple[str, int]]:
    """What a count emits with no failure: (key, 1), (key, 2), ... (key, n) per key."""
    counts = expected_counts(per_partition, partitions)
    return sorted((k, i) for k, n in counts.items() for i in range(1, n + 1))


def counting_flow(
    name: str,
    *,
    per_partition: int,
    rate: float | None,
    parallelism: int = 2,
    sinks: dict[str, rf.sinks.Sink],
    count_options: dict[str, Any] | None = None,
) -> rf.Dataflow:
    flow = rf.Dataflow(name, parallelism=parallelism)
    src = flow.source(
        "events",
        rf.sources.Generator(event, partitions=2, limit=per_partition, rate=rate),
    )
    counts = src.key_by("by_key", lambda e: e[0]).reduce(
        "count", lambda acc, e: acc + e[1], initial=0, **(count_options or {})
    )
    for step, sink in sinks.items():
        counts.sink(step, sink)
    return flow


def read_json_lines(folder: Path) -> list[tuple[str, int]]:
    return sorted(
        tuple(json.loads(line))  # type: ignore[misc]
        for f in sorted(folder.glob("part-*.jsonl"))
        for line in f.read_text().splitlines()
    )


def read_s3_json_lines(server: Any, bucket: str, prefix: str) -> list[tuple[str, int]]:
    client = server.client()
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode()
            out.extend(tuple(json.loads(line)) for line in body.splitlines())
    pending = client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
    assert not pending, f"uploads left open: {pending}"
    return sorted(out)  # type: ignore[arg-type]


def operator_actor_names(handle: rf.JobHandle) -> list[str]:
    return [
        f"rayflow/{handle.job}/{stage.name}/{p}"
        for stage in handle.plan.stages
        for p in range(stage.parallelism)
    ]


class Killer(threading.Thread):
    """Kills a random operator actor by its name, ``kills`` times, once the job runs again."""

    def __init__(self, handle: rf.JobHandle, *, kills: int, every_s: float, seed: int):
        super().__init__(daemon=True)
        self.handle = handle
        self.kills = kills
        self.every_s = every_s
        self.rng = random.Random(seed)
        self.killed: list[str] = []
        self.killed_at: list[float] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            names = operator_actor_names(self.handle)
            while len(self.killed) < self.kills:
                time.sleep(self.every_s)
                status = self.handle.status()
                if status.terminal:
                    return
                if status is not rf.JobStatus.RUNNING:
                    continue  # let the last recovery finish first
                name = self.rng.choice(names)
                try:
                    actor = ray.get_actor(name, namespace="rayflow")
                except ValueError:
                    continue
                self.killed_at.append(time.time())
                ray.kill(actor)
                self.killed.append(name)
        except BaseException as exc:  # surfaced by the test
            self.error = exc
