"""Clickstream sessionizer: JSON click events in, one record per user session out.

A session is a user's clicks until they log out or stay away for more than
``--gap`` seconds (of event time); ``stateful_map`` keeps each user's open
session, and deletes it when the session ends. Input is JSON Lines files of
``{"user", "ts", "page"}`` events (a sample ships in ``jobs/data/clicks``;
``--generate N`` writes N synthetic events first).

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
    return json.loads(line)  # type: ignore[no-any-return]


def sessionize(gap: float) -> Any:
    def step(session: dict[str, Any] | None, event: dict[str, Any]) -> tuple[Any, list[Any]]:
        out = []
        if session is not None and event["ts"] - session["end"] > gap:
            out.append(session)  # the user was away too long: that session is over
            session = None
        if session is None:
            session = {
                "user": event["user"],
                "start": event["ts"],
                "end": event["ts"],
                "clicks": 0,
                "pages": [],
            }
        session["end"] = event["ts"]
        session["clicks"] += 1
        if event["page"] == "logout":
            out.append(session)
            return None, out  # None deletes the user's state
        session["pages"].append(event["page"])
        return session, out

    return step


def build(pattern: str, output: str, parallelism: int, gap: float) -> rf.Dataflow:
    flow = rf.Dataflow("clickstream", parallelism=parallelism)
    lines = flow.source("events", rf.sources.TextFiles(pattern))
    events = lines.map("parse", parse)
    sessions = events.key_by("by_user", lambda e: e["user"]).stateful_map(
        "sessionize", sessionize(gap)
    )
    sessions.map("summary", lambda kv: kv[1]).sink("sessions", rf.sinks.JsonLines(output))
    return flow


def generate(folder: str, count: int, files: int = 4, seed: int = 1) -> str:
    """Write ``count`` synthetic click events as JSON Lines; return their glob."""
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    pages = ["home", "search", "product", "cart", "checkout", "help"]
    users = [f"user{i:04d}" for i in range(max(1, count // 20))]
    clock = dict.fromkeys(users, 0.0)
    outs = [open(os.path.join(folder, f"clicks-{i}.jsonl"), "w") for i in range(files)]
    try:
        for _ in range(count):
            user = rng.choice(users)
            clock[user] += rng.choice([5, 20, 60, 600, 4000])
            page = "logout" if rng.random() < 0.08 else rng.choice(pages)
            event = {"user": user, "ts": clock[user], "page": page}
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
    return parser.parse_args(argv)


def build_from(args: argparse.Namespace) -> rf.Dataflow:
    pattern = args.input
    if args.generate:
        pattern = generate(
            os.path.join(os.path.dirname(args.output) or ".", "clicks"), args.generate
        )
    return build(pattern, args.output, args.parallelism, args.gap)


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
        f"{result.records_out('events')} events, {len(sessions)} closed sessions "
        f"({clicks} clicks; sessions still open at the end stay in state); "
        f"output in {os.path.abspath(args.output)}"
    )


if __name__ == "__main__":
    main()
