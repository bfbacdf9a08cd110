"""The workloads of the peer comparison, shared by every system (no framework imports).

Each peer script builds the same jobs in its own framework:

- ``keyed_sum``: 1,000,000 records ``(key, int)`` over 1,000 keys, a keyed
  running sum that emits every update.
- ``wordcount``: word count over ~10 MB of text files (``run.py --text-mb``;
  ~2.3 million words; a count per word, emitted on every update); records =
  words.
- ``sessions``: a keyed sessionizer over 1,000,000 JSON click events (parse,
  key by user, a state machine per user that emits closed sessions).
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


def sum_record(partition: int, offset: int, partitions: int) -> tuple[int, int]:
    i = offset * partitions + partition
    return i % KEYS, i % 7 + 1


def expected_sums(records: int = SUM_RECORDS) -> dict[int, int]:
    sums: dict[int, int] = {}
    for i in range(records):
        sums[i % KEYS] = sums.get(i % KEYS, 0) + i % 7 + 1
    return sums


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
    print(json.dumps(line), flush=True)
