"""``rf.sinks.Kafka``: exactly-once into a Kafka topic, one transaction per commit.

Kafka transactions are all-or-nothing, but a transaction that was prepared
and not committed cannot be finished by another producer: with librdkafka,
a new producer with the same ``transactional.id`` *aborts* it when it calls
``init_transactions``. A sink that wrote a checkpoint's records into an open
transaction and committed it on notify would lose them whenever the writer
died between the manifest and the commit. So the records are not sent
before the checkpoint completes:

1. ``write`` encodes each record into ``(key bytes, value bytes)`` at once
   (a bad record fails in its step, with its position) and keeps them,
   pickled per batch, in memory; beyond ``SPILL_BYTES`` in a local spill
   file (``RAYFLOW_SPILL_DIR``).
2. ``prepare_commit(n)`` hands all of them over *in the committable*. The
   committable is part of checkpoint *n*'s snapshot, so what *n* must
   publish is as durable as the checkpoint itself, on whichever node the
   commit runs later.
3. ``commit`` (after manifest *n*) publishes one committable in one
   transaction of the producer ``<prefix>-<partition>`` (``prefix`` is
   ``rayflow-<job>-<step>``, or ``transactional.id`` from ``config``;
   ``partition`` is the sink partition that *staged* it, so every attempt
   of one committable uses one transactional id):

   a. ``init_transactions`` (once per producer): fences every older
      producer of that id and aborts a transaction it left open;
   b. read the *marker*: the committed offset of the consumer group
      ``<prefix>-<partition>.<run>`` on partition 0 of the topic, which is
      the last checkpoint of that run that this partition committed. If it
      is ``>= n``, the committable was published before: done (idempotent);
   c. ``begin_transaction``; produce the records, each with a header
      ``rayflow.commit = "<partition>:<run>:<n>:<attempt>"``;
      ``send_offsets_to_transaction`` sets the marker to *n*;
      ``commit_transaction``. Records and marker become visible together,
      or neither does.

Why exactly once, at every moment of failure:

- Before manifest *n*: nothing of *n* was sent. The restore goes back to
  *n-1* and the replay stages the records again.
- After manifest *n*, before or during the commit: a restore re-issues
  *n*'s committable (rule R7). Its producer's ``init_transactions`` aborts
  whatever the interrupted attempt left open (or waits until it has
  committed); then the marker tells whether that attempt committed. It
  either did (skipped) or its records are aborted (sent again, once).
- After the commit: the marker says so; a re-issued commit is skipped.
- A zombie (an old writer still running) uses the same transactional id:
  the newer ``init_transactions`` fenced it, so it can commit nothing
  after the check was made.
- Per run (R7): the marker group names the run, so a run restored from an
  old savepoint, whose checkpoint ids an earlier run used, is not mistaken
  for it. Within a run a partition commits in checkpoint order, so "the
  last checkpoint committed" answers for every earlier one.

Readers must use ``isolation.level=read_committed`` (the Java client's
default is ``read_uncommitted``; librdkafka's is ``read_committed``): a
reader that sees uncommitted data sees the records of an interrupted
attempt as well as those of the attempt that committed.

Costs and limits: a checkpoint's output is stored in its snapshot (and in
the next snapshots until it is committed); while commits cannot reach
Kafka, ``prepare_commit`` declines checkpoints (``TransientSinkError``), so
output stays with the writer, spilled to disk, until the sources pause at
``max_uncommitted_records``. The markers are consumer-group offsets, kept
as long as the brokers keep offsets (``offsets.retention.minutes``, 7 days
by default, counted from a run's last commit): resuming a job, or
restoring a savepoint, older than that may publish its checkpoint's
output a second time. Each run of a job adds a consumer group per sink
partition (``<prefix>-<partition>.<run>``); they expire the same way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any

from rayflow._internal.connectors.kafka_source import (
    CLIENT_DEFAULTS,
    KafkaMessage,
    bootstrap_of,
    config_of,
    kafka_error,
)
from rayflow._internal.extras import require_installed
from rayflow.errors import ConfigError
from rayflow.sinks import Sink, SinkContext, SinkWriter, TransientSinkError

if TYPE_CHECKING:
    from confluent_kafka import Consumer, Producer

__all__ = ["Kafka"]

log = logging.getLogger("rayflow")

#: Encoded records kept in memory before they go to the spill file.
SPILL_BYTES = 64 << 20
#: How long one transactional call (init, marker, commit) may take before the
#: commit is tried again (a commit runs beside the processing; a restart waits for it).
CALL_TIMEOUT_S = 10.0
#: The record header that says which commit published a record.
COMMIT_HEADER = "rayflow.commit"
#: The partition of the topic whose committed offset holds a marker (it always exists).
MARKER_PARTITION = 0
#: Settings the sink owns.
_OWNED = ("transactional.id", "bootstrap.servers", "enable.idempotence")

KeyOrValue = Callable[[Any], Any]


def to_bytes(value: Any) -> bytes | None:
    """bytes as they are, str as UTF-8, None as None, anything else as JSON."""
    kind = type(value)
    if kind is bytes or value is None:
        return value
    if kind is str:
        return value.encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    try:
        return json.dumps(value, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"rf.sinks.Kafka writes bytes, str, or JSON-serializable values; {exc}. Give the "
            "sink key=... and value=... functions that return bytes or str"
        ) from None


def default_key(record: Any) -> Any:
    """A ``(key, value)`` pair's key, a KafkaMessage's key, else no key."""
    if type(record) is tuple and len(record) == 2:
        return record[0]
    if type(record) is KafkaMessage:
        return record.key
    return None


def default_value(record: Any) -> Any:
    """A ``(key, value)`` pair's value, a KafkaMessage's value, else the record."""
    if type(record) is tuple and len(record) == 2:
        return record[1]
    if type(record) is KafkaMessage:
        return record.value
    return record


def encoder(
    key: KeyOrValue | None, value: KeyOrValue | None
) -> Callable[[Any], tuple[bytes | None, bytes | None]]:
    """The function that turns a record into the (key, value) bytes it is sent as."""
    key_of = key or default_key
    value_of = value or default_value
    if key is None and value is None:

        def encode_default(record: Any) -> tuple[bytes | None, bytes | None]:
            if type(record) is tuple and len(record) == 2:
                return to_bytes(record[0]), to_bytes(record[1])
            if type(record) is KafkaMessage:
                return record.key, record.value
            return None, to_bytes(record)

        return encode_default

    def encode(record: Any) -> tuple[bytes | None, bytes | None]:
        return to_bytes(key_of(record)), to_bytes(value_of(record))

    return encode


class Kafka(Sink):
    """Records into a Kafka topic, exactly once, with Kafka transactions.

    ``key`` and ``value`` map a record to what is sent (bytes, str, or
    anything JSON-serializable); by default a ``(key, value)`` pair gives
    both, a :class:`~rayflow.sources.KafkaMessage` its own key and value,
    and any other record is the value (no key). ``config`` passes
    librdkafka settings to the producers (security, ``compression.type``,
    ``linger.ms``, ...); ``transactional.id`` there is the prefix of the
    sink's transactional ids (default ``rayflow-<job>-<step>``), for brokers
    whose ACLs allow only some prefixes. Records are partitioned by key
    (``murmur2_random``, as the Java client). Readers must use
    ``isolation.level=read_committed``. The module documents the commit
    protocol and what it needs from the brokers.
    """

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str],
        topic: str,
        *,
        key: KeyOrValue | None = None,
        value: KeyOrValue | None = None,
        config: Mapping[str, Any] | None = None,
    ):
        what = "rf.sinks.Kafka"
        self.bootstrap_servers = bootstrap_of(what, bootstrap_servers)
        if not isinstance(topic, str) or not topic.strip():
            raise ConfigError(f"{what} needs a topic name; got {topic!r}")
        for name, fn in (("key", key), ("value", value)):
            if fn is not None and not callable(fn):
                raise ConfigError(
                    f"{what} {name}= must be a function of the record (returning bytes, str "
                    f"or a JSON-serializable value); got {fn!r}"
                )
        self.config = config_of(what, config)
        prefix = self.config.pop("transactional.id", None)
        if prefix is not None and (not isinstance(prefix, str) or not prefix):
            raise ConfigError(f"{what} config transactional.id must be a non-empty prefix string")
        for owned in _OWNED[1:]:
            if owned in self.config:
                raise ConfigError(
                    f"{what}: config {owned!r} is set by the sink (transactions need it); remove it"
                )
        require_installed("confluent_kafka", what, "kafka")
        self.topic = topic
        self.key = key
        self.value = value
        self.id_prefix: str | None = prefix

    def setup(
        self,
        job: str,
        *,
        step: str = "",
        run_id: str = "",
        restored_checkpoint: int | None,
    ) -> None:
        """Check that the topic exists (records are never sent to a topic made up on the way)."""
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        settings: dict[str, Any] = {**CLIENT_DEFAULTS, **self.config}
        admin = AdminClient({**settings, "bootstrap.servers": self.bootstrap_servers})
        try:
            metadata = admin.list_topics(timeout=CALL_TIMEOUT_S)
        except KafkaException as exc:
            raise TransientSinkError(
                f"rf.sinks.Kafka {step!r}: cannot reach {self.bootstrap_servers}: {exc}"
            ) from exc
        info = metadata.topics.get(self.topic)
        if info is None:
            raise ConfigError(
                f"sink {step!r} of job {job!r}: topic {self.topic!r} does not exist at "
                f"{self.bootstrap_servers}; create it first"
            )
        if info.error is not None:
            raise ConfigError(f"sink {step!r}: topic {self.topic!r}: {info.error}")

    def prefix(self, job: str, step: str) -> str:
        return self.id_prefix or f"rayflow-{job}-{step}"

    def open(self, ctx: SinkContext) -> SinkWriter:
        return _KafkaWriter(self, ctx)

    def __repr__(self) -> str:
        return f"Kafka({self.bootstrap_servers!r}, {self.topic!r})"


class _Transactions:
    """The transactional producer of one id, and the markers of the runs it committed."""

    def __init__(self, sink: Kafka, transactional_id: str):
        from confluent_kafka import Producer

        self._sink = sink
        self.producer: Producer = Producer(
            {
                "linger.ms": 5,
                "partitioner": "murmur2_random",
                # Requests time out (and the commit is retried) rather than hang for 60 s.
                "socket.timeout.ms": int(CALL_TIMEOUT_S * 1000),
                **CLIENT_DEFAULTS,
                **sink.config,
                "bootstrap.servers": sink.bootstrap_servers,
                "transactional.id": transactional_id,
            }
        )
        self.ready = False  # init_transactions done
        self._groups: dict[str, Consumer] = {}
        #: marker group -> the last checkpoint committed. Read from Kafka once per
        #: producer (after init_transactions nobody else commits under this id: a
        #: newer producer fences this one, which then fails and is replaced).
        self.markers: dict[str, int] = {}

    def group(self, name: str) -> Consumer:
        """A consumer of the marker group (never subscribed: it reads and names the group)."""
        from confluent_kafka import Consumer

        consumer = self._groups.get(name)
        if consumer is None:
            consumer = Consumer(
                {
                    "socket.timeout.ms": int(CALL_TIMEOUT_S * 1000),
                    **CLIENT_DEFAULTS,
                    **self._sink.config,
                    "bootstrap.servers": self._sink.bootstrap_servers,
                    "group.id": name,
                    "enable.auto.commit": False,
                    "isolation.level": "read_committed",
                }
            )
            self._groups[name] = consumer
        return consumer

    def committed(self, topic: str, group: str) -> int:
        """The last checkpoint that the marker group says was committed (0: none)."""
        from confluent_kafka import KafkaException, TopicPartition

        if group not in self.markers:
            (tp,) = self.group(group).committed(
                [TopicPartition(topic, MARKER_PARTITION)], timeout=CALL_TIMEOUT_S
            )
            if tp.error is not None:
                raise KafkaException(tp.error)
            self.markers[group] = max(0, tp.offset)
        return self.markers[group]

    def close(self) -> None:
        for consumer in self._groups.values():
            with contextlib.suppress(Exception):
                consumer.close()
        self._groups.clear()
        with contextlib.suppress(Exception):
            self.producer.purge()


class _KafkaWriter(SinkWriter):
    def __init__(self, sink: Kafka, ctx: SinkContext):
        self._sink = sink
        self._ctx = ctx
        self._prefix = sink.prefix(ctx.job, ctx.step)
        self._encode = encoder(sink.key, sink.value)
        self._chunks: list[bytes] = []  # pickled lists of (key, value), one per write
        self._chunk_bytes = 0
        self._records = 0
        self._spill: IO[bytes] | None = None
        self._spill_path = ""
        self._spilled = 0
        self._txns: dict[int, _Transactions] = {}  # staging partition -> its producer
        # Set while commits cannot reach Kafka: checkpoints are declined meanwhile.
        self._failing: str | None = None

    # -- staging -------------------------------------------------------------

    @property
    def spilled_bytes(self) -> int:
        """Encoded records on local disk, waiting for the next checkpoint."""
        return self._spilled

    def write(self, items: list[Any]) -> None:
        encode = self._encode
        chunk = pickle.dumps([encode(r) for r in items], protocol=pickle.HIGHEST_PROTOCOL)
        self._records += len(items)
        if self._spill is not None or self._chunk_bytes + len(chunk) > SPILL_BYTES:
            self._spill_chunk(chunk)
        else:
            self._chunks.append(chunk)
            self._chunk_bytes += len(chunk)

    def _spill_chunk(self, chunk: bytes) -> None:
        if self._spill is None:
            fd, self._spill_path = tempfile.mkstemp(
                prefix=f"rayflow-{self._ctx.step}-{self._ctx.partition}-",
                suffix=".spill",
                dir=os.environ.get("RAYFLOW_SPILL_DIR") or None,
            )
            self._spill = os.fdopen(fd, "w+b")
        self._spill.write(len(chunk).to_bytes(8, "little"))
        self._spill.write(chunk)
        self._spilled += len(chunk) + 8

    def _take_chunks(self) -> list[bytes]:
        chunks, self._chunks, self._chunk_bytes = self._chunks, [], 0
        if self._spill is not None:
            self._spill.seek(0)
            while header := self._spill.read(8):
                chunks.append(self._spill.read(int.from_bytes(header, "little")))
            self._drop_spill()
        return chunks

    def _drop_spill(self) -> None:
        if self._spill is not None:
            with contextlib.suppress(OSError):
                self._spill.close()
                os.remove(self._spill_path)
            self._spill = None
            self._spilled = 0

    def prepare_commit(self, checkpoint_id: int) -> Any:
        if self._failing is not None:
            # Kafka is out of reach: keep the records here (the checkpoint is declined).
            raise TransientSinkError(
                f"rf.sinks.Kafka {self._ctx.step!r}: commits to {self._sink.bootstrap_servers} "
                f"are failing ({self._failing}); the output waits for the next checkpoint"
            )
        if not self._records:
            return None
        records, self._records = self._records, 0
        partition, run = self._ctx.partition, self._ctx.run_id or "r"
        return {
            "topic": self._sink.topic,
            "partition": partition,
            "run": run,
            "checkpoint": checkpoint_id,
            "records": records,
            "chunks": self._take_chunks(),
            "transactional_id": f"{self._prefix}-{partition}",
            "marker_group": f"{self._prefix}-{partition}.{run}",
        }

    # -- publishing ------------------------------------------------------------

    def commit(self, committable: Any) -> None:
        if committable is None:
            return
        partition = committable["partition"]
        try:
            self._publish(committable)
        except Exception as exc:
            self._drop_producer(partition)  # its state is unknown: the next attempt starts over
            error = kafka_error(exc)
            if error is None:
                raise
            if _permanent(error):
                raise RuntimeError(
                    f"rf.sinks.Kafka {self._ctx.step!r}: publishing checkpoint "
                    f"{committable['checkpoint']} to topic {committable['topic']!r} at "
                    f"{self._sink.bootstrap_servers} failed: {error}"
                ) from exc
            self._failing = str(error)
            raise TransientSinkError(
                f"rf.sinks.Kafka {self._ctx.step!r}: checkpoint {committable['checkpoint']} "
                f"not published yet: {error}"
            ) from exc
        self._failing = None

    def _publish(self, committable: dict[str, Any]) -> None:
        from confluent_kafka import TopicPartition

        topic, checkpoint = committable["topic"], committable["checkpoint"]
        group = committable["marker_group"]
        txns = self._transactions(committable["partition"], committable["transactional_id"])
        # Step 1. Fence older producers of this id; abort what they left open.
        if not txns.ready:
            txns.producer.init_transactions(CALL_TIMEOUT_S)
            txns.ready = True
        # Step 2. Published before (a re-issued commit)? Then nothing to do.
        if txns.committed(topic, group) >= checkpoint:
            return
        # Step 3. The records and the marker, in one transaction.
        producer = txns.producer
        header = f"{committable['partition']}:{committable['run']}:{checkpoint}:"
        headers: list[tuple[str, str | bytes | None]] = [
            (COMMIT_HEADER, (header + uuid.uuid4().hex[:8]).encode())
        ]
        producer.begin_transaction()
        try:
            produce = producer.produce
            sent = 0
            for chunk in committable["chunks"]:
                for key, value in pickle.loads(chunk):
                    try:
                        produce(topic, value, key, headers=headers)
                    except BufferError:  # the local queue is full: let it drain
                        producer.poll(0.05)
                        while True:
                            try:
                                produce(topic, value, key, headers=headers)
                                break
                            except BufferError:
                                producer.poll(0.05)
                    sent += 1
                    if not sent % 10_000:
                        producer.poll(0)
            marker = TopicPartition(topic, MARKER_PARTITION, checkpoint)
            producer.send_offsets_to_transaction(
                [marker], txns.group(group).consumer_group_metadata(), CALL_TIMEOUT_S
            )
            producer.commit_transaction(CALL_TIMEOUT_S)
        except BaseException:
            with contextlib.suppress(Exception):  # best effort: a new producer aborts it anyway
                producer.abort_transaction(1.0)
            raise
        txns.markers[group] = checkpoint

    def _transactions(self, partition: int, transactional_id: str) -> _Transactions:
        txns = self._txns.get(partition)
        if txns is None:
            txns = self._txns[partition] = _Transactions(self._sink, transactional_id)
        return txns

    def _drop_producer(self, partition: int) -> None:
        txns = self._txns.pop(partition, None)
        if txns is not None:
            txns.close()

    def close(self) -> None:
        for partition in list(self._txns):
            self._drop_producer(partition)
        self._drop_spill()
        self._chunks = []


def _permanent(error: Any) -> bool:
    """A Kafka error that waiting will not cure (the job fails with it)."""
    from confluent_kafka import KafkaError

    return error.code() in {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError._AUTHENTICATION,
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_TRANSACTION_TIMEOUT,
        KafkaError.INVALID_CONFIG,
        KafkaError._INVALID_ARG,
        KafkaError.UNSUPPORTED_VERSION,
        KafkaError._UNSUPPORTED_FEATURE,
        KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT,
    }
