"""Word count over text files: the hello-world of stream processing.

Runs as it is on a laptop (a local Ray, a sample text shipped in
``jobs/data``, output in ``out/wordcount``) and unchanged on a cluster:

    python jobs/wordcount.py
    rayflow run jobs/wordcount.py [--output DIR]
    ray job submit --working-dir . -- python jobs/wordcount.py

Options (or environment variables) choose the input, output and parallelism.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections.abc import Sequence

import rayflow as rf

HERE = os.path.dirname(os.path.abspath(__file__))


def tokenize(line: str) -> list[str]:
    return [w.strip(".,;:!?\"'()").lower() for w in line.split() if w.strip(".,;:!?\"'()")]


def build(pattern: str, output: str, parallelism: int) -> rf.Dataflow:
    flow = rf.Dataflow("wordcount", parallelism=parallelism)
    lines = flow.source("lines", rf.sources.TextFiles(pattern))
    words = lines.flat_map("split", tokenize)
    counts = words.key_by("by_word", lambda w: w).reduce("count", lambda acc, _: acc + 1, initial=0)
    counts.sink("out", rf.sinks.JsonLines(output))
    return flow


def options(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--input",
        default=os.environ.get("WORDCOUNT_INPUT", os.path.join(HERE, "data", "*.txt")),
        help="glob of text files",
    )
    parser.add_argument(
        "--output",
        default=os.environ.get("WORDCOUNT_OUTPUT", os.path.join("out", "wordcount")),
        help="output folder",
    )
    parser.add_argument(
        "--parallelism", type=int, default=int(os.environ.get("WORDCOUNT_PARALLELISM", "2"))
    )
    return parser.parse_args(argv)


def flow() -> rf.Dataflow:
    """The flow with the options in ``sys.argv`` (what ``rayflow run`` calls)."""
    args = options(sys.argv[1:])
    return build(args.input, args.output, args.parallelism)


def main(argv: Sequence[str] | None = None) -> None:
    args = options(argv)
    result = rf.run(build(args.input, args.output, args.parallelism))

    # reduce emits (word, count) on every update; the last count of a word is its total.
    totals: dict[str, int] = {}
    for path in glob.glob(os.path.join(args.output, "part-*.jsonl")):
        with open(path) as f:
            for line in f:
                word, count = json.loads(line)
                totals[word] = max(totals.get(word, 0), count)
    top = sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    print(
        f"job {result.job} {result.status.value} in {result.duration_s:.1f} s: "
        f"{result.records_out('split')} words, {len(totals)} distinct; "
        f"output in {os.path.abspath(args.output)}"
    )
    for word, count in top:
        print(f"{count:6d}  {word}")


if __name__ == "__main__":
    main()
