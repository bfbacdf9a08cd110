"""What the Kafka tests share: producing input, reading output back per key, waiting."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from typing import Any

import rayflow as rf
from tests.support.kafka_broker import Record, read_topic

COMMIT_HEADER = "rayflow.commit"


def produce(
    bootstrap: str,
    topic: str,
    records: list[tuple[bytes | None, bytes]],
    partition: int | None = None,
) -> None:
    """Send ``(key, value)`` records (not transactional) and wait until they are written."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    where = {} if partition is None else {"partition": partition}
    for key, value in records:
        while True:
            try:
                producer.produce(topic, value, key, **where)
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(30) == 0


def produce_one_by_one(bootstrap: str, topic: str, partition: int, values: list[bytes]) -> None:
    """One record per batch. tansu 0.6.0 reports a partition's end offset as one past the
    first record of its last batch, so a test of start="latest" keeps batches single."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    for value in values:
        producer.produce(topic, value, partition=partition)
        assert producer.flush(10) == 0


class Feeder(threading.Thread):
    """Produces ``events`` (key i % keys, value 1) at ``rate`` per second while a job runs."""

    def __init__(self, bootstrap: str, topic: str, events: int, keys: int, rate: float):
        super().__init__(daemon=True, name="kafka-feeder")
        self.bootstrap, self.topic = bootstrap, topic
        self.events, self.keys, self.rate = events, keys, rate
        self.error: BaseException | None = None

    def expected(self) -> Counter[str]:
        return Counter(f"k{i % self.keys}" for i in range(self.events))

    def run(self) -> None:
        try:
            from confluent_kafka import Producer

            # Idempotent: a retried produce cannot put an event into the input twice.
            producer = Producer(
                {"bootstrap.servers": self.bootstrap, "linger.ms": 5, "enable.idempotence": True}
            )
            started = time.monotonic()
            for i in range(self.events):
                producer.produce(self.topic, b"1", f"k{i % self.keys}".encode())
                if i % 200 == 0:
                    producer.poll(0)
                    ahead = started + i / self.rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
            assert producer.flush(30) == 0
        except BaseException as exc:
            self.error = exc


def keyed_sum_flow(
    name: str, bootstrap: str, source_topics: str | list[str], sink_topic: str, parallelism: int = 2
) -> rf.Dataflow:
    """Kafka -> (key, 1) -> running sum per key -> Kafka (key, sum as JSON)."""
    flow = rf.Dataflow(name, parallelism=parallelism)
    events = flow.source("in", rf.sources.Kafka(bootstrap, source_topics))
    pairs = events.map("decode", lambda m: (m.key.decode(), int(m.value)))
    sums = pairs.key_by("by_key", lambda kv: kv[0]).reduce(
        "sum", lambda acc, kv: acc + kv[1], initial=0
    )
    sums.sink("out", rf.sinks.Kafka(bootstrap, sink_topic))
    return flow


def committed_attempts(records: list[Record]) -> tuple[list[Record], int]:
    """The records of the attempts that committed, and how many attempts were dropped.

    Each commit attempt marks its records with ``rayflow.commit`` =
    ``partition:run:checkpoint:attempt``. Attempts of one committable run one
    after another (a later one starts only after ``init_transactions`` fenced
    and aborted the earlier one), so only the last can have committed. A broker
    that filters aborted transactions for ``read_committed`` shows one attempt per
    committable anyway; tansu 0.6.0 shows them all, and this picks the last.
    """
    first_seen: dict[tuple[bytes, bytes], float] = {}
    for r in records:
        marker = r.headers[COMMIT_HEADER]
        committable, _, attempt = marker.rpartition(b":")
        seen = first_seen.get((committable, attempt))
        if seen is None or r.timestamp < seen:
            first_seen[(committable, attempt)] = r.timestamp
    last: dict[bytes, tuple[float, bytes]] = {}
    for (committable, attempt), started in first_seen.items():
        if committable not in last or started > last[committable][0]:
            last[committable] = (started, attempt)
    keep = {committable + b":" + attempt for committable, (_, attempt) in last.items()}
    dropped = len(first_seen) - len(last)
    return [r for r in records if r.headers[COMMIT_HEADER] in keep], dropped


def sum_streams(
    bootstrap: str, topic: str, *, filters_aborted: bool
) -> tuple[dict[str, list[tuple[str, int]]], int]:
    """The output, one stream of (key, sum) per topic partition in offset order, read with
    read_committed; and how many aborted attempts had to be dropped (see above)."""
    records = read_topic(bootstrap, topic, "read_committed")
    dropped = 0
    if not filters_aborted:
        records, dropped = committed_attempts(records)
    streams: dict[str, list[tuple[str, int]]] = {}
    for r in records:
        assert r.key is not None and r.value is not None
        streams.setdefault(f"partition {r.partition}", []).append(
            (r.key.decode(), json.loads(r.value))
        )
    return streams, dropped


class OutputWatch:
    """Follows an output topic of (key, running sum) as it grows (any isolation: it only
    says when to stop the job; the check reads the topic again afterwards)."""

    def __init__(self, bootstrap: str, topic: str):
        from confluent_kafka import Consumer, TopicPartition

        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": "watch",
                "enable.auto.commit": False,
                "enable.partition.eof": False,
            }
        )
        partitions = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self.consumer.assign([TopicPartition(topic, p, -2) for p in partitions])
        self.highest: dict[str, int] = {}

    def reached(self, expected: Counter[str]) -> bool:
        """Whether every key's sum got to its expected count (reads what came meanwhile)."""
        while batch := self.consumer.consume(10_000, timeout=0.2):
            for m in batch:
                if m.error() is None and m.key() is not None:
                    key = m.key().decode()  # type: ignore[union-attr]
                    self.highest[key] = max(self.highest.get(key, 0), json.loads(m.value()))
        return all(self.highest.get(k, 0) >= n for k, n in expected.items())

    def close(self) -> None:
        self.consumer.close()


def lag_is_zero(handle: rf.JobHandle, step: str = "in") -> bool:
    """Every reader of ``step`` is at the end its last fetch saw."""
    try:
        entries = handle.metrics()[step]
    except Exception:
        return False
    return bool(entries) and all(e.get("kafka_lag") == 0 for e in entries)


def caught_up(handle: rf.JobHandle, step: str = "in", for_s: float = 1.5) -> None:
    """Wait until the lag stayed 0 for ``for_s``: a fetch under way may bring more (the
    lag is as of the last fetch, which a caught-up consumer repeats about every 0.5 s;
    after a lost connection, not until it reconnects, which backs off up to 10 s)."""
    since: float | None = None
    deadline = time.monotonic() + 90
    while True:
        assert time.monotonic() < deadline, "the sources did not catch up in 90 s"
        if lag_is_zero(handle, step):
            since = since or time.monotonic()
            if time.monotonic() - since >= for_s:
                return
        else:
            since = None
        time.sleep(0.1)


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not reached in {timeout} s"
        time.sleep(0.2)
