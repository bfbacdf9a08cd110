"""The workloads of the peer comparison, shared by every system (no framework imports).

Each peer script builds the same jobs in its own framework:

- ``keyed_sum``: 1,000,000 records ``(key, int)`` over 1,000 keys, a keyed
  running sum that emits every update.
- ``wordcount``: word count over ~10 MB of text files (``run.py --text-mb``;
  ~2.3 million words; a count per word, emitted on every update); records =
  words.
- ``sessions``: a keyed sessionizer over 1,000,000 JSON click events (parse,
  key by user, a state machine per user that emits closed sessions).
- ``windows``: a tumbling 1-minute event-time count per key over 1,000,000
  timestamped events ``(key, ts)`` (1,000 keys, about 67 minutes of event
  time, a tenth of the events up to 3 s late; ``window_event``), with a
  watermark 5 s behind the highest timestamp; one result per key and minute.
  The input is partitioned by key (like a Kafka topic keyed by user), so each
  key's events arrive in the order they were generated at every parallelism.
- ``kafka``: Kafka -> keyed running sum -> Kafka: 1,000,000 records ``(key,
  1)`` over 1,000 keys (key ``k<i mod 1000>``, value ``1``, as bytes) in a
  topic of 2 partitions on a local tansu broker that run.py starts and fills
  once per invocation; each run reads it from the earliest offset with the
  systems' own Kafka connectors and writes every update ``(key, running
  sum)`` (the sum as decimal text) to a fresh output topic, which run.py
  reads back (``read_committed``) to check that each key's final sum is its
  count. Checkpoints on only (rayflow's Kafka sink publishes at
  checkpoints). The source is unbounded: rayflow's job is stopped once its
  sink has taken every update (polled every 0.1 s; the stop commits the
  rest); Bytewax's ``KafkaSource(tail=False)`` ends at the end of the
  partitions. Equal: the input, the broker, the client library
  (confluent-kafka 2.16.1 in both environments), one reader per partition
  assigned its partition (no consumer group), checkpoints every second, the
  check. Not equal: rayflow's sink is exactly-once (the updates of each
  checkpoint are sent, in one Kafka transaction per sink partition, after
  the checkpoint completes; each record carries a commit header), Bytewax's
  ``KafkaSink`` is a plain, non-transactional producer that flushes every
  batch (at-least-once: a resume sends its epoch's updates again). The
  broker (one process, in memory) shares the 2 cores with the system under
  test and is not counted in its peak memory.
- ``startup``: the keyed sum over 100 records, to time a job's start-up:
  from submitting the flow to the first record out at the sink.

Throughput is measured the same way everywhere: a ``stamp`` step right after
the source notes when the first record arrived (one file per process), and
the driver notes when the job's run call returned; records divided by that
span excludes each system's start-up but includes the drain at the end.
Start-up is measured the same way everywhere too: each peer notes when it
submitted the flow (and when it began starting its runtime), and the sink
notes when it saw its first record (``stamp_first_out``).
"""

from __future__ import annotations

import glob
import json
import os
import random
import time
import zlib
from collections.abc import Iterable
from typing import Any

# PEER_SCALE shrinks the inputs of every system alike (for quick trial runs:
# run.py --scale); the published table is measured at scale 1.
SCALE = float(os.environ.get("PEER_SCALE", "1"))
KEYS = 1_000
SUM_RECORDS = int(1_000_000 * SCALE)
STARTUP_RECORDS = 100
SESSION_EVENTS = int(1_000_000 * SCALE)
SESSION_USERS = 5_000
SESSION_GAP = 1800.0
FILES = 8

# The windows workload: WINDOW_EVENTS events, event i at BASE_MS + i * STEP_MS
# milliseconds since the epoch (1M events span ~67 minutes), one in ten of them
# delayed by up to DISORDER_MS; every system waits MAX_DELAY_S for stragglers.
# The delay is bounded below the wait with room to spare because Bytewax's
# EventClock also advances its watermark with the wall clock between events.
WINDOW_EVENTS = int(1_000_000 * SCALE) // 4 * 4  # divisible by every parallelism of 1, 2, 4
WINDOW_KEYS = 1_000
WINDOW_S = 60
WINDOW_SEED = 14
BASE_MS = 1_700_000_000_000  # 2023-11-14; windows are aligned to the epoch
STEP_MS = 4
DISORDER_MS = 3_000
MAX_DELAY_S = 5.0
KEY_NAMES = [f"u{k:04d}" for k in range(WINDOW_KEYS)]
_MASK = (1 << 64) - 1


# The kafka workload: SUM_RECORDS records, record i (key kafka_key(i), value
# b"1"), in a topic of KAFKA_PARTITIONS partitions (partitioned by key).
KAFKA_PARTITIONS = 2


def kafka_key(i: int) -> bytes:
    return b"k%d" % (i % KEYS)


def kafka_check(finals: dict[bytes, int]) -> int:
    """A checksum over ``{key: final sum}``: the kafka workload's ``check``."""
    return sum(zlib.crc32(key + b"|%d" % total) for key, total in finals.items())


