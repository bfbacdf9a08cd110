"""The ceiling: the same work as a plain Python loop in one process, no framework.

``python peer_python.py WORKLOAD`` prints one JSON line like the peers (the
records, and the start and end of the loop). Parallelism and checkpoints do
not apply.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import workloads as w


def keyed_sum() -> tuple[int, int, int]:
    sums: dict[int, int] = {}
    latest: dict[Any, Any] = {}
    count = 0
    for i in range(w.SUM_RECORDS):
        key, value = w.sum_record(0, i, 1)
        total = sums.get(key, 0) + value
        sums[key] = total
        latest[key] = total
        count += 1
    return w.SUM_RECORDS, count, sum(latest.values())


def wordcount() -> tuple[int, int, int]:
    folder = w.make_text(w.text_megabytes())
    counts: dict[str, int] = {}
    records = 0
    for path in sorted(glob.glob(os.path.join(folder, "*.txt"))):
        with open(path) as f:
            for line in f:
                for word in line.split():
                    counts[word] = counts.get(word, 0) + 1
                    records += 1
    return records, records, sum(counts.values())


def sessions() -> tuple[int, int, int]:
    folder = w.make_events()
    state: dict[str, Any] = {}
    closed: dict[str, int] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.jsonl"))):
        with open(path) as f:
            for line in f:
                event = json.loads(line)
                new, out = w.session_step(state.get(event["user"]), event)
                if new is None:
                    state.pop(event["user"], None)
                else:
                    state[event["user"]] = new
                for s in out:
                    closed[s["user"] + str(s["start"])] = s["clicks"]
    return w.SESSION_EVENTS, len(closed), sum(closed.values())


def windows() -> tuple[int, int, int, int]:
    tally = w.tumbling_counts(map(w.window_event, range(w.WINDOW_EVENTS)))
    return w.WINDOW_EVENTS, tally.count, tally.total, tally.events


def main() -> None:
    workload = sys.argv[1]
    if workload == "wordcount":
        w.make_text(w.text_megabytes())
    elif workload == "sessions":
        w.make_events()
    started = time.time()
    extra = {}
    if workload == "windows":
        records, outputs, check, extra["counted"] = windows()
    else:
        records, outputs, check = {
            "keyed_sum": keyed_sum,
            "wordcount": wordcount,
            "sessions": sessions,
        }[workload]()
    ended = time.time()
    print(
        json.dumps(
            {
                "records": records,
                "run_started": started,
                "run_ended": ended,
                "first_record": started,
                "outputs": outputs,
                "check": check,
                **extra,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
