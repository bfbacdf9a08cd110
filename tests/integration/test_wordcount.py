from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

import rayflow as rf

WORDS = ["stream", "ray", "actor", "state", "barrier", "credit", "key", "batch", "x", "y"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Counter[str]]:
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(3)
    for i in range(5):
        lines = [" ".join(rng.choices(WORDS, k=rng.randint(0, 12))) for _ in range(4000)]
        (folder / f"part{i}.txt").write_text("\n".join(lines) + "\n")
    counter: Counter[str] = Counter()
    for path in sorted(folder.glob("*.txt")):
        for line in path.read_text().splitlines():
            counter.update(line.split())
    return str(folder / "*.txt"), counter


def _word_count(pattern: str, parallelism: int, sink: rf.sinks.Sink) -> rf.Dataflow:
    flow = rf.Dataflow(f"wordcount-p{parallelism}", parallelism=parallelism)
    lines = flow.source("lines", rf.sources.TextFiles(pattern))
    words = lines.flat_map("split", str.split)
    counts = words.key_by("by_word", lambda w: w).reduce("count", lambda acc, w: acc + 1, initial=0)
    counts.sink("out", sink)
    return flow


@pytest.mark.parametrize("parallelism", [1, 2, 4])
def test_word_count_equals_a_counter(corpus: tuple[str, Counter[str]], parallelism: int) -> None:
    pattern, expected = corpus
    result = rf.run(_word_count(pattern, parallelism, rf.testing.Collect()))
    updates = result.output("out")
    # reduce emits (word, count) on every update: each count 1..n exactly once.
    seen: dict[str, list[int]] = {}
    for word, count in updates:
        seen.setdefault(word, []).append(count)
    assert {w: sorted(c) for w, c in seen.items()} == {
        w: list(range(1, n + 1)) for w, n in expected.items()
    }
    assert result.status is rf.JobStatus.FINISHED
    assert result.records_out("lines") == 20_000
    assert result.records_in("count") == sum(expected.values())
    assert len(result.metrics["count"]) == parallelism


def test_word_count_into_json_lines_files(corpus: tuple[str, Counter[str]], tmp_path: Path) -> None:
    pattern, expected = corpus
    rf.run(_word_count(pattern, 2, rf.sinks.JsonLines(tmp_path / "out")))
    files = sorted((tmp_path / "out").glob("part-*.jsonl"))
    assert [f.name for f in files] == ["part-00000.jsonl", "part-00001.jsonl"]
    final: dict[str, int] = {}
    for f in files:
        for line in f.read_text().splitlines():
            word, count = json.loads(line)
            final[word] = max(final.get(word, 0), count)
    assert final == dict(expected)
    assert not list((tmp_path / "out" / ".staging").iterdir())
