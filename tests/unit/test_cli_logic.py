"""The command line's pure parts: addresses, API words, progress lines; and the
default CPU request of operators (no Ray needed)."""

from __future__ import annotations

import io
import logging

import pytest

from rayflow._internal.cli.connect import resolve
from rayflow._internal.cli.output import cli_words, compact
from rayflow._internal.cli.progress import ProgressLine, summary
from rayflow._internal.job import resources
from rayflow._internal.job.journal import JobJournal


def test_addresses_are_told_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve(None, start_local=True).kind == "local"
    assert resolve(None, start_local=False) == resolve("auto", start_local=False)
    assert resolve("10.0.0.1:6379", start_local=False).kind == "gcs"
    assert resolve("http://head:8265/", start_local=False) == resolve(
        "http://head:8265", start_local=False
    )
    assert resolve("https://head:8265", start_local=True).kind == "jobs"
    assert resolve("ray://head:10001", start_local=True).kind == "client"
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert resolve(None, start_local=True).kind == "jobs"
    assert resolve("auto", start_local=True).kind == "auto"  # --address wins


def test_api_words_become_flags() -> None:
    assert cli_words("pass either resume=True or restore_from=..., not both") == (
        "pass either --resume or --restore-from, not both"
    )
    assert cli_words("resume=True needs checkpoint=rf.Checkpointing(storage=...)") == (
        "--resume needs --checkpoint URI"
    )
    assert cli_words("restore_from='/x': no manifest") == "--restore-from '/x': no manifest"
    assert cli_words("job_name 'a b' is not valid") == "--job-name 'a b' is not valid"


def test_the_progress_line_sums_sources_and_sinks() -> None:
    def entry(records_in: int, records_out: int, busy: float = 0.0, bp: float = 0.0) -> dict:
        return {
            "records_in": records_in,
            "records_out": records_out,
            "records_out_per_s": records_out / 10,
            "busy_ms_per_s": busy,
            "backpressured_ms_per_s": bp,
            "mailbox_depth": 0,
        }

    metrics = {
        "src": [entry(0, 1_500_000), entry(0, 500_000)],
        "slow": [entry(2_000_000, 2_000_000, busy=900.0), entry(0, 0, busy=100.0)],
        "out": [entry(1_999_000, 0, bp=0.0)],
    }
    stats = {"last": {"id": 7}, "seconds_since_completed": 2.2, "failed": 0}
    line = summary("j", "RUNNING", 12.0, metrics, stats, sources=["src"], sinks=["out"])
    assert line == (
        "j RUNNING 12s | read 2.0M (200.0k/s) | written 2.0M | busiest slow 90% "
        "| checkpoint 7 2s ago"
    )
    assert compact(999) == "999" and compact(12_345) == "12.3k"


def test_progress_lines_off_a_terminal_come_every_so_often() -> None:
    out = io.StringIO()
    line = ProgressLine(out, tty=False, every_s=0.0)
    line.update("a")
    line.update("b")
    assert out.getvalue() == "a\nb\n"
    tty = io.StringIO()
    live = ProgressLine(tty, tty=True)
    live.update("first")
    live.update("second")
    live.clear()
    assert tty.getvalue().count("\r\x1b[2K") == 3 and "second" in tty.getvalue()


@pytest.mark.parametrize(
    ("actors", "explicit", "free", "total", "autoscaling", "expected"),
    [
        (8, 0.0, 2.0, 2.0, None, 0.12),  # a 2-core laptop: 1 CPU shared by 8 operators
        (4, 0.0, 16.0, 16.0, None, 1.0),  # plenty: at most one CPU each
        (4, 0.0, 0.0, 0.0, None, resources.NO_CPU_CLUSTER_SHARE),  # a head with no CPUs
        (6, 0.0, 0.0, 0.0, 24.0, 1.0),  # the autoscaler may grow to 24 CPUs
        (10, 0.0, 0.0, 0.0, 8.0, 0.4),
        (10, 0.0, 2.0, 6.0, 8.0, 0.2),  # others hold 4 of the 8 the cluster may reach
        (4, 2.0, 4.0, 4.0, None, 0.0),  # the explicit steps take the budget
        (0, 0.0, 4.0, 4.0, None, 0.0),
    ],
)
def test_fit_shares_half_of_what_the_cluster_offers(
    actors: int,
    explicit: float,
    free: float,
    total: float,
    autoscaling: float | None,
    expected: float,
) -> None:
    got = resources.fit(
        defaulted_actors=actors,
        explicit_cpus=explicit,
        free_cpus=free,
        total_cpus=total,
        autoscaling_max_cpus=autoscaling,
    )
    assert got == pytest.approx(expected)


def test_the_journal_logs_the_first_and_every_nth_checkpoint_and_all_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    journal = JobJournal("j", every=3)

    def checkpoint(i: int, outcome: str = "completed") -> dict:
        return {
            "type": "checkpoint",
            "id": i,
            "kind": "checkpoint",
            "started": 0.0,
            "ended": 0.1,
            "outcome": outcome,
            "reason": "storage down" if outcome == "failed" else None,
            "written_bytes": 10,
        }

    with caplog.at_level(logging.INFO, logger="rayflow"):
        journal.update({"status": "RUNNING", "events": [checkpoint(i) for i in range(1, 8)]})
        journal.update({"status": "RUNNING", "events": [checkpoint(8, "failed")]})
    lines = [r.getMessage() for r in caplog.records]
    completed = [m for m in lines if "completed" in m]
    assert [m.split()[3] for m in completed] == ["1", "4", "7"]
    assert any("checkpoint 8 failed: storage down" in m for m in lines)
