"""The upstream log of local recovery (issue 16): what a sender keeps per channel, what a
restarted receiver gets back, and the bound on memory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rayflow._internal.runtime.replay_log import LogGone, ReplayLog

DATA, BARRIER = 0, 1


def _send(log: ReplayLog, seqs: dict[str, int], channel: str, kind: int, payload: object) -> int:
    seq = seqs.get(channel, 0)
    seqs[channel] = seq + 1
    log.append(channel, seq, kind, payload)
    return seq


def test_a_receiver_gets_back_exactly_what_was_sent_after_its_checkpoint(
    tmp_path: Path,
) -> None:
    log = ReplayLog(spill_dir=str(tmp_path))
    seqs: dict[str, int] = {}
    sent: dict[str, list[tuple[int, int, object]]] = {"a": [], "b": []}
    for checkpoint in (1, 2, 3):
        for i in range(4):
            for ch in ("a", "b"):
                payload = f"{ch}-{checkpoint}-{i}".encode()
                sent[ch].append((_send(log, seqs, ch, DATA, payload), DATA, payload))
        for ch in ("a", "b"):
            barrier = {"checkpoint": checkpoint}
            sent[ch].append((_send(log, seqs, ch, BARRIER, barrier), BARRIER, barrier))
        log.mark(checkpoint)
    # More data after the last barrier.
    for ch in ("a", "b"):
        sent[ch].append((_send(log, seqs, ch, DATA, b"tail"), DATA, b"tail"))
    log.trim(1)  # checkpoint 1 completed: nothing before its barrier is needed any more
    for ch in ("a", "b"):
        assert list(log.replay(ch, after=1)) == sent[ch][5:]
        assert list(log.replay(ch, after=2)) == sent[ch][10:]
        assert list(log.replay(ch, after=3)) == sent[ch][15:]
    with pytest.raises(LogGone, match="checkpoint 0"):
        list(log.replay("a", after=0))
    log.trim(3)
    assert log.entries("a") == 1 and not log.replayable(2) and log.replayable(3)
    assert list(log.replay("b", after=3)) == [(15, DATA, b"tail")]


def test_memory_is_bounded_and_spilled_entries_replay_the_same(tmp_path: Path) -> None:
    log = ReplayLog(memory_bytes=10_000, spill_dir=str(tmp_path))
    seqs: dict[str, int] = {}
    payloads = [os.urandom(1000) for _ in range(50)]
    log.mark(0)
    for p in payloads:
        _send(log, seqs, "x", DATA, p)
    _send(log, seqs, "x", BARRIER, ("barrier", 1))
    log.mark(1)
    assert log.memory_used <= 10_000
    assert log.spilled_bytes >= 40 * 1000
    assert [p for _, _, p in log.replay("x", after=0)] == [*payloads, ("barrier", 1)]
    log.trim(1)
    assert log.memory_used == 0 and log.spilled_bytes == 0  # the spill file is emptied
    _send(log, seqs, "x", DATA, b"after")
    assert list(log.replay("x", after=1)) == [(51, DATA, b"after")]
    log.close()
    assert not list(tmp_path.iterdir())  # the spill file is gone with the log
    with pytest.raises(LogGone):
        list(log.replay("x", after=1))


def test_a_gap_in_a_channel_is_refused() -> None:
    log = ReplayLog()
    log.append("c", 0, DATA, b"0")
    with pytest.raises(ValueError, match="message 2 follows 0"):
        log.append("c", 2, DATA, b"2")


def test_a_trimmed_channel_keeps_its_numbering_and_an_unknown_trim_is_ignored() -> None:
    log = ReplayLog()
    seqs: dict[str, int] = {}
    _send(log, seqs, "c", DATA, b"0")
    log.mark(1)
    log.trim(7)  # never marked here (it started before this log): nothing happens
    assert log.entries("c") == 1
    log.trim(1)
    assert log.entries("c") == 0
    with pytest.raises(ValueError):
        log.append("c", 0, DATA, b"again")  # the channel goes on at 1
    _send(log, seqs, "c", DATA, b"1")
    assert list(log.replay("c", after=1)) == [(1, DATA, b"1")]
    assert list(log.replay("other", after=1)) == []
