"""An unbounded job: generated events, counted per user, written to S3 exactly-once.

A replayable generator emits page views forever; a keyed ``reduce`` counts
them per user; the counts go to S3 as JSON Lines through multipart uploads
that complete only when a checkpoint commits. Checkpoints go to S3 too. The
job runs for ``--seconds`` and stops with a final checkpoint (``--resume``
continues it later; ``--savepoint`` ends it with a savepoint).

Storage comes from the arguments, else the environment: ``RAYFLOW_S3``
(default ``s3://rayflow``) with the usual AWS variables (``AWS_ENDPOINT_URL``
for an S3-compatible server such as ``python infra/local_s3.py start``).

    python jobs/generator_to_s3.py --seconds 30
    rayflow run jobs/generator_to_s3.py --checkpoint s3://rayflow/generator/checkpoints
    ray job submit --working-dir . -- python jobs/generator_to_s3.py --seconds 600
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import rayflow as rf


def view(partition: int, offset: int) -> dict[str, object]:
    """The event at ``offset``: a pure function of its position, hence replayable."""
    return {
        "user": f"user{(offset * 7919 + partition) % 5000:04d}",
        "page": offset % 17,
        "partition": partition,
        "offset": offset,
    }


def build(
    s3: str, rate: float, partitions: int, parallelism: int, limit: int | None = None
) -> rf.Dataflow:
    flow = rf.Dataflow("generator-to-s3", parallelism=parallelism)
    views = flow.source(
        "views", rf.sources.Generator(view, partitions=partitions, rate=rate, limit=limit)
    )
    counts = views.key_by("by_user", lambda v: v["user"]).reduce(
        "views_per_user", lambda acc, v: acc + 1, initial=0
    )
    counts.map("as_json", lambda kv: {"user": kv[0], "views": kv[1]}).sink(
        "s3", rf.sinks.S3JsonLines(f"{s3}/generator/output")
    )
    return flow


def options(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--s3",
        default=os.environ.get("RAYFLOW_S3", "s3://rayflow"),
        help="s3://bucket[/prefix] for output and checkpoints",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=float(os.environ.get("GENERATOR_SECONDS", "30")),
        help="how long to run before stopping",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=float(os.environ.get("GENERATOR_RATE", "5000")),
        help="events per second, all partitions together",
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="end after this many events per partition"
    )
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--parallelism", type=int, default=2)
    parser.add_argument("--interval", type=float, default=2.0, help="checkpoint interval, s")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--savepoint", default=None, help="stop with a savepoint here")
    return parser.parse_args(argv)


def flow() -> rf.Dataflow:
    """The flow with the options in ``sys.argv`` (what ``rayflow run`` calls: it runs
    until Ctrl-C, or ``--limit`` events; checkpoints go where ``--checkpoint`` says)."""
    args = options(sys.argv[1:])
    return build(args.s3.rstrip("/"), args.rate, args.partitions, args.parallelism, args.limit)


def main(argv: Sequence[str] | None = None) -> None:
    args = options(argv)
    s3 = args.s3.rstrip("/")
    dataflow = build(s3, args.rate, args.partitions, args.parallelism, args.limit)
    checkpoint = rf.Checkpointing(storage=f"{s3}/generator/checkpoints", interval_s=args.interval)
    handle = rf.start(dataflow, checkpoint=checkpoint, resume=args.resume)
    print(f"job {handle.job} running; checkpoints in {checkpoint.storage}", flush=True)
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
        m = handle.metrics()
        rate = sum(e["records_out_per_s"] for e in m.get("views", []))
        stats = handle.checkpoint_stats() or {}
        print(f"  {rate:8.0f} views/s, {stats.get('completed', 0)} checkpoints", flush=True)
    result = handle.stop(savepoint=args.savepoint or False)
    print(
        f"job {result.job} {result.status.value}: final checkpoint "
        f"{result.final_checkpoint}{', savepoint ' + result.savepoint if result.savepoint else ''}"
        f"; output in {s3}/generator/output"
    )


if __name__ == "__main__":
    main()
