"""The jobs the chaos tests break, and what a run that never failed outputs."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

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
    cost_s: float = 0.0,
) -> rf.Dataflow:
    """Counts per key; ``cost_s`` makes every count cost that long (so data queues up)."""
    flow = rf.Dataflow(name, parallelism=parallelism)
    src = flow.source(
        "events",
        rf.sources.Generator(event, partitions=2, limit=per_partition, rate=rate),
    )
    counts = src.key_by("by_key", lambda e: e[0]).reduce(
        "count", _adder(cost_s), initial=0, **(count_options or {})
    )
    for step, sink in sinks.items():
        counts.sink(step, sink)
    return flow


def _adder(cost_s: float) -> Any:
    if not cost_s:
        return lambda acc, e: acc + e[1]

    def add(acc: int, e: tuple[str, int]) -> int:
        time.sleep(cost_s)
        return acc + e[1]

    return add


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
            if not obj["Key"].rsplit("/", 1)[-1].startswith("part-"):
                continue  # the sink's claim on the prefix
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


# -- per key, in order --------------------------------------------------------------

Stream = list[tuple[str, int]]


def check_exactly_once(streams: dict[str, Stream], expected: Counter[str], what: str) -> None:
    """Every key's updates (key, 1) .. (key, n) appear once, each stream in order.

    ``streams`` are the output streams in the order they were written (one
    per partition file, collected partition, or object series). A key lives
    in one stream unless the job was rescaled; either way each stream must
    hold its updates of the key in increasing order, and all streams
    together exactly 1..n. Sorting the output would hide a replayed run of
    updates (3, 4, 3, 4); this does not.
    """
    seen: dict[str, list[int]] = {}
    for name, stream in streams.items():
        last: dict[str, int] = {}
        for position, record in enumerate(stream):
            key, count = record[0], record[1]
            if count <= last.get(key, 0):
                raise AssertionError(
                    f"{what}: key {key!r} in {name} goes back from {last[key]} to {count} "
                    f"at position {position}: {_key_updates(stream, key)[:30]}"
                )
            last[key] = count
            seen.setdefault(key, []).append(count)
    missing = sorted(set(expected) - set(seen))
    extra = sorted(set(seen) - set(expected))
    assert not missing and not extra, f"{what}: keys missing {missing[:5]}, unexpected {extra[:5]}"
    for key, n in expected.items():
        counts = sorted(seen[key])
        if counts != list(range(1, n + 1)):
            dup = [c for c, k in Counter(counts).items() if k > 1][:10]
            lost = sorted(set(range(1, n + 1)) - set(counts))[:10]
            raise AssertionError(
                f"{what}: key {key!r} has {len(counts)} updates for {n} records "
                f"(duplicated {dup}, lost {lost})"
            )


def _key_updates(stream: Stream, key: str) -> list[int]:
    return [c for k, c in stream if k == key]


def json_lines_streams(folder: Path) -> dict[str, Stream]:
    return {
        f.name: [tuple(json.loads(line)) for line in f.read_text().splitlines()]  # type: ignore[misc]
        for f in sorted(folder.glob("part-*.jsonl"))
    }


def s3_streams(server: Any, bucket: str, prefix: str) -> dict[str, Stream]:
    """One stream per partition: its committed objects in checkpoint order."""
    client = server.client()
    objects: dict[int, list[tuple[int, str]]] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            name = obj["Key"].rsplit("/", 1)[-1]
            if not name.startswith("part-"):
                continue
            fields = name[: -len(".jsonl")].split("-")
            objects.setdefault(int(fields[1]), []).append((int(fields[2]), obj["Key"]))
    pending = client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
    assert not pending, f"uploads left open: {pending}"
    streams: dict[str, Stream] = {}
    for partition, keys in sorted(objects.items()):
        stream: Stream = []
        for _, key in sorted(keys):
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
            stream.extend(tuple(json.loads(line)) for line in body.splitlines())  # type: ignore[misc]
        streams[f"partition {partition}"] = stream
    return streams


def collect_streams(result: rf.JobResult, step: str) -> dict[str, Stream]:
    return {
        f"partition {p}": [tuple(r) for r in records]  # type: ignore[misc]
        for p, records in sorted(result.output_partitions(step).items())
    }


def kill_after_checkpoints(handle: rf.JobHandle, actor: str, completed: int) -> rf.JobResult:
    """Kill ``actor`` once ``completed`` checkpoints completed and 0.2 s more passed
    (while data flows: its receivers consumed some of its output since the last
    one); return the job's result."""
    import ray

    deadline = time.monotonic() + 60
    while (handle.checkpoint_stats() or {}).get("completed", 0) < completed:
        assert time.monotonic() < deadline, "no checkpoint completed"
        time.sleep(0.05)
    time.sleep(0.2)
    ray.kill(ray.get_actor(actor, namespace="rayflow"), no_restart=True)
    result = handle.wait(timeout=180)
    assert result.status is rf.JobStatus.FINISHED, result.failures
    return result
