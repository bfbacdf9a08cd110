"""Jobs in notebooks: the live progress display, the HTML views and the metrics plot.

One renderer serves the live display of a running job, ``JobHandle`` and
``JobResult`` (a finished job shows its duration and final checkpoint and
the records each step took in and put out). :func:`plot_history` draws a
job's polled metrics with matplotlib, imported only then (an optional
dependency, like pandas for the history itself).
"""

from __future__ import annotations

import functools
import html
import sys
from collections.abc import Callable, Sequence
from typing import Any

from rayflow._internal.cli.progress import step_rows
from rayflow._internal.history import require


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (not a plain IPython shell)."""
    # A kernel has imported IPython long before; importing it to ask cost a plain
    # script's first job 0.23 s, after it had started.
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and hasattr(shell, "kernel")


# (header, cell of one step from its row: cli.progress.step_rows aggregates the partitions)
Column = tuple[str, Callable[[dict[str, Any]], str]]

_PARTITIONS: Column = ("partitions", lambda r: str(r["partitions"]))
_RECORDS_IN: Column = ("records in", lambda r: f"{r['records_in']:,}")
_RECORDS_OUT: Column = ("records out", lambda r: f"{r['records_out']:,}")

#: The table of a running job: what moves now.
LIVE_COLUMNS: tuple[Column, ...] = (
    _PARTITIONS,
    _RECORDS_IN,
    _RECORDS_OUT,
    ("out/s", lambda r: f"{r['out_per_s']:,.0f}"),
    ("busy ms/s", lambda r: f"{r['busy_ms_s']:.0f}"),
    ("back-pressured ms/s", lambda r: f"{r['backpressured_ms_s']:.0f}"),
    ("mailbox", lambda r: str(r["mailbox"])),
)

#: The table of a finished job: what each step did (rates are zero by then).
FINAL_COLUMNS: tuple[Column, ...] = (_PARTITIONS, _RECORDS_IN, _RECORDS_OUT)


def render(job: str, data: dict[str, Any], columns: Sequence[Column] = LIVE_COLUMNS) -> str:
    """A job's state as HTML: a summary line, its alerts, and one table row per step.

    ``data`` holds what the coordinator's ``telemetry`` call answers
    (``status``, ``metrics``, ``checkpoints``, ``restarts``, ``alerts``) and,
    for a finished job, ``duration_s``, ``final_checkpoint`` and ``savepoint``.
    """
    status = html.escape(str(data.get("status", "")))
    stats = data.get("checkpoints") or {}
    last = stats.get("last") or {}
    parts = [f"<b>rayflow job {html.escape(job)}</b>: {status}"]
    if data.get("duration_s") is not None:  # a finished job
        parts.append(f"ran {data['duration_s']:.1f} s")
    if stats:
        parts.append(
            f"checkpoints {stats.get('completed', 0)} completed, {stats.get('failed', 0)} failed"
            + (f", last #{last['id']} in {last['duration_ms']:.0f} ms" if last else "")
        )
    if data.get("final_checkpoint") is not None:
        parts.append(f"final checkpoint #{data['final_checkpoint']}")
    if data.get("savepoint"):
        parts.append(f"savepoint {html.escape(str(data['savepoint']))}")
    finished = data.get("duration_s") is not None
    if data.get("restarts") or (finished and data.get("restarts") is not None):
        parts.append(f"restarts {data['restarts']}")
    alerts = "".join(
        f"<div style='color:#b00'>&#9888; {html.escape(str(a['kind']))}: "
        f"{html.escape(str(a['message']))}</div>"
        for a in data.get("alerts") or []
    )
    rows = []
    for row in step_rows(data.get("metrics") or {}):
        cells = [f"<td style='text-align:left'>{html.escape(str(row['step']))}</td>"]
        cells += [f"<td style='text-align:right'>{cell(row)}</td>" for _, cell in columns]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    header = "".join(f"<th>{html.escape(h)}</th>" for h in ("step", *(h for h, _ in columns)))
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


# -- the plot of the history -------------------------------------------------

#: What plot() draws, one axis each: (column, how partitions combine, scale, axis label).
#: Throughput is records out per second, and records in for sinks (which put none out).
PLOTTED: tuple[tuple[str, str, float, str], ...] = (
    ("throughput", "sum", 1.0, "records/s, all partitions\n(out; sinks: in)"),
    ("busy_ms_per_s", "max", 0.1, "busy, % of time\n(busiest partition)"),
    ("backpressured_ms_per_s", "max", 0.1, "back-pressured, % of time\n(busiest partition)"),
)


@functools.cache
def _figure_class() -> type:
    """A matplotlib Figure that shows itself as a PNG in any notebook.

    A bare ``Figure`` (made without pyplot, so no GUI backend and no global
    figure list) has no notebook display until a matplotlib backend was
    activated in the kernel; this one renders itself with Agg. Where the
    kernel registered its own figure format (``%matplotlib inline``), that
    one wins, since IPython looks up formatters by type first.
    """
    require("matplotlib", "plot()")
    from matplotlib.figure import Figure

    class NotebookFigure(Figure):
        def _repr_png_(self) -> bytes:
            import io

            buffer = io.BytesIO()
            self.savefig(buffer, format="png", bbox_inches="tight")
            return buffer.getvalue()

    return NotebookFigure


def plot_history(frame: Any, title: str) -> Any:
    """Throughput, busy and back-pressured time per step over time: one axis each.

    ``frame`` is a history DataFrame (``handle.history()``); returns the
    ``matplotlib.figure.Figure``. Partitions combine as each axis says: the
    records of all of them, the time of the busiest one (the one that limits
    the step).
    """
    fig = _figure_class()(figsize=(10, 2.4 * len(PLOTTED) + 0.6), layout="constrained")
    axes = fig.subplots(len(PLOTTED), 1, sharex=True, squeeze=False)[:, 0]
    steps = list(dict.fromkeys(frame["step"]))
    sink = frame["kind"] == "sink"
    frame = frame.assign(
        throughput=frame["records_out_per_s"].where(~sink, frame["records_in_per_s"])
    )
    for ax, (column, how, scale, label) in zip(axes, PLOTTED, strict=True):
        per_step = frame.groupby(["elapsed_s", "step"], sort=True)[column].agg(how).unstack("step")
        for step in steps:
            ax.plot(per_step.index, per_step[step] * scale, label=step, marker=".", markersize=4)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.set_ylim(0, 105 if scale != 1.0 else None)
    axes[0].set_title(title)
    axes[-1].set_xlabel("seconds since the job started")
    if steps:
        axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return fig
