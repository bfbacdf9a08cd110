"""Kafka -> keyed running sum -> Kafka: 1,000,000 records (key, 1) over 1,000 keys.

The input is produced beforehand into a topic of 2 partitions on a local
tansu broker (started here, in memory, on a free loopback port; the one the
tests use). rayflow runs ``rf.sources.Kafka -> map -> key_by -> reduce ->
rf.sinks.Kafka`` with checkpoints every second (so every update is published
exactly once, in a Kafka transaction per sink partition and checkpoint), at
parallelism 1 and 2. Its rate is measured from the moment every operator
runs until the job, stopped once its sink has taken every update, has
committed the last of them; the time to deploy the actors is printed apart.

The baseline in the same run is one Python process with confluent-kafka: a
consumer assigned both partitions, a dict of sums, a producer sending every
update (no transactions, so no exactly-once), until the last update is
acknowledged. Both outputs are read back (read_committed) and checked: every
update once, and each key's last sum. The same job against Bytewax's Kafka
connectors is the ``kafka`` workload of the peer comparison
(``python benchmarks/peers/run.py --workloads kafka --systems rayflow bytewax``).

    python benchmarks/kafka.py [--records N] [--keys K] [--repeat R]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter

from _common import start_ray

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rayflow as rf
from tests.support.kafka_broker import KafkaBroker


def produce_input(bootstrap: str, topic: str, n: int, keys: int) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    for i in range(n):
        while True:
            try:
                producer.produce(topic, b"1", b"k%d" % (i % keys))
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(60) == 0


def baseline(bootstrap: str, source: str, sink: str, n: int) -> float:
    """Records per second of a one-process consume -> sum -> produce loop."""
    from confluent_kafka import Consumer, Producer, TopicPartition

    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "baseline", "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(source, p, -2) for p in (0, 1)])
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    sums: dict[bytes, int] = {}
    get = sums.get
    seen = 0
    start = time.perf_counter()
    while seen < n:
        for m in consumer.consume(8192, timeout=0.5):
            if m.error() is not None:
                continue
            key = m.key()
            assert key is not None
            total = get(key, 0) + int(m.value() or b"0")
            sums[key] = total
            while True:
                try:
                    producer.produce(sink, str(total).encode(), key)
                    break
                except BufferError:
                    producer.poll(0.01)
            seen += 1
        producer.poll(0)
    assert producer.flush(60) == 0
    elapsed = time.perf_counter() - start
    consumer.close()
    return n / elapsed


def rayflow_run(
    broker: KafkaBroker, source: str, n: int, parallelism: int, tag: str
) -> tuple[float, float, str]:
    bootstrap = broker.bootstrap
    sink = broker.topic(2, f"out-p{parallelism}")
    flow = rf.Dataflow(f"kafka-sum-p{parallelism}-{tag}", parallelism=parallelism)
    events = flow.source("in", rf.sources.Kafka(bootstrap, source))
    pairs = events.map("decode", lambda m: (m.key.decode(), int(m.value)))
    sums = pairs.key_by("by_key", lambda kv: kv[0]).reduce(
        "sum", lambda acc, kv: acc + kv[1], initial=0
    )
    sums.sink("out", rf.sinks.Kafka(bootstrap, sink))
    folder = tempfile.mkdtemp(prefix="rf-kafka-bench-")
    t0 = time.time()
    handle = rf.start(flow, checkpoint=rf.Checkpointing(storage=folder, interval_s=1.0))
    while sum(e["records_in"] for e in handle.metrics()["out"]) < n:
        time.sleep(0.1)
    result = handle.stop()
    assert result.status is rf.JobStatus.STOPPED and result.restarts == 0, result
    assert result.running_at is not None
    return n / (result.ended_at - result.running_at), result.running_at - t0, sink


def check_output(bootstrap: str, topic: str, n: int, keys: int, what: str) -> None:
    """Every update once (each key's sums 1..n/keys), read with read_committed."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "check",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    consumer.assign([TopicPartition(topic, p, -2) for p in (0, 1)])
    updates: Counter[tuple[bytes, int]] = Counter()
    deadline = time.monotonic() + 120
    while sum(updates.values()) < n and time.monotonic() < deadline:
        for m in consumer.consume(10_000, timeout=0.5):
            if m.error() is None:
                updates[(m.key() or b"", int(m.value() or b"0"))] += 1
    consumer.close()
    per_key = n // keys
    expected = Counter({(b"k%d" % k, s): 1 for k in range(keys) for s in range(1, per_key + 1)})
    if updates != expected:
        wrong = sum(((updates - expected) + (expected - updates)).values())
        raise SystemExit(f"{what}: wrong output ({wrong:,} updates missing or extra)")


def main() -> None:
    parser = argparse.ArgumentParser(description="Kafka -> keyed running sum -> Kafka")
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    n = args.records // args.keys * args.keys
    broker = KafkaBroker(tempfile.mkdtemp(prefix="rf-kafka-broker-")).start()
    try:
        source = broker.topic(2, "in")
        started = time.perf_counter()
        produce_input(broker.bootstrap, source, n, args.keys)
        print(f"input: {n:,} records in 2 partitions ({time.perf_counter() - started:.1f} s)")
        base_runs = []
        for i in range(args.repeat):
            sink = broker.topic(2, "out-baseline")
            base_runs.append(baseline(broker.bootstrap, source, sink, n))
            if i == 0:
                check_output(broker.bootstrap, sink, n, args.keys, "baseline")
        base = max(base_runs)
        print(
            f"confluent-kafka loop (one process, no transactions): {base:,.0f} records/s "
            f"(best of {args.repeat}); output verified"
        )
        start_ray()
        for parallelism in (1, 2):
            runs: list[tuple[float, float]] = []
            for i in range(args.repeat):
                steady, deploy, sink = rayflow_run(broker, source, n, parallelism, str(i))
                check_output(broker.bootstrap, sink, n, args.keys, f"rayflow p={parallelism}")
                runs.append((steady, deploy))
            best, deploy = max(runs)
            print(
                f"rayflow parallelism {parallelism}: {best:,.0f} records/s (best of "
                f"{args.repeat}; deploy {deploy:.1f} s, runs "
                f"{', '.join(f'{r:,.0f}' for r, _ in runs)}); ratio to the loop "
                f"{best / base:.1%}; output verified (exactly once, read_committed)"
            )
    finally:
        broker.stop()


if __name__ == "__main__":
    main()
