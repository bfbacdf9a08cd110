"""Jobs in notebooks: a live progress display and the HTML view of a JobHandle."""

from __future__ import annotations

import html
from typing import Any


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (not a plain IPython shell)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def render(job: str, data: dict[str, Any]) -> str:
    """A job's state as an HTML table: status, checkpoints, and one row per step."""
    status = html.escape(str(data.get("status", "")))
    stats = data.get("checkpoints") or {}
    last = stats.get("last") or {}
    parts = [f"<b>rayflow job {html.escape(job)}</b>: {status}"]
    if stats:
        parts.append(
            f"checkpoints {stats.get('completed', 0)} completed, {stats.get('failed', 0)} failed"
            + (f", last #{last['id']} in {last['duration_ms']:.0f} ms" if last else "")
        )
    if data.get("restarts"):
        parts.append(f"restarts {data['restarts']}")
    alerts = "".join(
        f"<div style='color:#b00'>&#9888; {html.escape(a['kind'])}: "
        f"{html.escape(a['message'])}</div>"
        for a in data.get("alerts") or []
    )
    rows = []
    for step, entries in (data.get("metrics") or {}).items():
        rows.append(
            "<tr>"
            + "".join(
                f"<td style='text-align:{align}'>{value}</td>"
                for value, align in (
                    (html.escape(step), "left"),
                    (len(entries), "right"),
                    (f"{sum(e['records_in'] for e in entries):,}", "right"),
                    (f"{sum(e['records_out'] for e in entries):,}", "right"),
                    (f"{sum(e['records_out_per_s'] for e in entries):,.0f}", "right"),
                    (f"{max(e['busy_ms_per_s'] for e in entries):.0f}", "right"),
                    (f"{max(e['backpressured_ms_per_s'] for e in entries):.0f}", "right"),
                    (f"{sum(e['mailbox_depth'] for e in entries)}", "right"),
                )
            )
            + "</tr>"
        )
    header = "".join(
        f"<th>{h}</th>"
        for h in (
            "step",
            "partitions",
            "records in",
            "records out",
            "out/s",
            "busy ms/s",
            "back-pressured ms/s",
            "mailbox",
        )
    )
    table = f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    return "<div>" + " &middot; ".join(parts) + alerts + table + "</div>"


class LiveDisplay:
    """A display in the notebook cell that started the job, updated on every poll."""

    def __init__(self, job: str):
        from IPython.display import HTML, display

        self.job = job
        self._html = HTML
        self._handle = display(HTML(render(job, {"status": "STARTING"})), display_id=True)

    def update(self, data: dict[str, Any]) -> None:
        if self._handle is not None:
            self._handle.update(self._html(render(self.job, data)))
