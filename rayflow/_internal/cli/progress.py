"""A running job at a glance: the live line of ``rayflow run`` and ``rayflow status``."""

from __future__ import annotations

import shutil
import time
from typing import Any, TextIO

from rayflow._internal.cli.output import compact, table

STATUS_COLUMNS = [
    "step",
    "partitions",
    "records_in",
    "records_out",
    "out_per_s",
    "busy_ms_s",
    "backpressured_ms_s",
    "mailbox",
]


def step_rows(metrics: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per step: totals over its partitions, the worst partition's times."""
    return [
        {
            "step": step,
            "partitions": len(entries),
            "records_in": sum(e["records_in"] for e in entries),
            "records_out": sum(e["records_out"] for e in entries),
            "out_per_s": sum(e.get("records_out_per_s", 0.0) for e in entries),
            "busy_ms_s": max(e.get("busy_ms_per_s", 0.0) for e in entries),
            "backpressured_ms_s": max(e.get("backpressured_ms_per_s", 0.0) for e in entries),
            "mailbox": sum(e.get("mailbox_depth", 0) for e in entries),
        }
        for step, entries in metrics.items()
        if entries
    ]


def checkpoint_line(stats: dict[str, Any] | None) -> str | None:
    if not stats:
        return None
    last = stats.get("last") or {}
    text = (
        f"checkpoints: {stats['completed']} completed, {stats['failed']} failed, "
        f"interval {stats.get('interval_s', 0):g} s"
    )
    if last:
        text += (
            f"; last {last['id']} ({last['duration_ms']:.0f} ms, {last['written_bytes']:,} bytes)"
        )
    return text


def render_status(job: str, data: dict[str, Any]) -> str:
    """The text of ``rayflow status``."""
    lines = [f"job {job}: {data['status']}"]
    for alert in data.get("alerts") or []:
        lines.append(f"ALERT {alert['kind']}: {alert['message']}")
    line = checkpoint_line(data.get("checkpoints"))
    if line:
        lines.append(line)
    if data.get("restarts"):
        lines.append(f"restarts: {data['restarts']}")
    lines.append(table(data["steps"], STATUS_COLUMNS))
    return "\n".join(lines)


def summary(
    job: str,
    status: str,
    elapsed_s: float,
    metrics: dict[str, list[dict[str, Any]]],
    stats: dict[str, Any] | None,
    *,
    sources: list[str],
    sinks: list[str],
) -> str:
    """One line: records read and written with rates, the busiest and most
    back-pressured steps, the last checkpoint."""
    rows = {r["step"]: r for r in step_rows(metrics)}
    read = sum(rows[s]["records_out"] for s in sources if s in rows)
    read_rate = sum(rows[s]["out_per_s"] for s in sources if s in rows)
    written = sum(rows[s]["records_in"] for s in sinks if s in rows)
    parts = [
        f"{job} {status} {elapsed_s:.0f}s",
        f"read {compact(read)} ({compact(read_rate)}/s)",
        f"written {compact(written)}",
    ]
    if rows:
        busiest = max(rows.values(), key=lambda r: r["busy_ms_s"])
        if busiest["busy_ms_s"] >= 1.0:
            parts.append(f"busiest {busiest['step']} {busiest['busy_ms_s'] / 10:.0f}%")
        pressed = max(rows.values(), key=lambda r: r["backpressured_ms_s"])
        if pressed["backpressured_ms_s"] >= 1.0:
            parts.append(
                f"backpressured {pressed['step']} {pressed['backpressured_ms_s'] / 10:.0f}%"
            )
    if stats:
        last = stats.get("last")
        if last:
            ago = stats.get("seconds_since_completed")
            parts.append(
                f"checkpoint {last['id']}" + (f" {ago:.0f}s ago" if ago is not None else "")
            )
        if stats.get("failed"):
            parts.append(f"{stats['failed']} checkpoint(s) failed")
    return " | ".join(parts)


class ProgressLine:
    """On a terminal, one line rewritten in place; elsewhere a line every ``every_s``."""

    def __init__(self, stream: TextIO, *, tty: bool, every_s: float = 10.0):
        self.stream = stream
        self.tty = tty
        self.every_s = every_s
        self._last_print = time.monotonic()
        self._shown = False

    def update(self, line: str) -> None:
        if self.tty:
            width = shutil.get_terminal_size((120, 20)).columns - 1
            self.stream.write("\r\x1b[2K" + line[:width])
            self._shown = True
        elif time.monotonic() - self._last_print >= self.every_s:
            self.stream.write(line + "\n")
            self._last_print = time.monotonic()
        self.stream.flush()

    def clear(self) -> None:
        if self.tty and self._shown:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self._shown = False
