"""``ray job submit`` of jobs/wordcount.py to a Ray head started for this test."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tests.clusters.head import HeadNode

ROOT = Path(__file__).resolve().parents[2]


def test_ray_job_submit_runs_the_word_count(tmp_path: Path) -> None:
    head = HeadNode(num_cpus=2, dashboard=True)
    try:
        head.wait_ready(dashboard=True)
        out = tmp_path / "out"
        submitted = head.run(
            "ray",
            "job",
            "submit",
            "--address",
            head.dashboard,
            "--working-dir",
            ".",
            "--",
            "python",
            "jobs/wordcount.py",
            "--output",
            str(out),
            "--parallelism",
            "2",
            cwd=ROOT,
        )
        assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
        assert "job wordcount FINISHED" in submitted.stdout
        assert "succeeded" in submitted.stdout
    finally:
        head.stop()
    counts: dict[str, int] = {}
    for part in sorted(out.glob("part-*.jsonl")):
        for line in part.read_text().splitlines():
            word, n = json.loads(line)
            counts[word] = max(counts.get(word, 0), n)
    import sys

    sys.path.insert(0, str(ROOT / "jobs"))
    from wordcount import tokenize

    expected: Counter[str] = Counter()
    for path in sorted((ROOT / "jobs" / "data").glob("*.txt")):
        for line in path.read_text().splitlines():
            expected.update(tokenize(line))
    assert counts == dict(expected)
