"""Clickstream sessionizer: JSON click events in, one record per user session out.

A session is a user's clicks until they stay away for more than ``--gap``
seconds of event time (the time each click happened, not when it is read):
an event-time ``Session`` window per user, which merges clicks that come
within the gap and emits the session once the watermark has passed its end.
Click times may arrive up to ``--max-delay`` seconds out of order. Input is
JSON Lines files of ``{"user", "ts", "page"}`` events (a sample ships in
``jobs/data/clicks``; ``--generate N`` writes N synthetic events first).
Malformed lines are set aside as dead letters in ``<output>-bad``.

    python jobs/clickstream.py [--input GLOB] [--output DIR] [--generate N]
    rayflow run jobs/clickstream.py [--output DIR]
    ray job submit --working-dir . -- python jobs/clickstream.py --output /shared/sessions
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import sys
from collections.abc import Sequence
from typing import Any

import rayflow as rf

HERE = os.path.dirname(os.path.abspath(__file__))


def parse(line: str) -> dict[str, Any]:
    event = json.loads(line)
    return {"user": str(event["user"]), "ts": float(event["ts"]), "page": str(event["page"])}


def add_click(summary: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
    return {"clicks": summary["clicks"] + 1, "pages": [*summary["pages"], event["page"]]}


def merge_summaries(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {"clicks": a["clicks"] + b["clicks"], "pages": [*a["pages"], *b["pages"]]}


def session_row(keyed: tuple[str, rf.windows.Result]) -> dict[str, Any]:
    user, window = keyed
    return {
        "user": user,
        "start": window.start,
        "end": window.end,  # the last click's time plus the gap
        "clicks": window.value["clicks"],
        "pages": window.value["pages"],
    }


def build(
    pattern: str, output: str, parallelism: int, gap: float, max_delay: float = 60.0
) -> rf.Dataflow:
    flow = rf.Dataflow("clickstream", parallelism=parallelism)
    lines = flow.source("events", rf.sources.TextFiles(pattern))
    events = lines.map("parse", parse, on_error="dead_letter").with_event_time(
        "click_time", lambda e: e["ts"], max_delay_s=max_delay
    )
    sessions = events.key_by("by_user", lambda e: e["user"]).window(
        "sessions",
        rf.windows.Session(gap_s=gap),
        # Incremental: a count and the pages so far; two sessions a click bridges merge.
        rf.windows.Fold(add_click, {"clicks": 0, "pages": []}, merge=merge_summaries),
    )
    sessions.map("summary", session_row).sink("sessions_out", rf.sinks.JsonLines(output))
    flow.dead_letters().map("bad_line", lambda d: {"line": d.record, "error": d.message}).sink(
        "bad_lines", rf.sinks.JsonLines(output.rstrip("/") + "-bad")
    )
    return flow


def generate(folder: str, count: int, files: int = 4, seed: int = 1) -> str:
    """Write ``count`` synthetic click events as JSON Lines; return their glob.

    Each file holds the clicks of its users in time order; the clock is shared,
    so every file covers the same span of event time.
    """
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    pages = ["home", "search", "product", "cart", "checkout", "help"]
    users = [f"user{i:04d}" for i in range(max(1, count // 20))]
    clock = 1_700_000_000.0
    outs = [open(os.path.join(folder, f"clicks-{i}.jsonl"), "w") for i in range(files)]
    try:
        for _ in range(count):
            clock += rng.expovariate(1 / 30.0)
            user = rng.choice(users)
            event = {"user": user, "ts": round(clock, 3), "page": rng.choice(pages)}
            # One user's events stay in one file (one partition), in time order.
            outs[int(user[4:]) % files].write(json.dumps(event) + "\n")
    finally:
        for f in outs:
            f.close()
    return os.path.join(folder, "*.jsonl")


def options(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--input",
        default=os.environ.get(
            "CLICKSTREAM_INPUT", os.path.join(HERE, "data", "clicks", "*.jsonl")
        ),
    )
    parser.add_argument(
        "--output", default=os.environ.get("CLICKSTREAM_OUTPUT", os.path.join("out", "sessions"))
    )
    parser.add_argument(
        "--generate",
        type=int,
        default=int(os.environ.get("CLICKSTREAM_GENERATE", "0")),
        help="write this many synthetic events first",
    )
    parser.add_argument("--parallelism", type=int, default=2)
    parser.add_argument("--gap", type=float, default=1800.0, help="session gap, seconds")
    parser.add_argument(
        "--max-delay", type=float, default=60.0, help="how late a click may arrive, seconds"
    )
    return parser.parse_args(argv)


def build_from(args: argparse.Namespace) -> rf.Dataflow:
    pattern = args.input
    if args.generate:
        pattern = generate(
            os.path.join(os.path.dirname(args.output) or ".", "clicks"), args.generate
        )
    return build(pattern, args.output, args.parallelism, args.gap, args.max_delay)


def flow() -> rf.Dataflow:
    """The flow with the options in ``sys.argv`` (what ``rayflow run`` calls)."""
    return build_from(options(sys.argv[1:]))


def main(argv: Sequence[str] | None = None) -> None:
    args = options(argv)
    result = rf.run(build_from(args))
    sessions = [
        json.loads(line)
        for path in glob.glob(os.path.join(args.output, "part-*.jsonl"))
        for line in open(path)
    ]
    clicks = sum(s["clicks"] for s in sessions)
    print(
        f"job {result.job} {result.status.value} in {result.duration_s:.1f} s: "
        f"{result.records_out('events')} events, {len(sessions)} sessions "
        f"({clicks} clicks); output in {os.path.abspath(args.output)}"
    )


if __name__ == "__main__":
    main()