def expected_kafka(records: int | None = None) -> dict[str, int]:
    """The kafka workload's reference: ``keys`` and ``check`` (each key's sum is its count)."""
    counts: dict[bytes, int] = {}
    for i in range(SUM_RECORDS if records is None else records):
        key = kafka_key(i)
        counts[key] = counts.get(key, 0) + 1
    return {"keys": len(counts), "check": kafka_check(counts)}


def sum_record(partition: int, offset: int, partitions: int) -> tuple[int, int]:
    i = offset * partitions + partition
    return i % KEYS, i % 7 + 1


def expected_sums(records: int = SUM_RECORDS) -> dict[int, int]:
    sums: dict[int, int] = {}
    for i in range(records):
        sums[i % KEYS] = sums.get(i % KEYS, 0) + i % 7 + 1
    return sums


def window_event(i: int) -> tuple[str, float]:
    """Event ``i`` of the windows workload: ``(key, ts)``, ts in seconds since the epoch.

    Deterministic (a splitmix64 hash of ``i`` and the seed). The key is uniform
    over WINDOW_KEYS but congruent to ``i`` modulo 4, so the events of source
    partition ``p`` of ``P`` (events ``offset * P + p``, see ``window_index``)
    carry the keys congruent to ``p`` modulo ``P`` for P in 1, 2, 4: a key's
    events all come from one source partition, in generation order.
    Timestamps are whole milliseconds, so that every system (floats, Flink's
    int milliseconds, Bytewax's datetimes) puts every event in the same window.
    """
    h = ((i + WINDOW_SEED * 0x632BE59BD9B4E019) * 0x9E3779B97F4A7C15) & _MASK
    h ^= h >> 30
    h = (h * 0xBF58476D1CE4E5B9) & _MASK
    h ^= h >> 27
    key = KEY_NAMES[(h & 0xFFFF) % (WINDOW_KEYS // 4) * 4 + (i & 3)]
    ms = BASE_MS + i * STEP_MS
    if (h >> 16) % 10 == 0:
        ms -= (h >> 24) % (DISORDER_MS + 1)
    return key, ms / 1000


def window_index(partition: int, offset: int, partitions: int) -> int:
    """The event that source partition ``partition`` of ``partitions`` reads at ``offset``."""
    return offset * partitions + partition


def window_result(key: str, start_s: float, count: int) -> int:
    """One window result's contribution to the check: the sum of these over all
    results (with their number and the sum of the counts) must agree everywhere."""
    return zlib.crc32(f"{key}|{int(start_s)}|{count}".encode())


def expected_windows(events: int | None = None) -> dict[str, int]:
    """The reference answer of the windows workload, by the plainest computation:
    ``outputs`` (results), ``check`` (sum of window_result) and ``counted`` (events)."""
    counts: dict[tuple[str, int], int] = {}
    for i in range(WINDOW_EVENTS if events is None else events):
        key, ts = window_event(i)
        start = int(ts // WINDOW_S) * WINDOW_S
        counts[key, start] = counts.get((key, start), 0) + 1
    return {
        "outputs": len(counts),
        "check": sum(window_result(k, s, c) for (k, s), c in counts.items()),
        "counted": sum(counts.values()),
    }


class WindowTally:
    """What every system's sink does with window results: counts them, sums
    ``window_result`` and the counts; ``dump`` writes them for ``report``.
    With ``keep``, ``results`` maps each (key, start) to its count."""

    def __init__(self, keep: bool = False) -> None:
        self.count = 0
        self.total = 0
        self.events = 0
        self.results: dict[tuple[str, int], int] | None = {} if keep else None

    def add(self, key: str, start_s: float, count: int) -> None:
        self.count += 1
        self.total += window_result(key, start_s, count)
        self.events += count
        if self.results is not None:
            self.results[key, int(start_s)] = count

    def state(self) -> dict[str, int]:
        return {"count": self.count, "total": self.total, "events": self.events}

    def dump(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.state(), f)


def tumbling_counts(events: Iterable[tuple[str, float]], keep: bool = False) -> WindowTally:
    """The windows workload as a one-process streaming loop (the ceiling): a
    watermark MAX_DELAY_S behind the highest timestamp; a minute's counts are
    tallied once the watermark passes its end, the rest at the end of the input.
    Records whose window has already fired are dropped (none are, with this input)."""
    tally = WindowTally(keep)
    size = WINDOW_S
    open_windows: dict[int, dict[str, int]] = {}  # start -> key -> count
    next_close = float("inf")  # the end of the earliest open window
    high = float("-inf")
    for key, ts in events:
        if ts > high:
            high = ts
            watermark = ts - MAX_DELAY_S
            while watermark >= next_close:
                start = min(open_windows)
                for k, count in open_windows.pop(start).items():
                    tally.add(k, start, count)
                next_close = min(open_windows, default=float("inf")) + size
        start = int(ts // size) * size
        if start + size <= high - MAX_DELAY_S:
            continue  # late: its window has fired
        counts = open_windows.get(start)
        if counts is None:
            counts = open_windows[start] = {}
            next_close = min(next_close, start + size)
        counts[key] = counts.get(key, 0) + 1
    for start in sorted(open_windows):
        for k, count in open_windows[start].items():
            tally.add(k, start, count)
    return tally


def data_dir() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(os.path.dirname(here), ".data")


def text_megabytes() -> int:
    return max(1, int(int(os.environ.get("PEER_TEXT_MB", "10")) * SCALE))


def make_text(megabytes: int) -> str:
    """~``megabytes`` MB of text in FILES files (Zipf-like words); returns the folder."""
    folder = os.path.join(data_dir(), f"words-{megabytes}mb")
    if len(glob.glob(os.path.join(folder, "*.txt"))) == FILES:
        return folder
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(42)
    vocab = [f"w{i}" for i in range(10_000)]
    weights = [1.0 / (i + 1) for i in range(len(vocab))]
    per_file = megabytes * 1_000_000 // FILES
    for f in range(FILES):
        size = 0
        with open(os.path.join(folder, f"part-{f}.txt"), "w") as out:
            while size < per_file:
                line = " ".join(rng.choices(vocab, weights, k=12)) + "\n"
                out.write(line)
                size += len(line)
    return folder


def make_events(count: int = SESSION_EVENTS) -> str:
    """``count`` JSON click events in FILES files, each user's in one file, in time order."""
    folder = os.path.join(data_dir(), f"events-{count}")
    if len(glob.glob(os.path.join(folder, "*.jsonl"))) == FILES:
        return folder
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(7)
    clock = [0.0] * SESSION_USERS
    pages = ["home", "search", "product", "cart", "checkout", "help"]
    outs = [open(os.path.join(folder, f"events-{f}.jsonl"), "w") for f in range(FILES)]
    try:
        for _ in range(count):
            user = rng.randrange(SESSION_USERS)
            clock[user] += rng.choice([5, 20, 60, 600, 4000])
            page = "logout" if rng.random() < 0.05 else rng.choice(pages)
            event = {"user": f"u{user:05d}", "ts": clock[user], "page": page}
            outs[user % FILES].write(json.dumps(event) + "\n")
    finally:
        for out in outs:
            out.close()
    return folder


def count_words(folder: str) -> int:
    return sum(
        len(line.split())
        for p in sorted(glob.glob(os.path.join(folder, "*.txt")))
        for line in open(p)
    )


def session_step(state: dict[str, Any] | None, event: dict[str, Any]) -> tuple[Any, list[Any]]:
    """The sessionizer's state machine: (state, event) -> (new state, closed sessions)."""
    out = []
    if state is not None and event["ts"] - state["end"] > SESSION_GAP:
        out.append(state)
        state = None
    if state is None:
        state = {"user": event["user"], "start": event["ts"], "end": event["ts"], "clicks": 0}
    state["end"] = event["ts"]
    state["clicks"] += 1
    if event["page"] == "logout":
        out.append(state)
        return None, out
    return state, out


# -- measurement helpers -------------------------------------------------------

_STAMPED = False


def stamp(record: Any) -> Any:
    """Identity; the first record a process sees writes the time to the stamp folder."""
    global _STAMPED
    if not _STAMPED:
        _STAMPED = True
        folder = os.environ["PEER_STAMPS"]
        with open(os.path.join(folder, f"{os.getpid()}-{time.time_ns()}.stamp"), "w") as f:
            f.write(repr(time.time()))
    return record


def stamp_first_out(folder: str) -> None:
    """Note the time in ``folder``: a sink calls it once, on its first record."""
    with open(os.path.join(folder, f"{os.getpid()}-{time.time_ns()}.first"), "w") as f:
        f.write(repr(time.time()))


def first_out(folder: str) -> float | None:
    """When the first record reached a sink (None if none did)."""
    times = [float(open(p).read()) for p in glob.glob(os.path.join(folder, "*.first"))]
    return min(times) if times else None


def stamp_pids(folder: str) -> set[int]:
    """The processes that ran the stamp step or a sink (to see where user code ran)."""
    names = glob.glob(os.path.join(folder, "*.stamp")) + glob.glob(os.path.join(folder, "*.first"))
    return {int(os.path.basename(p).split("-", 1)[0]) for p in names}


def first_stamp(folder: str) -> float:
    times = [float(open(p).read()) for p in glob.glob(os.path.join(folder, "*.stamp"))]
    if not times:
        raise RuntimeError(f"no record reached the stamp step ({folder})")
    return min(times)


def report(records: int, started: float, ended: float, out: str, **extra: Any) -> None:
    """Print the run's JSON line: records, its times, and what the sinks wrote to ``out``."""
    produced = []
    for name in os.listdir(out):
        with open(os.path.join(out, name)) as f:
            produced.append(json.load(f))
    line = {
        "records": records,
        "run_started": started,
        "run_ended": ended,
        "outputs": sum(p["count"] for p in produced),
        "check": sum(p["total"] for p in produced),
        **extra,
    }
    if any("events" in p for p in produced):  # windows: the events the windows counted
        line["counted"] = sum(p.get("events", 0) for p in produced)
    print(json.dumps(line), flush=True)
