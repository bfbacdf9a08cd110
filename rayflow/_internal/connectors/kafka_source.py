"""``rf.sources.Kafka``: topic partitions read by offset, replayed exactly from checkpoints.

- **Partitions.** One source partition per topic partition, numbered in
  ``(topic, partition)`` order over every topic given. The list is taken
  once, on the driver, the first time the plan asks (``partitions()``, or
  when the source is pickled to be sent to the operators), and travels
  with the plan: every actor and every restart of the run reads the same
  list. Partitions added to a topic while a job runs are picked up when
  the job is next started (``resume=True`` or ``restore_from=``), and
  read from their beginning. Offsets name their topic and partition, and
  a restore moves each to the number its topic partition has now
  (``restore_offsets``), so partitions added to one topic never put an
  offset on another.
- **Offsets live in checkpoints**, as ``{"topic", "partition", "offset"}``
  (the next offset to read). A reader is a consumer of its own that is
  *assigned* its partition at that offset: no consumer-group membership,
  no rebalancing, and no offsets committed to Kafka (``group.id`` is only a
  name that shows in the brokers' logs). A restore reopens every reader
  exactly where the checkpoint says, so nothing is read twice or skipped.
- **start**: ``"earliest"`` begins at the start of each partition;
  ``"latest"`` at the end offsets taken when the partition list is taken
  (the first start), so a restart before the first checkpoint still begins
  there, not at a later end.
- An offset Kafka no longer has (retention deleted it) fails the job
  (``auto.offset.reset`` is ``"error"``) instead of silently skipping
  records; set it in ``config`` to accept the loss.
- **Records** are :class:`KafkaMessage` tuples; ``timestamp`` (seconds) is
  the record's Kafka timestamp and serves as event time:
  ``.with_event_time("ts", lambda m: m.timestamp)``.
- **Lag**: each reader's backlog is the partition's high watermark as the
  last fetch response gave it (no extra request) minus the reader's
  position: ``source_backlog``, ``kafka_lag`` (the sum over the operator
  partition's readers) and ``kafka_lag_by_partition`` (``{"topic[p]": lag}``)
  in the metrics, and the
  ``backlog_growing`` alert. It is as fresh as the last fetch: a caught-up
  consumer fetches about every 0.5 s, one that lost its broker only once it
  reconnected.
- **Connections**: librdkafka reconnects by itself (within 2 s of the
  brokers' return here); errors it reports meanwhile are logged (at most one
  per kind and client every 10 s, logger ``rayflow.kafka``), not raised. An
  offset out of range, a lost authorization or a fatal error fails the job.
- Transactions: ``isolation.level`` is ``read_committed`` (librdkafka's
  default), so only committed transactions are read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from rayflow._internal.extras import require_installed
from rayflow.errors import ConfigError
from rayflow.sources import Source, SourceReader

if TYPE_CHECKING:
    from confluent_kafka import Consumer

__all__ = ["Kafka", "KafkaMessage"]

log = logging.getLogger("rayflow")

#: A consumer error that is not fatal is logged at most this often per reader.
ERROR_LOG_EVERY_S = 10.0


class _OncePer(logging.Filter):
    """Lets one message of a kind (librdkafka's facility, e.g. FAIL) through per client
    every ``seconds``: a client retries a lost broker every few ms, and says so each time."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        kind = " ".join(message.split(" ", 2)[:2])  # "FAIL [rdkafka#consumer-1]"
        now = time.monotonic()
        if now - self._last.get(kind, -self.seconds) < self.seconds:
            return False
        self._last[kind] = now
        return True


#: librdkafka's own messages (connections lost, brokers down) go here, not to stderr.
client_log = logging.getLogger("rayflow.kafka")
client_log.addFilter(_OncePer(ERROR_LOG_EVERY_S))

#: How long listing topics and end offsets may take on the driver.
DISCOVERY_TIMEOUT_S = 15.0
#: librdkafka's symbolic offset "the beginning of the partition".
OFFSET_BEGINNING = -2

#: Defaults of every client. librdkafka 2.16's "rebootstrap" recovery (after all
#: brokers were unreachable for a moment) can leave a transactional producer waiting
#: for a coordinator forever ("No brokers available for Transactions"), found with a
#: broker cut off for 3 s; the older recovery (keep the known brokers) does not.
CLIENT_DEFAULTS: dict[str, Any] = {
    "metadata.recovery.strategy": "none",
    # Back at work within 2 s of the brokers' return (librdkafka waits up to 10 s).
    "reconnect.backoff.max.ms": 2000,
    "logger": client_log,
}

#: Consumer settings rayflow owns: exact replay depends on them.
_FIXED = {"enable.auto.commit": False, "enable.auto.offset.store": False}


class KafkaMessage(NamedTuple):
    """A record read from Kafka.

    ``key`` and ``value`` are the raw bytes (or None); ``timestamp`` is the
    record's timestamp in seconds since the epoch (None if the broker gave
    none); ``offset`` is its position in ``topic``'s ``partition``.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: float | None


def bootstrap_of(what: str, bootstrap_servers: Any) -> str:
    """``"host:port,host:port"`` from a string or a list of them."""
    if isinstance(bootstrap_servers, str):
        servers = bootstrap_servers.strip()
    elif isinstance(bootstrap_servers, Sequence) and all(
        isinstance(s, str) for s in bootstrap_servers
    ):
        servers = ",".join(s.strip() for s in bootstrap_servers)
    else:
        servers = ""
    if not servers:
        raise ConfigError(
            f"{what} needs bootstrap_servers such as 'localhost:9092' (or a list of "
            f"'host:port'); got {bootstrap_servers!r}"
        )
    return servers


def config_of(what: str, config: Any) -> dict[str, Any]:
    """A copy of the librdkafka settings passed through (security, timeouts, ...)."""
    if config is None:
        return {}
    if not isinstance(config, Mapping) or not all(isinstance(k, str) for k in config):
        raise ConfigError(
            f"{what} config must be a dict of librdkafka settings such as "
            f"{{'security.protocol': 'SASL_SSL'}}; got {config!r}"
        )
    return dict(config)


def kafka_error(exc: BaseException) -> Any:
    """The ``KafkaError`` a ``KafkaException`` carries, or None."""
    args = getattr(exc, "args", ())
    if args and hasattr(args[0], "code") and hasattr(args[0], "retriable"):
        return args[0]
    return None


class Kafka(Source):
    """Records of Kafka topics; one source partition per topic partition.

    ``topics`` is a topic name or a list of them; ``start`` is
    ``"earliest"`` or ``"latest"`` (where a job without a checkpoint
    begins); ``config`` passes librdkafka settings to the consumers (e.g.
    ``security.protocol``, ``sasl.*``, ``group.id``). Unbounded: the job
    runs until it is stopped. Offsets are kept in rayflow's checkpoints,
    never committed to Kafka. See the module's documentation for how
    partitions are numbered and found.
    """

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str],
        topics: str | Sequence[str],
        *,
        start: str = "earliest",
        config: Mapping[str, Any] | None = None,
    ):
        what = "rf.sources.Kafka"
        self.bootstrap_servers = bootstrap_of(what, bootstrap_servers)
        if isinstance(topics, str):
            topic_list = [topics]
        elif isinstance(topics, Sequence) and all(isinstance(t, str) for t in topics):
            topic_list = list(topics)
        else:
            topic_list = []
        if not topic_list or not all(t.strip() for t in topic_list):
            raise ConfigError(f"{what} needs a topic name or a list of them; got {topics!r}")
        if len(set(topic_list)) != len(topic_list):
            raise ConfigError(f"{what}: a topic is listed twice in {topic_list!r}")
        if start not in ("earliest", "latest"):
            raise ConfigError(f"{what} start must be 'earliest' or 'latest'; got {start!r}")
        self.config = config_of(what, config)
        for key, value in _FIXED.items():
            if key in self.config and self.config[key] not in (value, str(value).lower()):
                raise ConfigError(
                    f"{what}: config {key}={self.config[key]!r} is not allowed: offsets live "
                    "in rayflow's checkpoints, never in Kafka"
                )
        # Here, not in the operators: a missing extra is a mistake to name at once.
        require_installed("confluent_kafka", what, "kafka")
        self.topics: tuple[str, ...] = tuple(topic_list)
        self.start = start
        # Taken once (on the driver) and shipped with the plan: see partitions().
        self._partitions: tuple[tuple[str, int], ...] | None = None
        self._start_offsets: dict[tuple[str, int], int] = {}

    # -- the partition list ---------------------------------------------------

    def partitions(self) -> int:
        """How many topic partitions there are; listed once, then fixed for the run."""
        return len(self.topic_partitions())

    def topic_partitions(self) -> tuple[tuple[str, int], ...]:
        """``(topic, partition)`` of every source partition, in source-partition order."""
        if self._partitions is None:
            self._discover()
        assert self._partitions is not None
        return self._partitions

    def __getstate__(self) -> dict[str, Any]:
        # The plan is pickled on the driver before any actor starts: list the
        # partitions now, so that every actor gets the same list.
        self.topic_partitions()
        return dict(self.__dict__)

    def _discover(self) -> None:
        from confluent_kafka import Consumer, KafkaException, TopicPartition

        consumer = Consumer(self._consumer_config())
        try:
            try:
                metadata = consumer.list_topics(timeout=DISCOVERY_TIMEOUT_S)
            except KafkaException as exc:
                raise ConfigError(
                    f"rf.sources.Kafka could not list the topics at {self.bootstrap_servers} "
                    f"within {DISCOVERY_TIMEOUT_S:.0f} s: {exc}; check bootstrap_servers and "
                    "that the brokers are up"
                ) from None
            found: list[tuple[str, int]] = []
            for topic in self.topics:
                info = metadata.topics.get(topic)
                if info is None:
                    known = ", ".join(sorted(t for t in metadata.topics if not t.startswith("__")))
                    raise ConfigError(
                        f"rf.sources.Kafka: topic {topic!r} does not exist at "
                        f"{self.bootstrap_servers} (topics there: {known or 'none'}); create it "
                        "first"
                    )
                if info.error is not None:
                    raise ConfigError(
                        f"rf.sources.Kafka: topic {topic!r} at {self.bootstrap_servers}: "
                        f"{info.error}"
                    )
                found.extend((topic, p) for p in info.partitions)
            found.sort()
            if self.start == "latest":
                ends = {}
                for topic, p in found:
                    try:
                        _, high = consumer.get_watermark_offsets(
                            TopicPartition(topic, p), timeout=DISCOVERY_TIMEOUT_S
                        )
                    except KafkaException as exc:
                        raise ConfigError(
                            f"rf.sources.Kafka could not read the end offset of {topic}[{p}] "
                            f"at {self.bootstrap_servers}: {exc}"
                        ) from None
                    ends[(topic, p)] = int(high)
                self._start_offsets = ends
            self._partitions = tuple(found)
        finally:
            consumer.close()

    def _consumer_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "group.id": "rayflow",  # a name only: nothing is committed, no group is joined
            "auto.offset.reset": "error",
            "enable.partition.eof": False,
            "queued.max.messages.kbytes": 16384,  # prefetch per partition
            **CLIENT_DEFAULTS,
            **self.config,
            "bootstrap.servers": self.bootstrap_servers,
        }
        config.update(_FIXED)
        return config

    def restore_offsets(self, offsets: dict[int, Any]) -> dict[int, Any]:
        """Move each checkpointed offset to the source partition of its topic partition now.

        Offsets name their topic and partition, so partitions added since the
        checkpoint (which renumber those after them) do not misplace them.
        A partition that the checkpoint does not know (added since, or of a
        topic added to ``topics``) starts at its beginning, as Flink's Kafka
        source does with partitions it discovers; an offset of a topic no
        longer listed is dropped.
        """
        index = {tp: i for i, tp in enumerate(self.topic_partitions())}
        placed: dict[int, Any] = {}
        for sp, offset in sorted(offsets.items()):
            if not (isinstance(offset, dict) and {"topic", "partition", "offset"} <= set(offset)):
                raise ConfigError(
                    f"source partition {sp}'s offset {offset!r} is not a Kafka offset (a "
                    "checkpoint of another kind of source?); restore it with the source it "
                    "was written by"
                )
            where = index.get((offset["topic"], offset["partition"]))
            if where is None:
                log.warning(
                    "Kafka source: %s[%s] is not among the partitions of %s now; its offset "
                    "%s is dropped",
                    offset["topic"],
                    offset["partition"],
                    list(self.topics),
                    offset["offset"],
                )
                continue
            placed[where] = offset
        for (topic, partition), i in index.items():
            if i not in placed:
                placed[i] = {"topic": topic, "partition": partition, "offset": OFFSET_BEGINNING}
        return placed

    # -- readers --------------------------------------------------------------

    def open(self, partition: int, offset: Any | None) -> SourceReader:
        tps = self.topic_partitions()
        topic, kafka_partition = tps[partition]
        if offset is None:
            start = self._start_offsets.get((topic, kafka_partition), OFFSET_BEGINNING)
        else:
            named = (
                (offset.get("topic"), offset.get("partition")) if isinstance(offset, dict) else None
            )
            if named != (topic, kafka_partition):
                raise ConfigError(
                    f"rf.sources.Kafka: the checkpoint's offset for source partition {partition} "
                    f"is {offset!r}, but that source partition is {topic}[{kafka_partition}] now "
                    f"(partitions are numbered in (topic, partition) order over {list(self.topics)}"
                    "; partitions were added to a topic that is not the last). Restore with the "
                    "topics of the checkpoint, or start the job afresh"
                )
            start = int(offset["offset"])
        return _KafkaReader(self._consumer_config(), topic, kafka_partition, start)

    @property
    def bounded(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"Kafka({self.bootstrap_servers!r}, {list(self.topics)!r}, start={self.start!r})"


class _KafkaReader(SourceReader):
    """One topic partition, through a consumer assigned to it at an offset."""

    def __init__(self, config: dict[str, Any], topic: str, partition: int, start: int):
        from confluent_kafka import Consumer, TopicPartition

        self._topic = topic
        self._partition = partition
        self._next = start  # the next offset to read (OFFSET_BEGINNING until a record came)
        self._high: int | None = None  # the high watermark the last fetch saw
        self._low: int | None = None
        self._logged_at = 0.0
        self._closed = False
        self._redelivered = 0  # records the consumer delivered again, dropped
        self._tp = TopicPartition(topic, partition)
        self._consumer: Consumer = Consumer(config)
        self._consumer.assign([TopicPartition(topic, partition, start)])

    def read(self, max_items: int) -> list[Any]:
        messages = self._consumer.consume(num_messages=max(1, min(max_items, 100_000)), timeout=0)
        topic, partition = self._topic, self._partition
        out: list[Any] = []
        append = out.append
        next_offset, again = self._next, 0
        for m in messages:
            error = m.error()
            if error is not None:
                self._on_error(error)
                continue
            offset: int = m.offset()  # type: ignore[assignment]
            if offset < next_offset:
                # Already read: a fetch after a reconnect may start before the position;
                # the offset, not the delivery, says what this partition has emitted.
                again += 1
                continue
            next_offset = offset + 1
            ts_type, ts = m.timestamp()
            append(
                KafkaMessage(
                    topic,
                    partition,
                    offset,
                    m.key(),
                    m.value(),
                    ts / 1000.0 if ts_type else None,  # type 0: no timestamp
                )
            )
        first_offset, self._next = self._next, next_offset
        if again:
            self._redelivered += again
            log.warning(
                "Kafka source %s[%d]: the consumer delivered %d records it had from offset %d "
                "again; dropped (%d so far)",
                topic,
                partition,
                again,
                first_offset,
                self._redelivered,
            )
        self._refresh_watermarks()
        return out

    def _on_error(self, error: Any) -> None:
        from confluent_kafka import KafkaError, KafkaException

        fatal = error.fatal() or error.code() in (
            KafkaError._AUTO_OFFSET_RESET,
            KafkaError.OFFSET_OUT_OF_RANGE,
            KafkaError.TOPIC_AUTHORIZATION_FAILED,
            KafkaError._UNKNOWN_PARTITION,
        )
        if fatal:
            raise KafkaException(error)
        now = time.monotonic()
        if now - self._logged_at >= ERROR_LOG_EVERY_S:  # the consumer retries by itself
            self._logged_at = now
            log.warning(
                "Kafka source %s[%d] at offset %s: %s (retrying)",
                self._topic,
                self._partition,
                self._next,
                error,
            )

    def _refresh_watermarks(self) -> None:
        # The cached watermarks come with every fetch response: no request is made.
        low, high = self._consumer.get_watermark_offsets(self._tp, cached=True)
        if high >= 0:
            self._high = int(high)
        if low >= 0:
            self._low = int(low)

    def offset(self) -> dict[str, Any]:
        return {"topic": self._topic, "partition": self._partition, "offset": self._next}

    def backlog(self) -> int | None:
        high, position = self._high, self._next
        if high is None:
            return None
        if position < 0:  # nothing read yet from the beginning
            position = self._low if self._low is not None else 0
        return max(0, high - position)

    @property
    def kafka_partition(self) -> str:
        """``topic[partition]``: how the metrics name this reader's partition."""
        return f"{self._topic}[{self._partition}]"

    @property
    def kafka_lag(self) -> int | None:
        """Records in the partition after this reader's position (the consumer lag)."""
        return self.backlog()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._consumer.close()
